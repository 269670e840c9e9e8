"""The three architectures of the seeds, buildable with any posterior.

* ``mlp``: the first seed's MNIST network, 784-100-10 (hidden sizes configurable).
* ``covnet``: the second seed's MNIST CovNet (Table 1): conv5x5(6)-pool-conv5x5(16)-pool-fc(10).
* ``lenet5``: the second seed's CIFAR-10 LeNet-5 (Table 1):
  conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc84-fc10.

``posterior="MAP"`` builds plain ``nn.Linear`` / ``nn.Conv2d`` layers (the deterministic
baseline trained with Adam or SGD); ``"FFG"`` / ``"MVG"`` build the Bayesian layers.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

from torch import nn

from models.bayesian_layers import BayesianConv2d, BayesianLinear

ARCHS = ("mlp", "covnet", "lenet5")


def _layers(posterior: str) -> tuple:
    if posterior == "MAP":
        return nn.Linear, nn.Conv2d
    if posterior in ("FFG", "MVG"):
        return partial(BayesianLinear, posterior=posterior), partial(BayesianConv2d, posterior=posterior)
    raise ValueError(f"posterior must be MAP, FFG or MVG, got {posterior!r}")


def _conv_out(size: int, kernel: int) -> int:
    return size - kernel + 1


def build_model(arch: str, posterior: str, in_channels: int, image_size: int, num_classes: int,
                hidden: Sequence[int] = (100,)) -> nn.Module:
    """Build ``arch`` with Bayesian (``FFG``/``MVG``) or deterministic (``MAP``) layers."""
    linear, conv = _layers(posterior)
    if arch == "mlp":
        sizes = [in_channels * image_size * image_size, *hidden]
        layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
        for i, (a, b) in enumerate(itertools.pairwise(sizes), 1):
            layers[f"fc{i}"], layers[f"relu{i}"] = linear(a, b), nn.ReLU()
        layers[f"fc{len(sizes)}"] = linear(sizes[-1], num_classes)
        return nn.Sequential(OrderedDict(layers))
    if arch in ("covnet", "lenet5"):
        side = _conv_out(_conv_out(image_size, 5) // 2, 5) // 2
        if side < 1:
            raise ValueError(f"{arch} needs images of at least 16x16 pixels, got {image_size}x{image_size}")
        layers = {
            "conv1": conv(in_channels, 6, 5), "relu1": nn.ReLU(), "pool1": nn.MaxPool2d(2),
            "conv2": conv(6, 16, 5), "relu2": nn.ReLU(), "pool2": nn.MaxPool2d(2),
            "flatten": nn.Flatten(),
        }
        flat = 16 * side * side
        if arch == "covnet":
            layers["fc1"] = linear(flat, num_classes)
        else:
            layers.update(fc1=linear(flat, 120), relu3=nn.ReLU(), fc2=linear(120, 84), relu4=nn.ReLU(),
                          fc3=linear(84, num_classes))
        return nn.Sequential(OrderedDict(layers))
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def bayesianize(model: nn.Module, posterior: str) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` in place by its Bayesian twin.

    The means are copied, so an existing (e.g. pretrained) network becomes the posterior mean.
    """
    linear, conv = _layers(posterior)
    for name, child in list(model.named_children()):
        new = None
        if type(child) is nn.Linear:
            new = linear(child.in_features, child.out_features, bias=child.bias is not None)
        elif type(child) is nn.Conv2d:
            if child.groups != 1 or child.padding_mode != "zeros":
                raise ValueError(f"layer {name}: only groups=1 and zero padding are supported")
            new = conv(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                       padding=child.padding, dilation=child.dilation, bias=child.bias is not None)
        if new is None:
            bayesianize(child, posterior)
            continue
        new.to(child.weight)
        new.load_state_dict(child.state_dict(), strict=False)
        setattr(model, name, new)
    return model
