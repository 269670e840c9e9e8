"""Property-based: the curvature hooks equal the naive per-example references for random
Conv2d/Linear shapes (kernel, stride, padding, dilation, bias, batch, channels, image size)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import conv_output_size, naive_kronecker_factors, naive_sum_grad_squared
from torch import nn

import optimizers


@st.composite
def conv_problems(draw):
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # smallest image with at least one output location in each direction
    size = [draw(st.integers(max(1, d * (kk - 1) + 1 - 2 * p), max(1, d * (kk - 1) + 1 - 2 * p) + 4))
            for kk, p, d in zip(k, padding, dilation)]
    return dict(
        k=k, stride=stride, padding=padding, dilation=dilation, size=size,
        conv_bias=draw(st.booleans()), linear_bias=draw(st.booleans()),
        batch=draw(st.integers(1, 7)), c_in=draw(st.integers(1, 3)), c_out=draw(st.integers(1, 3)),
        classes=draw(st.integers(2, 4)), seed=draw(st.integers(0, 2**16)),
    )


def build(p):
    torch.manual_seed(p["seed"])
    conv = nn.Conv2d(p["c_in"], p["c_out"], p["k"], stride=p["stride"], padding=p["padding"],
                     dilation=p["dilation"], bias=p["conv_bias"])
    oh, ow = (conv_output_size(s, k, st_, pd, d) for s, k, st_, pd, d in
              zip(p["size"], p["k"], p["stride"], p["padding"], p["dilation"]))
    assert oh >= 1 and ow >= 1
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(p["c_out"] * oh * ow, p["classes"],
                                                                   bias=p["linear_bias"])).double()
    x = torch.randn(p["batch"], p["c_in"], *p["size"], dtype=torch.float64)
    y = torch.randint(0, p["classes"], (p["batch"],))
    return model, x, y


@settings(max_examples=25, deadline=None)
@given(conv_problems())
def test_sum_grad_squared_matches_naive(p):
    model, x, y = build(p)
    got = optimizers.sum_grad_squared(model, x, y)
    ref = naive_sum_grad_squared(model, x, y)
    assert list(got) == list(ref) == [n for n, _ in model.named_parameters()]
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-14, msg=name)
    assert all(q.grad is None for q in model.parameters())


@settings(max_examples=25, deadline=None)
@given(conv_problems())
def test_kronecker_factors_match_naive(p):
    model, x, y = build(p)
    got = optimizers.kronecker_factors(model, x, y)
    ref = naive_kronecker_factors(model, x, y)
    assert list(got) == list(ref) == ["0", "3"]
    for name in ref:
        for which, g, r in zip("AS", got[name], ref[name]):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-14, msg=f"{name} {which}")
