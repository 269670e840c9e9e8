"""Evaluation metrics on predictive probabilities (pure functions on tensors).

``probs`` is ``N x K`` (rows are predictive distributions, e.g. the average of
the softmax over Monte Carlo samples) and ``labels`` is ``N`` integer classes.
Scalar metrics return Python floats; per-example ones return tensors.
"""

from __future__ import annotations

import torch

__all__ = [
    "ECE_BINS",
    "accuracy",
    "auroc",
    "ece",
    "nll",
    "predictive_entropy",
    "reliability_bins",
]

_MIN_PROB = 1e-12
#: equal-width confidence bins of the ECE that train.py and test.py report (README: "ECE (15 bins)")
ECE_BINS = 15


def _check(probs: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty N x K tensor, got shape {tuple(probs.shape)}")
    if labels is not None and labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {tuple(labels.shape)}")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose most probable class is the label."""
    _check(probs, labels)
    return (probs.argmax(dim=1) == labels).double().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor, min_prob: float = _MIN_PROB) -> float:
    """Mean of ``-log p(label)``, with ``p`` clamped to ``>= min_prob`` (finite for p = 0)."""
    _check(probs, labels)
    p = probs.double().gather(1, labels.long().view(-1, 1)).squeeze(1)
    return (-p.clamp_min(min_prob).log()).mean().item()


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-example entropy ``-sum_k p_k log p_k`` (nats; 0 log 0 = 0), shape ``N``."""
    _check(probs)
    p = probs.double().clamp_min(0)
    return -torch.special.xlogy(p, p).sum(dim=1)


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> dict[str, list[float] | list[int]]:
    """Equal-width confidence bins for a reliability diagram.

    Bin ``b`` holds the examples with confidence (max probability) in
    ``(b / bins, (b + 1) / bins]`` (confidence 0 goes to bin 0).  Returns plain
    lists (JSON-ready): ``edges`` (bins + 1), and per bin ``confidence`` (mean
    max probability), ``accuracy`` and ``count``; empty bins have count 0 and
    confidence/accuracy 0.0.
    """
    _check(probs, labels)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    conf, pred = probs.double().max(dim=1)
    correct = (pred == labels).double()
    idx = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(idx, minlength=bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=bins)
    denom = count.clamp_min(1).double()
    return {
        "edges": torch.linspace(0, 1, bins + 1, dtype=torch.float64).tolist(),
        "confidence": (conf_sum / denom).tolist(),
        "accuracy": (acc_sum / denom).tolist(),
        "count": count.tolist(),
    }


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b (n_b / N) |acc_b - conf_b|`` over equal-width bins."""
    r = reliability_bins(probs, labels, bins)
    n = float(sum(r["count"]))
    return float(
        sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["accuracy"], r["confidence"]))
    )


def auroc(scores_pos: torch.Tensor, scores_neg: torch.Tensor) -> float:
    """Area under the ROC curve for "positive scores are higher".

    Rank-based (Mann-Whitney U): the probability that a random positive scores
    above a random negative, counting ties as 1/2.
    """
    pos = scores_pos.detach().double().flatten().cpu()
    neg = scores_neg.detach().double().flatten().cpu()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    if torch.isnan(pos).any() or torch.isnan(neg).any():
        raise ValueError("auroc got NaN scores")
    both = torch.cat([pos, neg])
    _, inverse, counts = torch.unique(both, sorted=True, return_inverse=True, return_counts=True)
    # average (1-based) rank of each distinct value: ranks before it + (count + 1) / 2
    before = torch.cumsum(counts, 0) - counts
    avg_rank = before.double() + (counts.double() + 1) / 2
    rank_sum_pos = avg_rank[inverse[: pos.numel()]].sum().item()
    n_pos, n_neg = pos.numel(), neg.numel()
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
