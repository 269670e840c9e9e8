"""Tests for util/metrics.py against hand computations and brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from util.metrics import accuracy, auroc, ece, nll, predictive_entropy, reliability_bins

P = torch.tensor([
    [0.7, 0.2, 0.1],   # pred 0, label 0: correct, conf 0.7
    [0.1, 0.5, 0.4],   # pred 1, label 2: wrong,   conf 0.5
    [0.3, 0.3, 0.4],   # pred 2, label 2: correct, conf 0.4
    [0.05, 0.9, 0.05],  # pred 1, label 0: wrong,  conf 0.9
])
Y = torch.tensor([0, 2, 2, 0])


def test_accuracy() -> None:
    assert accuracy(P, Y) == pytest.approx(0.5)
    assert accuracy(torch.eye(3), torch.tensor([0, 1, 2])) == 1.0


def test_nll_hand() -> None:
    expect = -(math.log(0.7) + math.log(0.4) + math.log(0.4) + math.log(0.05)) / 4
    assert nll(P, Y) == pytest.approx(expect)


def test_nll_zero_probability_is_finite() -> None:
    v = nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert math.isfinite(v) and v == pytest.approx(-math.log(1e-12))


def test_predictive_entropy() -> None:
    h = predictive_entropy(torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]]))
    torch.testing.assert_close(h, torch.tensor([math.log(4), 0.0, math.log(2)], dtype=torch.float64))


def test_ece_hand() -> None:
    # 2 bins: (0, .5] holds confs 0.5 (wrong), 0.4 (right): conf .45, acc .5
    #         (.5, 1] holds 0.7 (right), 0.9 (wrong):      conf .8,  acc .5
    expect = 0.5 * abs(0.5 - 0.45) + 0.5 * abs(0.5 - 0.8)
    assert ece(P, Y, bins=2) == pytest.approx(expect)
    # 15 bins: every example alone in its bin
    expect15 = (abs(1 - 0.7) + abs(0 - 0.5) + abs(1 - 0.4) + abs(0 - 0.9)) / 4
    assert ece(P, Y, bins=15) == pytest.approx(expect15)


def test_ece_perfect_calibration_is_zero() -> None:
    # confidence 1.0 and always right
    assert ece(torch.eye(4), torch.arange(4)) == 0.0
    # confidence 0.5 and right half of the time
    p = torch.tensor([[0.5, 0.5]] * 4)
    y = torch.tensor([0, 1, 0, 1])
    assert ece(p, y) == pytest.approx(0.0)


def test_reliability_bins_edges_and_counts() -> None:
    # bins of width 1/4, right-closed: conf .25 -> bin 0, .5 -> 1, .625 and .75 -> 2, 1.0 -> 3
    p = torch.tensor([
        [0.25, 0.25, 0.25, 0.25],   # conf .25, pred 0
        [0.5, 0.5, 0.0, 0.0],       # conf .5,  pred 0
        [0.125, 0.625, 0.125, 0.125],  # conf .625, pred 1
        [0.75, 0.25, 0.0, 0.0],     # conf .75, pred 0
        [0.0, 0.0, 0.0, 1.0],       # conf 1,   pred 3
    ], dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 3])
    r = reliability_bins(p, y, bins=4)
    assert r["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r["count"] == [1, 1, 2, 1]
    assert r["confidence"] == pytest.approx([0.25, 0.5, (0.625 + 0.75) / 2, 1.0])
    assert r["accuracy"] == pytest.approx([1.0, 0.0, 0.5, 1.0])
    expect = (abs(1 - 0.25) + abs(0 - 0.5) + 2 * abs(0.5 - 0.6875) + 0) / 5
    assert ece(p, y, bins=4) == pytest.approx(expect)
    empty = reliability_bins(p, y, bins=8)
    assert sum(empty["count"]) == 5 and empty["count"][0] == 0 and empty["confidence"][0] == 0.0


def _ece_reference(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> float:
    n = probs.shape[0]
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [
            i for i in range(n)
            if (lo < probs[i].max().item() <= hi) or (b == 0 and probs[i].max().item() == 0)
        ]
        if not members:
            continue
        conf = sum(probs[i].max().item() for i in members) / len(members)
        acc = sum(float(probs[i].argmax().item() == labels[i].item()) for i in members) / len(members)
        total += len(members) / n * abs(acc - conf)
    return total


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(2, 5), bins=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_ece_matches_reference(n: int, k: int, bins: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, k, generator=g, dtype=torch.float64), 1)
    labels = torch.randint(0, k, (n,), generator=g)
    assert ece(probs, labels, bins) == pytest.approx(_ece_reference(probs, labels, bins), abs=1e-9)


def _auroc_pairs(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_simple() -> None:
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    # 0.8 beats both, 0.4 ties with 0.4: (2 + 0.5) / 4
    assert auroc(torch.tensor([0.8, 0.4]), torch.tensor([0.6, 0.4])) == pytest.approx(0.625)


@settings(max_examples=60, deadline=None)
@given(
    pos=st.lists(st.integers(0, 6), min_size=1, max_size=25),
    neg=st.lists(st.integers(0, 6), min_size=1, max_size=25),
)
def test_auroc_matches_pair_count_with_ties(pos: list[int], neg: list[int]) -> None:
    got = auroc(torch.tensor(pos, dtype=torch.float32), torch.tensor(neg, dtype=torch.float32))
    assert got == pytest.approx(_auroc_pairs(pos, neg), abs=1e-12)


def test_auroc_rejects_empty_and_nan() -> None:
    with pytest.raises(ValueError):
        auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))


def test_shape_checks() -> None:
    with pytest.raises(ValueError):
        accuracy(torch.ones(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        nll(P, Y[:2])
