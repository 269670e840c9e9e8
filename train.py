"""Train a Bayesian neural network by natural-gradient variational inference.

    python train.py --model=FFG --batch_size=100 --lr=1e-3 --dataset=MNIST       # Noisy Adam
    python train.py --model=MVG --batch_size=100 --lr=1e-2 --dataset=MNIST --n=60000   # Noisy K-FAC
    python train.py --model=FFG --optimizer=vogn --arch=covnet                   # VOGN
    python train.py --model=MAP                                                   # Adam baseline

Each step samples weights from the posterior (the layers do it in train mode), back-propagates
the mini-batch loss while the optimizer's hooks capture the curvature, then ``optimizer.step()``
updates the means, the curvature and the posterior scale. Every epoch: evaluate the MC
predictive on the test set, append to ``<ckpt_dir>/<name>/metrics.jsonl``, stream to visdom,
and write ``epoch_<N>.pt`` atomically. ``--resume`` continues bit-for-bit (CPU).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import InMemoryLoader, ensure_data, load_split, take_subset
from models import bayesian_layers
from optimizers import NGVIOptimizer, NoisyKFAC
from option_parser import TrainOptions, print_options, save_options
from util import distributed
from util.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, rng_state, set_rng_state
from util.errors import UserError, run_cli
from util.evaluation import evaluate
from util.experiment import finite, make_model, make_optimizer, make_scheduler
from util.run_dir import RunDir
from util.visualizer import Visualizer


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
            run: RunDir) -> None:
    """Add the steps since the last read to ``totals``; :class:`Diverged` at the first non-finite loss (any rank)."""
    first = records.first_step
    entries = records.read()
    bad = next((first + i for i, (v, _, _) in enumerate(entries) if not math.isfinite(v)), math.inf)
    bad = distributed.min_over_ranks(bad, ctx)
    if bad != math.inf:
        step = int(bad)
        raise Diverged(f"training diverged at epoch {epoch}, step {step} (loss = {entries[step - first][0]}); "
                       f"{run.last_good()}; lower --lr or raise --damping")
    for value, correct, size in entries:
        for acc in totals:
            acc["loss"] += value * size
            acc["correct"] += correct
            acc["seen"] += size


def restore(path: Path, model, optimizer, scheduler, ctx: distributed.DistContext, device: torch.device,
            seed: int) -> dict:
    """Load ``path`` into the model, optimizer and schedule, and this rank's RNG state; return the checkpoint.

    Loaded onto the CPU: ``load_state_dict`` copies the weights and the optimizer's state to the parameters'
    device, the step counters stay on the CPU (read without a device sync), and the RNG states are CPU byte
    tensors as ``torch.set_rng_state`` needs.
    """
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


def main(argv: list[str] | None = None) -> None:
    opt = TrainOptions().parse(argv)
    ctx, device = distributed.setup(opt.device)
    try:
        train(opt, ctx, device)
    finally:
        distributed.cleanup(ctx)


def train(opt, ctx: distributed.DistContext, device: torch.device) -> None:
    if opt.num_threads:
        torch.set_num_threads(opt.num_threads)
    run = RunDir(opt.run_dir)
    if not opt.resume and run.epochs():
        raise UserError(f"run {opt.name!r} already has checkpoints in {run.path} (epochs "
                        f"{', '.join(map(str, run.epochs()))}); pass --resume to continue it "
                        "or --name for a new run")
    if ctx.is_main:
        print_options(opt)

    # -- data: whole splits on the device, batches by indexing a seeded permutation ----------
    fetch_data(opt.dataset, opt.data_root, ctx)
    train_x, train_y = load_split(opt.dataset, True, opt.data_root, device)
    train_x, train_y = take_subset(train_x, train_y, opt.subset, opt.seed)
    if ctx.is_main:  # only rank 0 evaluates
        test_x, test_y = load_split(opt.dataset, False, opt.data_root, device)
    loader = InMemoryLoader(train_x, train_y, opt.batch_size, shuffle=True, seed=opt.seed, augment=opt.augment,
                            rank=ctx.rank, world_size=ctx.world_size)

    # -- model, optimizer, schedule ----------------------------------------------------------
    torch.manual_seed(opt.seed)  # same initial means on every rank
    model = make_model(opt).to(device)
    optimizer = make_optimizer(opt, model)
    scheduler = make_scheduler(opt, optimizer)
    bayesian = isinstance(optimizer, NGVIOptimizer)
    torch.manual_seed(opt.seed + 1000 * ctx.rank)  # each rank draws its own weight noise

    start_epoch, iteration = 1, 0
    if opt.resume:
        ckpt = restore(run.checkpoint(run.latest_epoch()), model, optimizer, scheduler, ctx, device, opt.seed)
        start_epoch, iteration = ckpt["epoch"] + 1, ckpt["iteration"]
        if ctx.is_main:
            run.truncate_metrics(ckpt["epoch"])
            run.remove_temp_files()
            print(f"resuming {opt.name} from epoch {ckpt['epoch']}")
    elif ctx.is_main:
        run.start_metrics()
        save_options(opt, run.path)

    vis = Visualizer(opt.display_server, opt.display_port, opt.env, opt.name,
                     enabled=ctx.is_main and not opt.no_visdom)
    vis.log_options({k: v for k, v in vars(opt).items() if k != "explicit"})

    def log(record: dict) -> None:
        run.append_metrics(record)
        vis.log_record(record)

    samples_per_step = opt.train_samples if bayesian else 1
    records = StepRecords(opt.log_interval, device)
    for epoch in range(start_epoch, opt.epoch + 1):
        model.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "correct": 0, "seen": 0}
        window = {"loss": 0.0, "correct": 0, "seen": 0}
        # a bar only on a terminal; redirected to a file, the epoch's line below is its one summary line
        show_bar = ctx.is_main and not opt.no_progress and sys.stdout.isatty()
        bar = tqdm(loader, desc=f"epoch {epoch}/{opt.epoch}", disable=not show_bar, leave=False, file=sys.stdout,
                   dynamic_ncols=True)
        for step, (x, y) in enumerate(bar, 1):
            optimizer.zero_grad()
            for _ in range(samples_per_step):
                logits = model(x)  # train mode: a fresh weight sample per forward
                if bayesian:
                    optimizer.true_fisher_backward(logits)
                loss = F.cross_entropy(logits, y)
                loss.backward()
            if not bayesian:
                distributed.average_gradients(model)
            records.add(step, loss, logits, y)
            try:
                optimizer.step()
            except torch.linalg.LinAlgError:  # a non-finite loss reached the curvature factors
                account(records, (sums, window), epoch, ctx, run)
                raise
            iteration += 1
            if step % opt.log_interval == 0:
                account(records, (sums, window), epoch, ctx, run)
                if ctx.is_main:
                    rate = sums["seen"] * ctx.world_size / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{window['loss'] / window['seen']:.3f}",
                                    acc=f"{window['correct'] / window['seen']:.3f}",
                                    lr=f"{optimizer.param_groups[0]['lr']:.2e}", samples_s=f"{rate:.0f}")
                    log({"kind": "iter", "epoch": epoch, "iteration": iteration,
                         "epoch_float": epoch - 1 + step / len(loader), "loss": window["loss"] / window["seen"],
                         "acc": window["correct"] / window["seen"], "lr": optimizer.param_groups[0]["lr"]})
                window = {"loss": 0.0, "correct": 0, "seen": 0}
        account(records, (sums,), epoch, ctx, run)
        bar.close()
        seconds = time.perf_counter() - t0
        # the epoch's training loss and accuracy over all ranks' shards, not rank 0's alone
        sums["loss"], sums["correct"], sums["seen"] = distributed.sum_over_ranks(
            [sums["loss"], sums["correct"], sums["seen"]], ctx)
        distributed.average_running_stats(model)  # BatchNorm statistics of all ranks' shards
        if not finite(model):
            raise Diverged(f"training diverged in epoch {epoch}: the weights are not finite; {run.last_good()}; "
                           "lower --lr or raise --damping")

        # -- evaluate (rank 0), log, checkpoint --------------------------------------------
        record = {"kind": "epoch", "epoch": epoch, "iteration": iteration,
                  "train_loss": sums["loss"] / sums["seen"], "train_acc": sums["correct"] / sums["seen"]}
        if ctx.is_main:
            test, _ = evaluate(model, test_x, test_y, opt.test_samples)
            record.update(test_acc=test["acc"], test_nll=test["nll"], test_ece=test["ece"])
        record.update(lr=optimizer.param_groups[0]["lr"], sec_per_epoch=seconds)
        scheduler.step()
        rngs = [rng_state(device)]
        if ctx.enabled:
            rngs = [None] * ctx.world_size
            torch.distributed.all_gather_object(rngs, rng_state(device))
        if ctx.is_main:
            print(f"epoch {epoch:3d}  train loss {record['train_loss']:.4f}  acc {record['train_acc']:.4f}  |  "
                  f"test acc {record['test_acc']:.4f}  nll {record['test_nll']:.4f}  ece {record['test_ece']:.4f}  |  "
                  f"{seconds:.1f}s",
                  flush=True)
            log(record)
            if bayesian:
                vis.log_posterior(epoch, *posterior_summaries(model, optimizer))
            run.save_checkpoint({"format_version": CHECKPOINT_FORMAT, "epoch": epoch, "iteration": iteration,
                                 "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "rng": rngs,
                                 "options": {k: v for k, v in vars(opt).items() if k != "explicit"},
                                 "metrics": record}, epoch)
    if ctx.is_main:
        print(f"done: checkpoints in {run.path}; evaluate with: python test.py --name {opt.name} --epoch {opt.epoch}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
