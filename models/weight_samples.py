"""Whole-network weight samples drawn from a seed: the S networks of an evaluation.

:func:`draw_noise` draws the zero-mean posterior noise of every Bayesian layer of a model from one
``torch.Generator``, in a fixed order: the layers in ``named_modules()`` order, weight before bias, a
block-tridiagonal chain jointly at its first layer (``LayerChain.draw``). Each layer's draw is the one its
training forward makes (``sample_noise``), with the standard normals taken from the generator, so a sample has
exactly the posterior's distribution, and a seed names one network: it can be drawn again rather than stored.
With a CPU generator the network is the same on any device.

:class:`fixed_sample` makes every forward use ``mean + noise`` of one such draw, whatever the layers' mode;
an evaluation runs the model in eval mode under it, so BatchNorm uses its running statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.bayesian_layers import BayesianLayer, bayesian_layers
from models.joint_posterior import chains_of

Noise = dict[BayesianLayer, tuple[Tensor, Tensor | None]]


@torch.no_grad()
def draw_noise(model: nn.Module, generator: torch.Generator) -> Noise:
    """One network's posterior noise ``(weight_noise, bias_noise)`` per Bayesian layer, from ``generator``."""
    chain_at = {id(chain.layers[0]): chain for chain in chains_of(model)}
    noise: Noise = {}
    for _, layer in bayesian_layers(model):
        if layer in noise:  # drawn with its chain
            continue
        chain = chain_at.get(id(layer))
        if chain is None:
            noise[layer] = layer.sample_noise(generator)
        else:
            noise.update(zip(chain.layers, chain.draw(generator=generator)))
    return noise


class fixed_sample:
    """Context manager: every forward of the noised layers uses ``mean + noise`` (``noise`` from :func:`draw_noise`)."""

    def __init__(self, noise: Noise) -> None:
        self.noise = noise

    def __enter__(self) -> fixed_sample:
        for layer, n in self.noise.items():
            layer.fixed_noise = n
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.noise:
            layer.fixed_noise = None
