"""One training step and one epoch, as ``train.py`` runs them and ``bench/accuracy.py`` reuses them.

:func:`train_step` is one optimizer step: ``samples`` forward/backward passes (Monte-Carlo samples; in train
mode each forward draws fresh weights), the sampled-label pass of the true Fisher, the baselines' cross-rank
gradient average (the natural-gradient optimizers average inside ``step``), then ``optimizer.step()``.
:func:`train_epoch` loops it over a loader, keeping each step's loss and correct count on the device
(:class:`StepRecords`, read once per ``log_interval`` steps) and stopping with :class:`Diverged` at the first
non-finite loss on any rank. Also here: resuming (:func:`restore`) and the one-rank-per-machine download.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from data import ensure_data
from models import bayesian_layers
from optimizers import NGVIOptimizer, NoisyKFAC
from util import distributed
from util.checkpoint import load_checkpoint, set_rng_state
from util.errors import UserError
from util.run_dir import RunDir


class Diverged(UserError):
    """The loss or the weights became non-finite."""


def posterior_summaries(model, optimizer) -> tuple[dict, dict]:
    """Marginal posterior std of every Bayesian layer, and the K-FAC factors' eigenvalues."""
    stds = {name: layer.weight_std().flatten().cpu() for name, layer in bayesian_layers(model)}
    spectra = {}
    if isinstance(optimizer, NoisyKFAC):
        for name, (A, S) in optimizer.kronecker_factors().items():
            spectra[f"{name}.A"] = torch.linalg.eigvalsh(A.double()).cpu()
            spectra[f"{name}.S"] = torch.linalg.eigvalsh(S.double()).cpu()
    return stds, spectra


def objective_record(optimizer: NGVIOptimizer, train_loss: float) -> dict:
    """The ELBO's terms after an epoch (``elbo``, ``expected_loglik``, ``kl``) and, when eta is learned, ``prior_var``.

    ``expected_loglik = -N train_loss``: each step's loss, at that step's batch and weight sample, is an unbiased
    estimate of ``E_q[mean loss]`` under the step's posterior, so the epoch's mean training loss estimates
    ``E_q[log p(D | w)] / (-N)`` averaged over the epoch's posteriors, at no extra forward pass. The KL term is
    the closed form at the epoch's end (docs/MATH.md, "The ELBO").
    """
    out = optimizer.elbo(train_loss)
    if optimizer.learns_prior:
        out["prior_var"] = optimizer.prior_variances()
    return out


class StepRecords:
    """Each step's loss and correct count, kept on the device and read once per logging interval.

    Reading a number from a GPU waits for all queued work; here that happens once per
    ``--log_interval`` steps instead of several times per step.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.loss = torch.zeros(size, dtype=torch.float64, device=device)
        self.correct = torch.zeros(size, dtype=torch.int64, device=device)
        self.sizes: list[int] = []
        self.first_step = 1

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        if not self.sizes:
            self.first_step = step
        i = len(self.sizes)
        self.loss[i] = loss.detach()
        self.correct[i] = (logits.argmax(1) == y).sum()
        self.sizes.append(len(y))

    def read(self) -> list[tuple[float, int, int]]:
        """``(loss, correct, batch size)`` of the steps since the last read (one device sync)."""
        n = len(self.sizes)
        out = list(zip(self.loss[:n].tolist(), self.correct[:n].tolist(), self.sizes))
        self.sizes = []
        return out


def account(records: StepRecords, totals: tuple[dict, ...], epoch: int, ctx: distributed.DistContext,
            run: RunDir | None) -> None:
    """Add the steps since the last read to ``totals``; :class:`Diverged` at the first non-finite loss (any rank)."""
    first = records.first_step
    entries = records.read()
    bad = next((first + i for i, (v, _, _) in enumerate(entries) if not math.isfinite(v)), math.inf)
    bad = distributed.min_over_ranks(bad, ctx)
    if bad != math.inf:
        step = int(bad)
        where = f"{run.last_good()}; " if run is not None else ""
        raise Diverged(f"training diverged at epoch {epoch}, step {step} (loss = {entries[step - first][0]}); "
                       f"{where}lower --lr or raise --damping")
    for value, correct, size in entries:
        for acc in totals:
            acc["loss"] += value * size
            acc["correct"] += correct
            acc["seen"] += size


def latest_checkpoint(run: RunDir, ctx: distributed.DistContext) -> tuple[Path, dict]:
    """The path and contents of the run's latest checkpoint, read by rank 0 and sent to every rank.

    Only rank 0 writes checkpoints, so on several machines without a shared filesystem the others have none;
    and one with an older copy must not resume from it. Rank 0's error (no checkpoint, a corrupted one) stops
    every rank with the same line.
    """
    found: tuple[str, dict] | str
    if ctx.is_main:
        try:
            epoch = run.latest_epoch()
            if epoch is None:
                raise UserError(f"--resume: rank 0 finds no checkpoints in {run.path} (removed?)")
            found = (str(run.checkpoint(epoch)), load_checkpoint(run.checkpoint(epoch), map_location="cpu"))
        except UserError as e:
            found = str(e)
    else:
        found = ""
    found = distributed.broadcast_object(found, ctx)
    if isinstance(found, str):
        raise UserError(found)
    return Path(found[0]), found[1]


def restore(path: Path, model, optimizer, scheduler, ctx: distributed.DistContext, device: torch.device,
            seed: int, ckpt: dict | None = None) -> dict:
    """Load ``path`` (or its contents ``ckpt``) into the model, optimizer and schedule, and this rank's RNG state;
    return the checkpoint.

    Loaded onto the CPU: ``load_state_dict`` copies the weights and the optimizer's state to the parameters'
    device, the step counters stay on the CPU (read without a device sync), and the RNG states are CPU byte
    tensors as ``torch.set_rng_state`` needs.
    """
    if ckpt is None:
        ckpt = load_checkpoint(path, map_location="cpu")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"checkpoint {path} does not fit this run's model/optimizer "
                        f"({str(e).splitlines()[0][:120]}); resume with the options it was trained with") from None
    if ctx.rank < len(ckpt["rng"]):
        set_rng_state(ckpt["rng"][ctx.rank], device)
    else:  # resumed on more ranks than were saved: a new rank still draws its own noise
        torch.manual_seed(seed + 1000 * ctx.rank + ckpt["epoch"])
    return ckpt


def fetch_data(name: str, data_root: str | None, ctx: distributed.DistContext) -> None:
    """Download a missing data set on one rank per machine while the others wait (a barrier)."""
    error = None
    if ctx.local_rank == 0:
        try:
            ensure_data(name, data_root)
        except UserError as e:
            error = e
    if distributed.broadcast_flag(error is not None, ctx):
        raise error or UserError(f"{name} could not be downloaded (see the error of local rank 0); "
                                 "point --data_root at a folder that has it")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, samples: int = 1,
               before_step: Callable[[Tensor, Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
    """One optimizer step on the batch ``(x, y)``; returns the last pass's loss and logits (on the device).

    For a natural-gradient optimizer, ``samples`` forward/backward pairs are that many Monte-Carlo samples
    (their gradients and curvature statistics are averaged in ``step``); a baseline takes one pass, and its
    gradients are averaged over the ranks here. ``before_step(loss, logits)`` runs just before ``step()``.
    """
    bayesian = isinstance(optimizer, NGVIOptimizer)
    optimizer.zero_grad()
    for _ in range(samples if bayesian else 1):
        logits = model(x)  # train mode: a fresh weight sample per forward
        if bayesian:
            optimizer.true_fisher_backward(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
    if not bayesian:
        distributed.average_gradients(model)
    if before_step is not None:
        before_step(loss, logits)
    optimizer.step()
    return loss, logits


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader, epoch: int, run: RunDir | None,
                records: StepRecords, ctx: distributed.DistContext | None = None, samples: int = 1,
                log_interval: int = 100, on_log: Callable[[int, dict], None] | None = None,
                progress: str | None = None) -> dict:
    """Train one epoch; returns its ``loss``, ``acc`` (over all ranks' shards), ``seconds`` and ``steps``.

    Every ``log_interval`` steps ``on_log(step, window)`` gets the interval's mean ``loss`` and ``acc`` (rank 0
    logs them). ``progress``: the description of a progress bar (None: no bar). ``run``: the run folder that
    :class:`Diverged` names the last good checkpoint of (None: a run without checkpoints, e.g. a benchmark).
    """
    ctx = ctx or distributed.DistContext()
    model.train()
    loader.set_epoch(epoch)
    t0 = time.perf_counter()
    sums = {"loss": 0.0, "correct": 0, "seen": 0}
    window = {"loss": 0.0, "correct": 0, "seen": 0}
    bar = tqdm(loader, desc=progress, disable=progress is None, leave=False, file=sys.stdout, dynamic_ncols=True)
    step = 0
    for step, (x, y) in enumerate(bar, 1):
        try:
            train_step(model, optimizer, x, y, samples,
                       before_step=lambda loss, logits, step=step, y=y: records.add(step, loss, logits, y))
        except torch.linalg.LinAlgError:  # a non-finite loss of this interval reached the curvature factors
            account(records, (sums, window), epoch, ctx, run)
            raise
        if step % log_interval == 0:
            account(records, (sums, window), epoch, ctx, run)
            mean = {"loss": window["loss"] / window["seen"], "acc": window["correct"] / window["seen"]}
            if progress is not None:
                rate = sums["seen"] * ctx.world_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{mean['loss']:.3f}", acc=f"{mean['acc']:.3f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2e}", samples_s=f"{rate:.0f}")
            if on_log is not None:
                on_log(step, mean)
            window = {"loss": 0.0, "correct": 0, "seen": 0}
    account(records, (sums,), epoch, ctx, run)
    bar.close()
    seconds = time.perf_counter() - t0
    # the epoch's training loss and accuracy over all ranks' shards, not rank 0's alone
    loss_sum, correct, seen = distributed.sum_over_ranks([sums["loss"], sums["correct"], sums["seen"]], ctx)
    return {"loss": loss_sum / seen, "acc": correct / seen, "seconds": seconds, "steps": step}
