"""Evaluation of the MC predictive: accuracy, log loss, calibration, OOD detection.

The predictive of an evaluation is the standard S-sample posterior predictive over S networks drawn once:
network ``s`` is the posterior sample seeded by ``sample_seed(seed, epoch, s)`` (``models.weight_samples``), and
every image, of the test set and of an OOD set alike, is scored under the same S networks. So a result does not
depend on the batch size, the number of ranks or the order of the images; the batch size is only a speed
setting (:func:`default_eval_batch_size`). The loop runs over the samples, then the batches: each network is
drawn once and dropped after its pass, so memory holds one sample and the N x K accumulator.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import bayesian_layers
from models.weight_samples import draw_noise, fixed_sample
from util import distributed
from util.metrics import accuracy, auroc, ece, nll, predictive_entropy

#: examples per evaluation forward and CPU thread: small enough that each core's share of a batch's activations
#: stays in its cache (a speed setting only: the predictive does not depend on it)
CPU_EVAL_BATCH_SIZE_PER_THREAD = 64
#: examples per evaluation forward on a GPU: large, so that a forward fills the device
GPU_EVAL_BATCH_SIZE = 4096


def default_eval_batch_size(device: torch.device | str, threads: int | None = None) -> int:
    """The evaluation batch size of ``device`` when ``--eval_batch_size`` is not given (CPU: per thread of
    ``threads``, default torch's intra-op threads)."""
    if torch.device(device).type != "cpu":
        return GPU_EVAL_BATCH_SIZE
    return CPU_EVAL_BATCH_SIZE_PER_THREAD * (threads or torch.get_num_threads())


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of network ``index`` of the evaluation after epoch ``epoch`` of a run seeded ``seed``.

    The three numbers hashed (SHA-256, 63 bits): distinct triples give unrelated seeds.
    """
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _logits(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    if images.shape[0] == 0:  # an empty shard: one forward only for the number of classes
        return model(images.new_zeros((1, *images.shape[1:])))[:0]
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, samples: int, seed: int = 0, epoch: int = 0,
            batch_size: int | None = None, ctx: distributed.DistContext | None = None) -> Tensor:
    """Predictive probabilities ``mean_s softmax(f(x; w_s))`` over the S = ``samples`` networks of
    ``(seed, epoch)`` (``samples=0`` or a model without Bayesian layers: the mean weights).

    In eval mode (BatchNorm: running statistics), as a log-mean-exp of log-softmax (no underflow of tiny
    probabilities). With ``ctx`` of several ranks each rank scores its slice of ``images`` and every rank
    returns all rows. The global RNG is not used.
    """
    ctx = ctx or distributed.DistContext()
    batch_size = batch_size or default_eval_batch_size(images.device)
    lo, hi = distributed.shard(images.shape[0], ctx)
    part = images[lo:hi]
    was_training = model.training
    model.eval()
    try:
        if samples <= 0 or not bayesian_layers(model):
            probs = F.softmax(_logits(model, part, batch_size), dim=-1)
        else:
            total = None
            for s in range(samples):
                generator = torch.Generator().manual_seed(sample_seed(seed, epoch, s))
                with fixed_sample(draw_noise(model, generator)):
                    logp = F.log_softmax(_logits(model, part, batch_size), dim=-1)
                total = logp if total is None else torch.logaddexp(total, logp)
            probs = (total - math.log(samples)).exp()
    finally:
        model.train(was_training)
    return distributed.assemble(probs, lo, images.shape[0], ctx)


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, samples: int, seed: int = 0, epoch: int = 0,
             batch_size: int | None = None, ctx: distributed.DistContext | None = None
             ) -> tuple[dict[str, float], Tensor]:
    """Accuracy, NLL (log loss) and ECE (15 bins) of :func:`predict`'s predictive; also returns the probabilities."""
    probs = predict(model, images, samples, seed, epoch, batch_size, ctx)
    metrics = {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}
    return metrics, probs


def ood_auroc(probs_in: Tensor, probs_out: Tensor) -> float:
    """AUROC of predictive entropy for telling out-of-distribution (positive) from in-distribution inputs."""
    return auroc(predictive_entropy(probs_out), predictive_entropy(probs_in))
