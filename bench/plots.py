"""Plots of ``bench/accuracy.py``'s results (matplotlib, written as PNG).

* ``curves``: test accuracy and test log loss vs epoch, one line per method: the mean over
  seeds, with a band of +- one standard deviation.
* ``reliability``: one reliability diagram per method (15 equal-width confidence bins, the
  bins of all seeds pooled), with the per-bin gap to the diagonal and the pooled ECE.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

#: one colour per method, the same in every figure
COLORS = {"Adam": "tab:gray", "NoisyAdam": "tab:blue", "NoisyKFAC": "tab:green", "VOGN": "tab:orange",
          "IVON": "tab:purple"}


def _mean_std(curves: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds at each epoch (seeds cut short by a divergence are left out where they stop, and
    epochs that were not scored, None, are left out)."""
    length = max(len(c) for c in curves)
    mean, std = np.full(length, np.nan), np.zeros(length)
    for e in range(length):
        vals = np.array([c[e] for c in curves if len(c) > e and c[e] is not None and math.isfinite(c[e])])
        if len(vals):
            mean[e] = vals.mean()
            std[e] = vals.std(ddof=1) if len(vals) > 1 else 0.0
    return np.arange(1, length + 1), mean, std


def curves(title: str, runs: dict[str, list[dict]], path: str | Path) -> Path:
    """``runs[method]`` = that method's runs (each with ``curves.test_acc`` / ``curves.test_nll``)."""
    fig, (ax_acc, ax_nll) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, rs in runs.items():
        if not rs:
            continue
        color = COLORS.get(method)
        for ax, key, scale in ((ax_acc, "test_acc", 100.0), (ax_nll, "test_nll", 1.0)):
            epochs, mean, std = _mean_std([[None if v is None else v * scale for v in r["curves"][key]] for r in rs])
            label = f"{method} (n={len(rs)})"
            ax.plot(epochs, mean, marker="o", markersize=3, color=color, label=label)
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (higher is better)")
    ax_nll.set(xlabel="epoch", ylabel="test log loss (NLL, nats)", title="test log loss (lower is better)")
    last_epoch = max((len(r["curves"]["test_acc"]) for rs in runs.values() for r in rs), default=1)
    for ax in (ax_acc, ax_nll):
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.set_xticks(range(1, last_epoch + 1))
    _zoom(ax_acc, high=True)
    _zoom(ax_nll, high=False)
    ax_nll.legend(fontsize=8)
    fig.suptitle(f"{title}: mean over seeds, band = +-1 std")
    fig.tight_layout()
    return _save(fig, path)


def _zoom(ax, high: bool) -> None:
    """Limit the y-axis to where the methods end up (first-epoch outliers would flatten the rest)."""
    lines = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    ys = np.concatenate(lines) if lines else np.array([])
    ys = ys[np.isfinite(ys)]
    last = np.array([y[np.isfinite(y)][-1] for y in lines if np.isfinite(y).any()])
    if len(ys) < 2:
        return
    if high:  # every method's final value stays in view
        lo, hi = min(np.percentile(ys, 10), last.min()), ys.max()
    else:
        lo, hi = ys.min(), max(np.percentile(ys, 90), last.max())
    pad = 0.15 * (hi - lo) + 1e-9
    ax.set_ylim(lo - pad if high else max(0.0, lo - pad), hi + pad)


def pool_bins(bins: list[dict]) -> dict:
    """Reliability bins of several seeds pooled: counts add, accuracy/confidence are count-weighted."""
    count = np.sum([b["count"] for b in bins], axis=0).astype(float)
    acc = np.sum([np.array(b["accuracy"]) * b["count"] for b in bins], axis=0)
    conf = np.sum([np.array(b["confidence"]) * b["count"] for b in bins], axis=0)
    denom = np.maximum(count, 1)
    return {"edges": bins[0]["edges"], "count": count, "accuracy": acc / denom, "confidence": conf / denom}


def reliability(title: str, bins: dict[str, list[dict]], path: str | Path) -> Path:
    """``bins[method]`` = the reliability bins (``util.metrics.reliability_bins``) of each seed."""
    methods = [m for m, b in bins.items() if b]
    n = max(len(methods), 1)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        p = pool_bins(bins[method])
        edges = np.array(p["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        used = p["count"] > 0
        total = p["count"].sum()
        ece = float(np.sum(p["count"] / total * np.abs(p["accuracy"] - p["confidence"])))
        ax.bar(centers[used], p["accuracy"][used], width=width[used], color=COLORS.get(method, "tab:blue"),
               edgecolor="black", linewidth=0.5, label="accuracy")
        gap_lo = np.minimum(p["accuracy"], p["confidence"])[used]
        gap = np.abs(p["accuracy"] - p["confidence"])[used]
        ax.bar(centers[used], gap, bottom=gap_lo, width=width[used], facecolor="none",
               edgecolor="tab:red", hatch="////", linewidth=0.8, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{method}\nECE {ece:.4f} (pooled)")
        ax.text(0.03, 0.93, f"{int(total)} predictions\n{p['count'][-1] / total:.0%} in the top bin",
                transform=ax.transAxes, fontsize=7, va="top")
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("accuracy in bin")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout()
    fig.suptitle(f"{title}: reliability diagrams (test set, 15 bins, seeds pooled)", y=1.04)
    # below the panels (the PNG is cropped to its contents, so nothing outside is lost)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
