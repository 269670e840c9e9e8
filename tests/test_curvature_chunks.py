"""The per-example statistics when the batch is split into several chunks, and convolutions whose
stride differs from their dilation, on fixed inputs against the naive float64 loops of ``reference``.

The chunk bounds of ``optimizers.curvature`` are made small (one example per chunk, and chunks of
2-3 with a shorter last one), so the accumulation over chunks is exercised without a large batch,
for the per-example squares and for the Kronecker factor A.
"""

from __future__ import annotations

import pytest
import torch
from reference import naive_kronecker_factors, naive_sum_grad_squared
from torch import nn

import optimizers
from optimizers import curvature

RTOL, ATOL = 1e-6, 1e-14


@pytest.fixture(autouse=True)
def _float64(float64):
    yield


def conv_net(bias: bool) -> nn.Module:
    """conv (stride (2, 1), dilation (1, 2), padding (1, 0)) - relu - conv (stride 2, dilation 1) - linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=bias),  # 9x8 -> 5x6
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, stride=2, dilation=1, padding=1, bias=bias),  # -> 3x4
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 4, 5, bias=bias),
    )


def wide_conv_net(bias: bool) -> nn.Module:
    """Convolutions on small maps with many channels (kw C_in > 8 W_out: the NHWC patch layout), then one without."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(12, 4, 3, stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=bias),  # 7x6 -> 7x3, NHWC
        nn.ReLU(),
        nn.Conv2d(4, 3, 2, bias=bias),  # -> 6x2, kw C_in = 8 < 8 W_out: NCHW
        nn.Flatten(),
        nn.Linear(3 * 6 * 2, 5, bias=bias),
    )


def sequence_net(bias: bool) -> nn.Module:
    """A linear layer on (B, T, in) inputs (T = 4 patches per example), then a linear classifier."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 5, bias=bias))


def data(shape):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(7, *shape, generator=gen), torch.randint(0, 5, (7,), generator=gen)


CHUNKS = {"one_example_per_chunk": 1, "chunks_of_3": 3, "one_chunk": None}


def set_chunks(monkeypatch, model: nn.Module, per_chunk: int | None) -> None:
    """Bound the chunks so that the first layer takes ``per_chunk`` examples at a time."""
    if per_chunk is None:
        return
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    n_in = first.weight[0].numel()
    monkeypatch.setattr(curvature, "_CHUNK_ELEMENTS", per_chunk * first.weight.shape[0] * n_in)
    monkeypatch.setattr(curvature, "_GRAD_CHUNK_ELEMENTS", per_chunk * first.weight.shape[0] * n_in)
    t = 21 if getattr(first, "in_channels", None) == 12 else 30  # T of the first conv: wide_conv_net, conv_net
    monkeypatch.setattr(curvature, "_PATCH_CHUNK_ELEMENTS", per_chunk * n_in * t)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("net", ["conv_net", "wide_conv_net"])
def test_sum_grad_squared_conv_in_chunks(monkeypatch, chunks, bias, net):
    model, x_shape = {"conv_net": (conv_net, (2, 9, 8)), "wide_conv_net": (wide_conv_net, (12, 7, 6))}[net]
    model = model(bias)
    x, y = data(x_shape)
    set_chunks(monkeypatch, model, CHUNKS[chunks])
    got = optimizers.sum_grad_squared(model, x, y)
    ref = naive_sum_grad_squared(model, x, y)
    assert list(got) == list(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("bias", [True, False])
def test_sum_grad_squared_linear_patches_in_chunks(monkeypatch, chunks, bias):
    model = sequence_net(bias)
    x, y = data((4, 3))
    set_chunks(monkeypatch, model, CHUNKS[chunks])
    got = optimizers.sum_grad_squared(model, x, y)
    ref = naive_sum_grad_squared(model, x, y)
    assert list(got) == list(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("net", ["conv_net", "wide_conv_net"])
def test_kronecker_factors_conv_in_chunks(monkeypatch, chunks, bias, net):
    """A of a convolution summed over chunks of the batch (stride != dilation, padding), against the float64 loop."""
    model, x_shape = {"conv_net": (conv_net, (2, 9, 8)), "wide_conv_net": (wide_conv_net, (12, 7, 6))}[net]
    model = model(bias)
    x, y = data(x_shape)
    set_chunks(monkeypatch, model, CHUNKS[chunks])
    got = optimizers.kronecker_factors(model, x, y)
    ref = naive_kronecker_factors(model, x, y)
    assert list(got) == list(ref) == (["0", "2", "5"] if net == "conv_net" else ["0", "2", "4"])
    for name in ref:
        for which, g, r in zip("AS", got[name], ref[name]):
            torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL, msg=f"{name} {which}")
