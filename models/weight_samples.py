"""Weight samples outside training: the S seeded networks of an evaluation, and sampling in eval mode.

:func:`draw_noise` draws the zero-mean posterior noise of every Bayesian layer of a model from one
``torch.Generator``, in a fixed order: the layers in ``named_modules()`` order, weight before bias, a
block-tridiagonal chain jointly at its first layer (``LayerChain.draw``). Each layer's draw is the one its
training forward makes (``sample_noise``), with the standard normals taken from the generator, so a sample has
exactly the posterior's distribution, and a seed names one network: it can be drawn again rather than stored.
With a CPU generator the network is the same on any device.

:class:`fixed_sample` makes every forward use ``mean + noise`` of one such draw, whatever the layers' mode;
an evaluation runs the model in eval mode under it, so BatchNorm uses its running statistics.

:class:`sampling` makes the layers draw a fresh sample at every forward in eval mode too (from the global RNG).
"""

from __future__ import annotations

import torch
from torch import nn

from models.bayesian_layers import BayesianLayer, LayerNoise, bayesian_layers
from models.joint_posterior import chains_of

Noise = dict[BayesianLayer, LayerNoise]


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


class sampling:
    """Context manager: Bayesian layers of ``model`` sample weights even in eval mode."""

    def __init__(self, model: nn.Module, enabled: bool = True) -> None:
        self.layers = [m for _, m in bayesian_layers(model)]
        self.enabled = enabled

    def __enter__(self) -> sampling:
        self.saved = [m.sample_in_eval for m in self.layers]
        for m in self.layers:
            m.sample_in_eval = self.enabled
        return self

    def __exit__(self, *exc) -> None:
        for m, s in zip(self.layers, self.saved):
            m.sample_in_eval = s
