"""The seeds' three architectures and ResNet-20, buildable with any posterior.

* ``mlp``: the first seed's MNIST network, 784-100-10 (hidden sizes configurable).
* ``covnet``: the second seed's MNIST CovNet (Table 1): conv5x5(6)-pool-conv5x5(16)-pool-fc(10).
* ``lenet5``: the second seed's CIFAR-10 LeNet-5 (Table 1):
  conv5x5(6)-pool-conv5x5(16)-pool-fc120-fc84-fc10.
* ``resnet20``: He et al. 2016's CIFAR ResNet-20 (Sec. 4.2): conv3x3(16)-BN-ReLU, three stages of
  three basic blocks (16, 32, 64 channels; the 2nd and 3rd stage halve the side with stride 2),
  global average pooling, fc(10). Where a block changes the shape, the shortcut is a 1x1 convolution
  with stride + BatchNorm (the paper's option B; its CIFAR net used option A, zero padding, which
  has no parameters). Convolutions have no bias (BatchNorm's shift takes its place). Any input side
  works (28x28 -> 7x7, 32x32 -> 8x8 before pooling).

``posterior="MAP"`` builds plain ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm2d`` layers (the
deterministic baseline trained with Adam or SGD); ``"FFG"`` / ``"MVG"`` build the Bayesian layers
(BatchNorm: ``BayesianBatchNorm2d``, a diagonal posterior in both).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bayesian_layers import (
    BAYESIAN_POSTERIORS,
    BayesianBatchNorm2d,
    BayesianConv2d,
    BayesianLinear,
    bayesian_norm,
)

ARCHS = ("mlp", "covnet", "lenet5", "resnet20")
#: the architectures with normalisation layers: their optimizers take the classes' ``normalized_defaults``
NORMALIZED_ARCHS = ("resnet20",)
#: what ``build_model(posterior=...)`` (and ``--model``) takes: the Bayesian layers' posteriors and MAP
POSTERIORS = (*BAYESIAN_POSTERIORS, "MAP")


def _layers(posterior: str) -> tuple:
    """``(linear, conv, batchnorm2d)`` constructors for ``posterior``."""
    if posterior == "MAP":
        return nn.Linear, nn.Conv2d, nn.BatchNorm2d
    if posterior in BAYESIAN_POSTERIORS:
        return (partial(BayesianLinear, posterior=posterior), partial(BayesianConv2d, posterior=posterior),
                BayesianBatchNorm2d)
    raise ValueError(f"posterior must be MAP, FFG or MVG, got {posterior!r}")


def _conv_out(size: int, kernel: int) -> int:
    return size - kernel + 1


def build_model(arch: str, posterior: str, in_channels: int, image_size: int, num_classes: int,
                hidden: Sequence[int] = (100,)) -> nn.Module:
    """Build ``arch`` with Bayesian (``FFG``/``MVG``) or deterministic (``MAP``) layers."""
    linear, conv, norm = _layers(posterior)
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
    if arch == "resnet20":
        return ResNet(conv, norm, linear, in_channels, num_classes, blocks_per_stage=3)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


class BasicBlock(nn.Module):
    """He et al. 2016's basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, conv, norm, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:  # option B: 1x1 projection
            self.shortcut = nn.Sequential(OrderedDict(
                conv=conv(in_planes, planes, 1, stride=stride, bias=False), bn=norm(planes)))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with ``6 * blocks_per_stage + 2`` layers (3 blocks: ResNet-20)."""

    def __init__(self, conv, norm, linear, in_channels: int, num_classes: int, blocks_per_stage: int = 3,
                 widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = norm(widths[0])
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(conv, norm, in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def bayesianize(model: nn.Module, posterior: str) -> nn.Module:
    """Replace, recursively and in place, every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by its
    Bayesian twin, and every BatchNorm/LayerNorm/GroupNorm with affine parameters by its Bayesian
    twin (a diagonal posterior, in both ``FFG`` and ``MVG``).

    Parameters and buffers are copied, so an existing (e.g. pretrained) network becomes the
    posterior mean. Works on any module tree (e.g. ``torchvision.models.resnet18()``).
    """
    linear, conv, _ = _layers(posterior)
    for name, child in list(model.named_children()):
        new = None
        if type(child) is nn.Linear:
            new = linear(child.in_features, child.out_features, bias=child.bias is not None)
        elif type(child) is nn.Conv2d:
            if child.groups != 1 or child.padding_mode != "zeros":
                raise ValueError(f"layer {name}: only groups=1 and zero padding are supported")
            new = conv(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                       padding=child.padding, dilation=child.dilation, bias=child.bias is not None)
        elif posterior != "MAP" and (norm := bayesian_norm(child)) is not None:
            setattr(model, name, norm)
            continue
        if new is None:
            bayesianize(child, posterior)
            continue
        new.to(child.weight)
        new.load_state_dict(child.state_dict(), strict=False)
        setattr(model, name, new)
    return model
