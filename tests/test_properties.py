"""Property-based: the curvature hooks equal the naive per-example references for random
Conv2d/Linear shapes (kernel, stride, padding, dilation, bias, batch, channels, image size)."""

from __future__ import annotations

import torch
from conftest import assert_kronecker_factors_match_loop, assert_sum_grad_squared_matches_loop
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import conv_output_size
from torch import nn


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
    assert_sum_grad_squared_matches_loop(*build(p))


@settings(max_examples=25, deadline=None)
@given(conv_problems())
def test_kronecker_factors_match_naive(p):
    assert list(assert_kronecker_factors_match_loop(*build(p))) == ["0", "3"]
