"""Noisy K-FAC on convolutions and bias-free layers, with one or several MC samples per step,
against the hand-written float64 step of ``reference.NoisyKFACReference`` (docs/MATH.md, "Noisy K-FAC").

The reference never uses the library's matrix view of a layer: a convolution's matrix is
``weight.reshape(out, C_in kh kw)`` (row-major, the order of ``reference.conv_patches``) with the
bias as the last column; the forward pass at a sampled matrix reshapes it back the same way. The
gradient and the factors come from a loop over single examples and explicit patches. With several
samples per step, ``G`` and the factors are the means over the samples and the prior term is taken at
the mean of the samples' weights (``M + mean_s noise_s``).

The net: conv (3x2 kernel, stride (2, 1), padding (1, 0), dilation (1, 2), bias) - tanh - conv (2x2,
padding 1, dilation (2, 1), no bias) - tanh - flatten - linear (no bias) - tanh - linear (bias).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_noisy_kfac_follows_reference
from reference import NoisyKFACReference
from torch import nn

from models import BayesianConv2d, BayesianLinear
from optimizers import NoisyKFAC


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    conv1 = BayesianConv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=True, posterior="MVG")
    conv2 = BayesianConv2d(3, 2, 2, padding=1, dilation=(2, 1), bias=False, posterior="MVG")
    net = nn.Sequential(conv1, nn.Tanh(), conv2, nn.Tanh(), nn.Flatten(),  # 2x7x6 -> 3x4x4 -> 2x4x5
                        BayesianLinear(40, 4, bias=False, posterior="MVG"), nn.Tanh(),
                        BayesianLinear(4, 3, bias=True, posterior="MVG"))
    return net.double()


def data(b: int = 5):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, 2, 7, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0][:b])


def layers_of(net: nn.Sequential) -> list[nn.Module]:
    return [net[0], net[2], net[5], net[7]]


COMMON = dict(lr=0.1, num_data=20, kl_weight=0.5, prior_var=2.0, stat_decay=0.8, init_precision=10.0)
#: conv_stats_stride 1: A from every conv location; 2: from one of the 4 location grids per statistics step
CONFIGS = {
    "factored": dict(damping_mode="factored", damping=0.01, momentum=0.9, kl_clip=None, t_stats=1, t_inv=1,
                     conv_stats_stride=1),
    "factored_clip_tstats2_tinv2": dict(damping_mode="factored", damping=0.05, momentum=0.5, kl_clip=1e-3,
                                        t_stats=2, t_inv=2, conv_stats_stride=2),
    "factored_tstats3_tinv3": dict(damping_mode="factored", damping=0.05, momentum=0.9, kl_clip=None,
                                   t_stats=3, t_inv=3, conv_stats_stride=2),
    "exact": dict(damping_mode="exact", damping=0.01, momentum=0.9, kl_clip=None, t_stats=1, t_inv=1,
                  conv_stats_stride=2),
    "exact_clip_tinv2": dict(damping_mode="exact", damping=0.0, momentum=0.0, kl_clip=1e-3, t_stats=1, t_inv=2,
                             conv_stats_stride=1),
}
#: MC samples (forward/backward passes) before each of the steps
SAMPLES = {"one_sample": (1, 1, 1, 1, 1, 1), "several_samples": (2, 1, 3, 1, 2, 1)}


@pytest.mark.parametrize("samples", list(SAMPLES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_noisy_kfac_conv_and_bias_free_layers_match_reference(float64, config, samples):
    kw = {**COMMON, **CONFIGS[config]}
    net = make_net()
    layers = layers_of(net)
    opt = NoisyKFAC(net, **kw)
    assert_noisy_kfac_follows_reference(net, layers, opt, NoisyKFACReference(layers, **kw), *data(),
                                        SAMPLES[samples], seed=300)
