"""The seeds' networks compute what their papers describe: ``build_model``'s forward pass (MAP, and
the Bayesian layers at their means) equals the network written here with ``torch.nn.functional``
from the parameters, layer by layer (Zhang et al. 2018 MNIST MLP; Osawa et al. 2019, Table 1:
CovNet and LeNet-5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models


def mlp(p: dict, x: torch.Tensor, n_layers: int) -> torch.Tensor:
    h = x.flatten(1)
    for i in range(1, n_layers + 1):
        h = F.linear(h, p[f"fc{i}.weight"], p[f"fc{i}.bias"])
        if i < n_layers:
            h = F.relu(h)
    return h


def conv_pool(p: dict, x: torch.Tensor) -> torch.Tensor:
    """conv5x5(6) - relu - maxpool 2 - conv5x5(16) - relu - maxpool 2 - flatten."""
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"])), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"])), 2)
    return h.flatten(1)


def covnet(p: dict, x: torch.Tensor) -> torch.Tensor:
    return F.linear(conv_pool(p, x), p["fc1.weight"], p["fc1.bias"])


def lenet5(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = F.relu(F.linear(conv_pool(p, x), p["fc1.weight"], p["fc1.bias"]))
    h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
    return F.linear(h, p["fc3.weight"], p["fc3.bias"])


CASES = {
    "mlp_mnist": ("mlp", 1, 28, lambda p, x: mlp(p, x, 2), (100,)),
    "mlp_deeper": ("mlp", 1, 28, lambda p, x: mlp(p, x, 3), (50, 30)),
    "covnet_mnist": ("covnet", 1, 28, covnet, None),
    "lenet5_cifar": ("lenet5", 3, 32, lenet5, None),
}


@pytest.mark.parametrize("posterior", ["MAP", "FFG", "MVG"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_the_papers_network(case, posterior):
    arch, c, s, ref, hidden = CASES[case]
    torch.manual_seed(0)
    model = models.build_model(arch, posterior, c, s, 10, **({"hidden": hidden} if hidden else {})).eval()
    params = dict(model.named_parameters())
    x = torch.randn(4, c, s, s)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(params, x), rtol=1e-5, atol=1e-6)
    n_weights = {"mlp_mnist": 784 * 100 + 100 + 100 * 10 + 10, "mlp_deeper": 784 * 50 + 50 + 50 * 30 + 30 + 310,
                 "covnet_mnist": 156 + 2416 + 256 * 10 + 10,
                 "lenet5_cifar": 456 + 2416 + 400 * 120 + 120 + 120 * 84 + 84 + 850}[case]
    assert sum(p.numel() for p in params.values()) == n_weights
