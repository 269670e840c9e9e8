"""Evaluation of the MC predictive: accuracy, log loss, calibration, OOD detection."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models import predictive
from util.metrics import accuracy, auroc, ece, nll, predictive_entropy

#: test examples per batch; each batch draws its own weight samples, so it is part of a result's definition
EVAL_BATCH_SIZE = 1000


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, samples: int, batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """Predictive probabilities ``mean_s softmax(f(x; w_s))`` (``samples=0``: the mean weights)."""
    return torch.cat([predictive(model, images[i:i + batch_size], samples)
                      for i in range(0, images.shape[0], batch_size)])


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, samples: int,
             batch_size: int = EVAL_BATCH_SIZE) -> tuple[dict[str, float], Tensor]:
    """Accuracy, NLL (log loss) and ECE (15 bins) of the predictive; also returns the probabilities."""
    probs = predict(model, images, samples, batch_size)
    metrics = {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}
    return metrics, probs


def ood_auroc(probs_in: Tensor, probs_out: Tensor) -> float:
    """AUROC of predictive entropy for telling out-of-distribution (positive) from in-distribution inputs."""
    return auroc(predictive_entropy(probs_out), predictive_entropy(probs_in))
