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

import shlex
import sys

import torch

from data import InMemoryLoader, load_split, take_subset
from evaluation import evaluate
from experiment import finite, make_model, make_optimizer, make_scheduler
from optimizers import NGVIOptimizer
from option_parser import TrainOptions, print_options, save_options
from training import (
    Diverged,
    StepRecords,
    fetch_data,
    latest_checkpoint,
    objective_record,
    posterior_summaries,
    restore,
    train_epoch,
)
from util import distributed
from util.checkpoint import CHECKPOINT_FORMAT, rng_state
from util.errors import UserError, run_cli
from util.run_dir import RunDir
from util.visualizer import Visualizer


def main(argv: list[str] | None = None) -> None:
    opt = TrainOptions().parse(argv)
    ctx, device = distributed.setup(opt.device, opt.dist_timeout)
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
    test_x, test_y = load_split(opt.dataset, False, opt.data_root, device)  # every rank scores its slice
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
        path, ckpt = latest_checkpoint(run, ctx)  # rank 0's, on every rank
        ckpt = restore(path, model, optimizer, scheduler, ctx, device, opt.seed, ckpt)
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

    records = StepRecords(opt.log_interval, device)
    for epoch in range(start_epoch, opt.epoch + 1):
        first = iteration

        def log_interval(step: int, window: dict, epoch: int = epoch, first: int = first, steps: int = len(loader)):
            log({"kind": "iter", "epoch": epoch, "iteration": first + step, "epoch_float": epoch - 1 + step / steps,
                 "loss": window["loss"], "acc": window["acc"], "lr": optimizer.param_groups[0]["lr"]})

        # a bar only on a terminal; redirected to a file, the epoch's line below is its one summary line
        show_bar = ctx.is_main and not opt.no_progress and sys.stdout.isatty()
        result = train_epoch(model, optimizer, loader, epoch, run, records, ctx, opt.train_samples, opt.log_interval,
                             on_log=log_interval if ctx.is_main else None,
                             progress=f"epoch {epoch}/{opt.epoch}" if show_bar else None)
        iteration += result["steps"]
        seconds = result["seconds"]
        distributed.average_running_stats(model)  # BatchNorm statistics of all ranks' shards
        if not finite(model):
            raise Diverged(f"training diverged in epoch {epoch}: the weights are not finite; {run.last_good()}; "
                           "lower --lr or raise --damping")

        # -- evaluate (all ranks), log, checkpoint (rank 0) --------------------------------
        record = {"kind": "epoch", "epoch": epoch, "iteration": iteration,
                  "train_loss": result["loss"], "train_acc": result["acc"]}
        test, _ = evaluate(model, test_x, test_y, opt.test_samples, opt.seed, epoch, opt.eval_batch_size, ctx)
        record.update(test_acc=test["acc"], test_nll=test["nll"], test_ece=test["ece"])
        record.update(lr=optimizer.param_groups[0]["lr"], sec_per_epoch=seconds)
        if bayesian and ctx.is_main:
            record.update(objective_record(optimizer, record["train_loss"]))
        scheduler.step()
        rngs = [rng_state(device)]
        if ctx.enabled:
            rngs = [None] * ctx.world_size
            torch.distributed.all_gather_object(rngs, rng_state(device))
        if ctx.is_main:
            print(f"epoch {epoch:3d}  train loss {record['train_loss']:.4f}  acc {record['train_acc']:.4f}  |  "
                  f"test acc {record['test_acc']:.4f}  nll {record['test_nll']:.4f}  ece {record['test_ece']:.4f}  |  "
                  f"{seconds:.1f}s"
                  + (f"  |  elbo {record['elbo']:.4g} (E log-lik {record['expected_loglik']:.4g}, "
                     f"KL {record['kl']:.4g})" if bayesian else ""),
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
        print(f"done: checkpoints in {run.path}; evaluate with: {evaluate_command(opt)}")


def evaluate_command(opt) -> str:
    """The test.py command for the run's last epoch, with ``--ckpt_dir`` when the run was given one."""
    where = ["--ckpt_dir", opt.ckpt_dir] if "ckpt_dir" in opt.explicit else []
    return shlex.join(["python", "test.py", *where, "--name", opt.name, "--epoch", str(opt.epoch)])


if __name__ == "__main__":
    sys.exit(run_cli(main))
