"""Benchmark: predictive quality of Adam, Noisy Adam, Noisy K-FAC, VOGN and IVON.

Tasks (a task is skipped, with a note, when its data set is not found):

* ``mnist_mlp``: MNIST, 784-100-10 MLP; OOD set FashionMNIST (test split)
* ``mnist_covnet``: MNIST, the seed's CovNet; OOD set FashionMNIST
* ``fmnist_covnet``: FashionMNIST, CovNet; OOD set MNIST
* ``fmnist_resnet20``: FashionMNIST, ResNet-20 (BatchNorm, residual blocks), batch 128; OOD set MNIST.
  Not in the default ``--tasks``: it is slow on a CPU, run it on its own
  (``--tasks fmnist_resnet20 --conv_epochs 3 --seeds 1 --no_sweep``); its test set is scored after the last
  epoch only (10 weight samples of 20,000 ResNet forward passes cost about as much as an epoch of training)
* ``cifar_lenet5``: CIFAR-10, LeNet-5 (only when ``cifar-10-batches-py`` is under the data root); no OOD set

Every run trains one (task, method, seed, learning rate) for E epochs through ``bench/runner.py``
(``runner.Run``: what ``train.py`` does with those flags, the optimizer classes' defaults for everything but
``--lr``; batch 100, or the task's own). IVON is not a ``train.py`` optimizer: it is ``ivon.IVON(params, lr,
ess=N)`` (package defaults otherwise: ``hess_init=1, weight_decay=1e-4, beta2=0.99999``) on the deterministic
(MAP) model, each step inside ``optimizer.sampled_params(train=True)`` (``runner.IVONSteps``).

After every epoch the predictive on the test set is scored (accuracy, log loss = NLL, ECE with
15 bins): the mean of the softmax over 10 weight samples for the Bayesian methods and IVON,
the single network for Adam. At the end: OOD AUROC (predictive entropy; OOD inputs are the
positives) and reliability bins. "s/epoch" is the training time of an epoch (evaluation
excluded) on whatever machine ran it.

Tuning sweep: on ``mnist_mlp`` with 1 seed, each method tries the learning rates in ``GRID``
for ``--sweep_epochs`` epochs (default ``--epochs``: the lr is tuned for the length it is used
at), training on the first 50,000 MNIST training images and scoring on the last 10,000 (a
validation split; the test set is never used to tune); the lr with the lowest validation NLL
is used for every task. ``--no_sweep`` uses the lrs an earlier sweep chose (stored in the
JSON), else the defaults of ``experiment.optimizer_defaults`` (IVON: 0.1).

Results accumulate in ``bench/results/accuracy.json``, which is rewritten after every run; a run
already there (same task, method, seed, lr, epochs, subset, and the same optimizer settings, so a
change of ``experiment.optimizer_defaults`` re-runs what it affects) is not run again, so an interrupted
benchmark resumes where it stopped. From the JSON it writes ``docs/results.md`` (tables, sweep,
published reference points, the commands) and ``bench/results/<task>_curves.png`` /
``<task>_reliability.png``.

Usage::

    python bench/accuracy.py --data_root ../shared/data --quick      # a check: 1 epoch, 5000 examples, mlp
    python bench/accuracy.py --data_root ../shared/data --sweep_only # the tuning sweep
    python bench/accuracy.py --data_root ../shared/data --epochs 10 --conv_epochs 5 --seeds 3
    python bench/accuracy.py --report_only                           # tables and plots from the JSON

``--quick`` writes ``accuracy_quick.json`` and ``quick_*.png`` and prints the markdown instead of
writing ``docs/results.md``, so it never mixes with the real results. Torch runs on 1 thread by
default (``--threads``): on a small shared machine more threads oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plots  # noqa: E402
import torch  # noqa: E402
from common import REPO, RESULTS, environment  # noqa: E402
from runner import (  # noqa: E402
    METHODS,
    TASKS,
    Data,
    Run,
    Store,
    Study,
    Task,
    command,
    ivon_defaults,
    md_table,
    mean_sd,
    options,
    scores,
)
from torch import Tensor, nn  # noqa: E402

from data import DATASETS, take_subset  # noqa: E402
from evaluation import ood_auroc  # noqa: E402
from experiment import optimizer_defaults  # noqa: E402
from models import bayesian_layers  # noqa: E402
from util.metrics import reliability_bins  # noqa: E402

DEFAULT_TASKS = ("mnist_mlp", "mnist_covnet", "fmnist_covnet", "cifar_lenet5")
#: tasks whose test set is scored after the last epoch only (their epochs before it: None)
SCORED_AT_END = ("fmnist_resnet20",)

#: the learning rates the sweep tries: the default and factors of about 3 around it, extended
#: downwards where a sweep chose the lowest value (Adam, with 10 epochs)
GRID = {
    "Adam": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
    "NoisyAdam": [3e-2, 1e-1, 3e-1],
    "NoisyKFAC": [3e-4, 1e-3, 3e-3, 1e-2],
    "VOGN": [3e-2, 1e-1, 3e-1],
    "IVON": [0.05, 0.1, 0.2, 0.5],
}
DEFAULT_LR = {"IVON": 0.1, **{m: optimizer_defaults(x.optimizer)["lr"] for m, x in METHODS.items() if not x.ivon}}
SWEEP_TASK = "mnist_mlp"
NORM_ARCHS = ("resnet20",)  # archs with normalisation layers (where --norm_posterior matters)
TEST_SAMPLES = 10
VALIDATION = 10000
#: published numbers, shown beside ours and labeled as such (never produced by this script)
PUBLISHED = {
    "mnist": [
        ("LeNet-5, deterministic", 99.1, 0.037, None,
         "google/uncertainty-baselines, baselines/mnist README"),
        ("LeNet-5, mean-field VI", 98.5, 0.048, 0.010,
         "google/uncertainty-baselines, baselines/mnist README"),
    ],
    "cifar": [
        ("VOGN, LeNet-5 with batch norm, 100 epochs", 69.0, None, None,
         "a user report on team-approx-bayes/dl-with-bayes (about 69%)"),
    ],
}


# -- one run -------------------------------------------------------------------------------------
def run_options(task: Task, method: str, lr: float, n: int, seed: int, args: argparse.Namespace) -> argparse.Namespace:
    """The options train.py would parse for this run (``lr_ivon``: IVON's learning rate)."""
    m = METHODS[method]
    flags = ["--n", str(n), "--test_samples", str(TEST_SAMPLES)]
    if not m.ivon:
        flags += ["--lr", repr(lr)]
    if args.augment and task.dataset == "CIFAR10":
        flags += ["--augment"]
    if args.norm_posterior and m.model != "MAP":
        flags += ["--norm_posterior", args.norm_posterior]
    opt = options(task, m, seed, *flags, device=args.device, data_root=args.data_root)
    opt.lr_ivon = lr if m.ivon else None
    return opt


def train_run(task_name: str, method: str, lr: float, seed: int, epochs: int, train: tuple[Tensor, Tensor],
              evaluation: tuple[Tensor, Tensor], ood: Tensor | None, args: argparse.Namespace,
              label: str) -> dict:
    """Train one run; the curves are scored on ``evaluation`` (test or validation split)."""
    task = TASKS[task_name]
    opt = run_options(task, method, lr, train[0].shape[0], seed, args)
    run = Run(opt, METHODS[method], train, ivon_lr=lr)
    curves: dict[str, list[float]] = {k: [] for k in ("train_loss", "test_acc", "test_nll", "test_ece",
                                                      "sec_per_epoch")}
    probs = None

    def after_epoch(epoch: int, result: dict) -> None:
        nonlocal probs
        if epoch < epochs and task_name in SCORED_AT_END:  # a CPU-heavy task: score after the last epoch only
            s = {"acc": None, "nll": None, "ece": None}
        else:
            probs = run.predict(evaluation[0], TEST_SAMPLES, epoch)
            s = scores(probs, evaluation[1])
        for key, v in (("train_loss", result["loss"]), ("test_acc", s["acc"]), ("test_nll", s["nll"]),
                       ("test_ece", s["ece"]), ("sec_per_epoch", result["seconds"])):
            curves[key].append(v)
        scored = "not scored" if s["acc"] is None else f"eval acc {s['acc']:.4f} nll {s['nll']:.4f} ece {s['ece']:.4f}"
        print(f"  {label}  epoch {epoch}/{epochs}: train loss {result['loss']:.4f} | {scored} | "
              f"{result['seconds']:.1f}s", flush=True)

    diverged = run.train(epochs, after_epoch)
    if diverged:
        print(f"  {label}: DIVERGED ({diverged})", flush=True)
    record = {"task_dataset": task.dataset, "arch": task.arch, "method": method, "seed": seed, "lr": lr,
              "epochs": epochs, "n_train": train[0].shape[0], "diverged": diverged, "curves": curves,
              "optimizer_settings": _settings(method, opt)}
    if diverged or probs is None:
        record["final"] = None
        return record
    final = {"acc": curves["test_acc"][-1], "nll": curves["test_nll"][-1], "ece": curves["test_ece"][-1],
             "sec_per_epoch": statistics.mean(curves["sec_per_epoch"])}
    record["reliability"] = reliability_bins(probs, evaluation[1])
    if ood is not None:
        final["ood_auroc"] = ood_auroc(probs, run.predict(ood, TEST_SAMPLES, epochs))
        final["ood_normalized_as"] = task.dataset
    if METHODS[method].model != "MAP":
        # a diagnostic: the posterior means alone (no weight noise), and the noise-to-signal ratio
        mean_scores = scores(run.predict(evaluation[0], 0, epochs), evaluation[1])
        final.update(acc_mean_weights=mean_scores["acc"], nll_mean_weights=mean_scores["nll"],
                     std_over_abs_mean=_noise_to_signal(run.model))
    record["final"] = final
    return record


@torch.no_grad()
def _noise_to_signal(model: nn.Module) -> float:
    """Median over every Bayesian weight of posterior std / |posterior mean|."""
    ratios = [(layer.weight_std() / layer.weight.abs()).flatten() for _, layer in bayesian_layers(model)]
    return float(torch.cat(ratios).median())


def optimizer_settings(task: Task, method: str, lr: float, n: int, args: argparse.Namespace) -> dict:
    """Everything the run's optimizer is built with (stored with the run; a stored run whose settings
    differ from today's, e.g. after a change of ``experiment.optimizer_defaults``, is run again)."""
    return _settings(method, run_options(task, method, lr, n, 0, args))


def _settings(method: str, opt: argparse.Namespace) -> dict:
    if METHODS[method].ivon:
        return {"lr": float(opt.lr_ivon), "ess": opt.n, **ivon_defaults()}
    name = opt.optimizer
    # the same keys as stored runs hold (the baselines' kl_weight was recorded as 1, Adam's eps never)
    out = {"optimizer": name, "lr": opt.lr, "n": opt.n, "batch_size": opt.batch_size,
           "kl_weight": 1.0 if opt.kl_weight is None else opt.kl_weight, "train_samples": opt.train_samples,
           "test_samples": 0 if method == "Adam" else opt.test_samples}
    for k in optimizer_defaults(name):
        if k not in out and k not in ("eps", "norm_posterior") and getattr(opt, k) is not None:
            out[k] = getattr(opt, k)
    if opt.arch in NORM_ARCHS and getattr(opt, "norm_posterior", None) is not None:
        out["norm_posterior"] = opt.norm_posterior  # only a model with norm layers depends on it
    return out


# -- bookkeeping -----------------------------------------------------------------------------------
def _done(run: dict | None, settings: dict) -> bool:
    """Whether a stored run is there and was built with ``settings``."""
    if run is None:
        return False
    if run.get("optimizer_settings") != settings:
        print(f"  re-running {run['method']} lr={run['lr']:g} seed={run['seed']}: its optimizer settings changed "
              f"({_diff(run.get('optimizer_settings') or {}, settings)})", flush=True)
        return False
    return True


def _diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new), key=str)
    return ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k))


def run_key(kind: str, task: str, method: str, seed: int, lr: float, epochs: int, subset: int | None,
            test_subset: int | None = None) -> str:
    key = f"{kind}|{task}|{method}|seed={seed}|lr={lr:g}|epochs={epochs}|subset={subset}"
    return key + (f"|test_subset={test_subset}" if test_subset else "")


# -- the sweep and the main grid -------------------------------------------------------------------
def sweep(args, data: Data, store: Store) -> dict[str, float]:
    task = TASKS[SWEEP_TASK]
    x, y = data.split(task.dataset, True)
    x, y = take_subset(x, y, args.subset, 0)
    val = VALIDATION if x.shape[0] >= 3 * VALIDATION else x.shape[0] // 5
    fit, held = (x[:-val], y[:-val]), (x[-val:], y[-val:])
    info = {"task": SWEEP_TASK, "epochs": args.sweep_epochs, "seed": 0, "subset": args.subset,
            "n_fit": fit[0].shape[0], "n_validation": val, "criterion": "validation NLL after the last epoch",
            "grid": {m: GRID[m] for m in args.methods}, "runs": {}, "chosen": {}}
    sw = store["sweep"].get(_sweep_id(args), {})
    info["runs"] = sw.get("runs", {})
    for method in args.methods:
        for lr in GRID[method]:
            key = run_key("sweep", SWEEP_TASK, method, 0, lr, args.sweep_epochs, args.subset)
            if _done(info["runs"].get(key), optimizer_settings(task, method, lr, fit[0].shape[0], args)):
                continue
            print(f"sweep {method} lr={lr:g}", flush=True)
            run = train_run(SWEEP_TASK, method, lr, 0, args.sweep_epochs, fit, held, None, args,
                            f"sweep {SWEEP_TASK} {method} lr={lr:g}")
            run.pop("reliability", None)
            info["runs"][key] = run
            store["sweep"][_sweep_id(args)] = info
            store.save()
        tried = [r for r in info["runs"].values() if r["method"] == method and r["final"] is not None
                 and r["lr"] in GRID[method]]
        if tried:
            info["chosen"][method] = min(tried, key=lambda r: r["final"]["nll"])["lr"]
    info["chosen"] = {m: info["chosen"][m] for m in METHODS if m in info["chosen"]}
    store["sweep"][_sweep_id(args)] = info
    store["chosen_lr"] = {**store.get("chosen_lr", {}), **info["chosen"]}
    store["chosen_sweep"] = _sweep_id(args)
    store.save()
    return info["chosen"]


def _sweep_id(args) -> str:
    return f"{SWEEP_TASK}|epochs={args.sweep_epochs}|subset={args.subset}"


def task_epochs(args, task: str) -> int:
    return args.conv_epochs if TASKS[task].arch != "mlp" and args.conv_epochs else args.epochs


def main_grid(args, data: Data, store: Store, lrs: dict[str, float], tasks: list[str]) -> None:
    for name in tasks:
        epochs = task_epochs(args, name)
        plan = {"epochs": epochs, "seeds": list(range(args.seeds)), "subset": args.subset,
                "test_subset": args.test_subset,
                "lrs": {m: lrs[m] for m in args.methods}, "command": command("accuracy.py", args.argv),
                "lr_source": args.lr_source, "sweep": args.sweep_id, "environment": store["environment"]}
        old = store["plans"].get(name, {})
        keep = {m: lr for m, lr in old.get("lrs", {}).items()
                if m not in args.methods and old.get("epochs") == epochs and old.get("subset") == args.subset}
        plan["lrs"] = {m: lr for m, lr in {**keep, **plan["lrs"]}.items()}
        store["plans"][name] = plan
        store.save()
        task_runs(args, data, store, name, lrs, epochs)
        report(args, store, echo=False)


def task_runs(args, data: Data, store: Store, name: str, lrs: dict[str, float], epochs: int) -> None:
    """The runs of task ``name``: every seed of every method, at the learning rates ``lrs``."""
    task = TASKS[name]
    train_x, train_y = data.split(task.dataset, True)
    test = tuple(t[:args.test_subset] for t in data.split(task.dataset, False))  # first N (None: all)
    ood = data.ood_images(task)[:args.test_subset] if task.ood else None
    n_train = args.subset or train_x.shape[0]

    def key(task_name: str, method: str, seed: int) -> str:
        return run_key("test", task_name, method, seed, lrs[method], epochs, args.subset, args.test_subset)

    def one(task_name: str, method: str, seed: int) -> dict:
        label = f"{task_name} {method} seed={seed} lr={lrs[method]:g}"
        print(label, flush=True)
        fit = take_subset(train_x, train_y, args.subset, seed)
        return {**train_run(task_name, method, lrs[method], seed, epochs, fit, test, ood, args, label),
                "task": task_name}

    def done(run: dict, task_name: str, method: str, seed: int) -> bool:
        return _done(run, optimizer_settings(task, method, lrs[method], n_train, args))

    Study([name], args.methods, range(args.seeds)).run(store, key, one, done)


# -- report ------------------------------------------------------------------------------------------
def plan_runs(store: dict, task: str, plan: dict) -> dict[str, list[dict]]:
    """The runs of ``plan`` that are done, per method (diverged ones included)."""
    out = {}
    for method, lr in plan["lrs"].items():
        out[method] = [store["runs"][k] for seed in plan["seeds"]
                       if (k := run_key("test", task, method, seed, lr, plan["epochs"], plan["subset"],
                                        plan.get("test_subset")))
                       in store["runs"]]
    return out


def report(args, store: dict, echo: bool = True) -> str:
    """Write the plots and the markdown (to ``--md``; ``--quick``: to stdout if ``echo``); return the markdown."""
    prefix = "quick_" if args.quick else ""
    md = ["# Results: predictive quality of the optimizers", "",
          "Generated by `bench/accuracy.py` from `" + _rel(args.results) + "`; do not edit by hand.", "",
          "Every number below is the mean ± standard deviation over seeds (the *n* column) of the run's "
          "final epoch, on the **test split**. Test accuracy; NLL = log loss of the predictive (nats, lower is "
          "better); ECE = expected calibration error, 15 equal-width bins; OOD AUROC = how well predictive "
          "entropy tells the OOD test set (MNIST -> FashionMNIST, FashionMNIST -> MNIST) from the in-distribution "
          "test set (0.5 = chance, higher is better); s/epoch = training seconds per epoch (evaluation excluded; "
          "a shared machine, so only roughly comparable). Predictive: mean softmax over "
          f"{TEST_SAMPLES} weight samples for NoisyAdam, NoisyKFAC, VOGN and IVON; the single network for Adam. "
          "Batch size as in each task's heading, 1 MC sample per training step, no learning-rate schedule, no data "
          f"augmentation. Learning rates are tuned once, on {SWEEP_TASK} (sweep below), and reused unchanged "
          "on the other tasks, which may train for fewer epochs: they are not tuned per task.", ""]
    md += ["Reproduce (from the repository root; `--data_root` is the folder holding `MNIST/`, `FashionMNIST/` "
           "and, for CIFAR-10, `cifar-10-batches-py/`; the runs already in the JSON are skipped, so an "
           "interrupted benchmark resumes):", "", "```",
           "python bench/accuracy.py --data_root ../shared/data --quick   # ~20 s check that it works "
           "(writes accuracy_quick.json / quick_*.png)",
           "python bench/accuracy.py --data_root ../shared/data --epochs 10 --conv_epochs 5 --seeds 3   "
           "# sweep + all tasks",
           "python bench/accuracy.py --report_only   # rewrite this page and the plots from the JSON",
           "```", "", "The command each table below came from is printed with it.", ""]
    env = store.get("environment", {})
    if env:
        md += [f"Machine: {env.get('cpu_count')} CPU cores, torch {env.get('torch')}, "
               f"{env.get('torch_threads')} torch thread(s), device `{env.get('device', 'cpu')}`; the machine was "
               f"shared with other jobs (1-minute load average {env.get('load_average_1min', 0):.1f} when the last "
               "invocation started), so s/epoch is only a rough, noisy figure.", ""]
    notes = store.get("skipped", {})
    for name, plan in store["plans"].items():
        runs = plan_runs(store, name, plan)
        task = TASKS[name]
        info = DATASETS[task.dataset]
        n_train = plan["subset"] or info.train_size
        md += [f"## {name}: {task.dataset}, `{task.arch}`", "",
               f"{_n(plan['epochs'], 'epoch')}, {n_train} training examples, batch {task.batch_size}, "
               + (f"scored on the first {plan['test_subset']} test (and OOD) images only, "
                  if plan.get("test_subset") else "") +
               f"seeds {plan['seeds']}; learning rates {plan['lr_source']}. Command:", "", "```", plan["command"],
               "```", ""]
        if "environment" in plan:
            e = plan["environment"]
            md += [f"Ran on {e.get('cpu_count')} CPU cores with {e.get('torch_threads')} torch thread(s), device "
                   f"`{e.get('device', 'cpu')}`, 1-minute load average {e.get('load_average_1min', 0):.1f} at the "
                   "start (a shared machine: s/epoch is rough).", ""]
        ood_col = f"OOD AUROC (→{task.ood})" if task.ood else "OOD AUROC"
        rows = []
        for method, rs in runs.items():
            done = [r for r in rs if r["final"] is not None]
            div = len(rs) - len(done)
            n = f"{len(done)}" + (f" (+{div} diverged)" if div else "")
            f = [r["final"] for r in done]
            posterior = "IVON (diag. Gaussian)" if method == "IVON" else METHODS[method].model
            rows.append([method, posterior, f"{plan['lrs'][method]:g}", n, mean_sd([x["acc"] for x in f], ".2f", 100),
                         mean_sd([x["nll"] for x in f], ".4f"), mean_sd([x["ece"] for x in f], ".4f"),
                         mean_sd([x.get("ood_auroc") for x in f], ".3f"),
                         mean_sd([x["sec_per_epoch"] for x in f], ".1f")])
        ref = PUBLISHED["mnist"] if task.dataset == "MNIST" else PUBLISHED["cifar"] if task.dataset == "CIFAR10" \
            else []
        for what, acc, loss, cal, source in ref:
            rows.append([f"*published, not ours: {what}* ({source})", "", "", "", f"*{acc:.1f}*",
                         f"*{loss:.3f}*" if loss else "", f"*{cal:.3f}*" if cal else "", "", ""])
        md += md_table(["method", "posterior", "lr", "n", "test acc %", "NLL", "ECE", ood_col, "s/epoch"], rows)
        stale = [f"{r['method']} seed {r['seed']}" for rs in runs.values() for r in rs
                 if r.get("optimizer_settings") != optimizer_settings(task, r["method"], r["lr"], r["n_train"], args)]
        if stale:
            md += ["", f"**Stale:** {', '.join(stale)} ran with optimizer settings that differ from today's "
                   "`experiment.optimizer_defaults`; run the command again to refresh them."]
        scored = [r for rs in runs.values() for r in rs if r["final"] and "ood_auroc" in r["final"]]
        own = [f"{r['method']} seed {r['seed']}" for r in scored if _ood_scored_earlier(r)]
        if own:
            who = "Every run" if len(own) == len(scored) else ", ".join(own)
            md += ["", f"**OOD AUROC, earlier protocol:** {who} scored the {task.ood} test set "
                   "normalised with its own statistics; today's runs (and `test.py --ood_dataset`) pass it through "
                   f"{task.dataset}'s normalisation. Run the command again to refresh them."]
        md += [""] + _verdict(runs) + [""] + _mean_weights(runs) + _other_lrs(store, name, plan, args)
        have = {m: [r for r in rs if r["final"] is not None] for m, rs in runs.items()}
        if any(have.values()):
            title = f"{name} ({task.dataset}, {task.arch})"
            c = plots.curves(title, have, args.out / f"{prefix}{name}_curves.png")
            r = plots.reliability(title, {m: [x["reliability"] for x in rs] for m, rs in have.items()},
                                  args.out / f"{prefix}{name}_reliability.png")
            md += [f"![{name}: test accuracy and log loss vs epoch]({_rel(c, args.md)})", "",
                   f"![{name}: reliability diagrams]({_rel(r, args.md)})", ""]
    for name, why in notes.items():
        md += [f"## {name}: not run", "", why, ""]
    md += _settings_md(store)
    md += _sweep_md(store)
    md += ["## Block-tridiagonal Noisy K-FAC", "",
           "Block-tridiagonal vs block-diagonal Noisy K-FAC vs Noisy Adam on MNIST `mlp` (784-100-10 and "
           "784-100-100-10), 3 seeds: [results_tridiagonal.md](results_tridiagonal.md), written by "
           "`bench/tridiagonal.py`.", ""]
    md += ["## Published reference points (not produced by this benchmark)", "",
           *md_table(["setting", "test acc %", "NLL", "ECE", "source"],
                     [[what, f"{acc:.1f}", loss or "", cal or "", source]
                      for refs in PUBLISHED.values() for what, acc, loss, cal, source in refs])]
    md += ["", "Those use a LeNet-5 (MNIST) and a LeNet-5 with batch norm trained for 100 epochs (CIFAR-10); "
           "our `covnet` is the smaller seed CovNet (conv-pool-conv-pool-fc) and our runs are much shorter, "
           "so they are context, not a like-for-like comparison.", ""]
    text = "\n".join(md)
    if args.quick:
        if echo:
            print(text)
    else:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    return text


def _ood_scored_earlier(run: dict) -> bool:
    """Whether ``run``'s OOD AUROC came from the earlier protocol (the OOD set under its own normalisation)."""
    return bool(run["final"]) and "ood_auroc" in run["final"] and "ood_normalized_as" not in run["final"]


def _other_lrs(store: dict, name: str, plan: dict, args) -> list[str]:
    """Complete runs of this task at learning rates other than the chosen ones (an earlier sweep's
    choices), with today's settings: how sensitive the comparison is to the tuning."""
    task, groups = TASKS[name], {}
    for r in store["runs"].values():
        if (r.get("task") != name or r["epochs"] != plan["epochs"] or r["method"] not in plan["lrs"]
                or r["lr"] == plan["lrs"][r["method"]] or r["seed"] not in plan["seeds"]
                or r.get("optimizer_settings") != optimizer_settings(task, r["method"], r["lr"], r["n_train"], args)):
            continue
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    rows = [(m, lr, rs) for (m, lr), rs in groups.items() if len(rs) == len(plan["seeds"])]
    if not rows:
        return []
    order = list(METHODS)
    cells = []
    for m, lr, rs in sorted(rows, key=lambda t: (order.index(t[0]), t[1])):
        f = [r["final"] for r in rs if r["final"] is not None]
        cells.append([m, f"{lr:g}", len(f), mean_sd([x["acc"] for x in f], ".2f", 100),
                      mean_sd([x["nll"] for x in f], ".4f"), mean_sd([x["ece"] for x in f], ".4f"),
                      mean_sd([x.get("ood_auroc") for x in f], ".3f")])
    earlier = [f"{m} {lr:g}" for m, lr, rs in rows if any(_ood_scored_earlier(r) for r in rs)]
    note = ([f"Scored by the earlier evaluation ({', '.join(earlier)}): OOD set normalised with its own statistics, "
             "and a sampled predictive drew its weights per batch of test images.", ""] if earlier else [])
    return ["Sensitivity to the learning rate: the same task and settings at the lr an earlier sweep chose "
            "(complete runs kept in the JSON; not used above):", "",
            *md_table(["method", "lr", "n", "test acc %", "NLL", "ECE", "OOD AUROC"], cells), "", *note]


def _mean_weights(runs: dict[str, list[dict]]) -> list[str]:
    """The Bayesian methods' diagnostic (where recorded): the posterior means alone, and the weight noise."""
    parts = []
    for method, rs in runs.items():
        f = [r["final"] for r in rs if r["final"] is not None and "acc_mean_weights" in r["final"]]
        if f:
            parts.append(f"{method} {mean_sd([x['acc_mean_weights'] for x in f], '.2f', 100)}% / NLL "
                         f"{mean_sd([x['nll_mean_weights'] for x in f], '.4f')} (median posterior std / |mean| "
                         f"{mean_sd([x['std_over_abs_mean'] for x in f], '.2f')})")
    if not parts:
        return []
    return ["Diagnostic, the posterior means alone (no weight noise, test set): " + "; ".join(parts) + ".", ""]


def _verdict(runs: dict[str, list[dict]]) -> list[str]:
    """Generated comparison of each Bayesian method with Adam (the deterministic baseline)."""
    def mean(method: str, key: str) -> float | None:
        vals = [r["final"].get(key) for r in runs.get(method, []) if r["final"] is not None]
        vals = [v for v in vals if v is not None]
        return statistics.mean(vals) if vals else None

    if mean("Adam", "acc") is None:
        return []
    out = ["Against Adam (means over seeds): "]
    parts = []
    for method in runs:
        if method == "Adam" or mean(method, "acc") is None:
            continue
        d_acc = 100 * (mean(method, "acc") - mean("Adam", "acc"))
        parts.append(f"{method} accuracy {d_acc:+.2f} points, NLL x{mean(method, 'nll') / mean('Adam', 'nll'):.2f}, "
                     f"ECE x{mean(method, 'ece') / max(mean('Adam', 'ece'), 1e-12):.2f}")
    out[0] += "; ".join(parts) + "."
    return out


def _settings_md(store: dict) -> list[str]:
    """Each method's optimizer settings, as stored with its runs (lr and N vary by task, so they are left out)."""
    seen: dict[str, set[str]] = {}
    planned = [r for name, plan in store["plans"].items() for rs in plan_runs(store, name, plan).values() for r in rs]
    for r in planned:
        shown = {k: v for k, v in r["optimizer_settings"].items() if k not in ("lr", "n", "ess", "optimizer")}
        seen.setdefault(r["method"], set()).add(", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    if not seen:
        return []
    return ["## Optimizer settings", "",
            "Besides the learning rate (tables above) and N = the training-set size (`--n` / IVON's `ess`), the runs "
            "used these settings (the optimizer classes' defaults for the `train.py` optimizers, the `ivon` "
            "package's defaults for IVON):", "",
            *md_table(["method", "settings"], [[m, text] for m in METHODS for text in sorted(seen.get(m, ()))]), ""]


def _sweep_md(store: dict) -> list[str]:
    md = []
    used = {plan.get("sweep") for plan in store["plans"].values()}
    for sid, info in store["sweep"].items():
        width = max(len(g) for g in info["grid"].values())
        role = ("its choices are the learning rates of the tables above" if sid in used
                else "an earlier sweep whose choices the tables above do **not** use")
        md += [f"## Learning-rate sweep ({info['task']}, {_n(info['epochs'], 'epoch')}): {role}", "",
               f"1 seed, {_n(info['epochs'], 'epoch')}, trained on {info['n_fit']} training examples and scored on "
               f"the next {info['n_validation']} (a validation split held out of the **training** set; the test "
               f"set is not used). Criterion: {info['criterion']}. Cells: validation NLL / accuracy %; "
               "**bold** = chosen. Everything else is each optimizer's default "
               "(its class's; IVON: the `ivon` package's defaults with `ess` = training-set size).", ""]
        rows = []
        for method, grid in info["grid"].items():
            cells = []
            for lr in grid:
                key = run_key("sweep", info["task"], method, 0, lr, info["epochs"], info["subset"])
                r = info["runs"].get(key)
                if r is None:
                    cell = f"{lr:g}: not run"
                elif r["final"] is None:
                    cell = f"{lr:g}: diverged"
                else:
                    cell = f"{lr:g}: {r['final']['nll']:.4f} / {100 * r['final']['acc']:.2f}"
                    if info["chosen"].get(method) == lr:
                        cell = f"**{cell}**"
                cells.append(cell)
            cells += [""] * (width - len(cells))
            rows.append([method, *cells, info["chosen"].get(method, "n/a")])
        md += md_table(["method", *(f"lr {i + 1}" for i in range(width)), "chosen"], rows) + [""]
    return md


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _rel(path: Path, start: Path | None = None) -> str:
    path = Path(path).resolve()
    base = (start.resolve().parent if start else REPO)
    return os.path.relpath(path, base)


# -- command line ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="check that it works: 1 epoch, 5000 training examples, 1 seed, mnist_mlp, sweep of 1 epoch")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run")
    p.add_argument("--conv_epochs", type=int, default=None,
                   help="epochs for the covnet/lenet5 tasks (default: --epochs)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. S-1")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--subset", type=int, default=None, help="use N training examples (a seeded subset)")
    p.add_argument("--test_subset", type=int, default=None,
                   help="score on the first N test (and OOD) images only: a cheaper, noisier estimate")
    p.add_argument("--sweep_epochs", type=int, default=None,
                   help="epochs of each sweep run (default: --epochs, the length of the mnist_mlp runs)")
    p.add_argument("--no_sweep", action="store_true",
                   help="skip the sweep: use the lrs a stored sweep chose, else the optimizers' defaults")
    p.add_argument("--sweep_only", action="store_true", help="run the sweep and stop")
    p.add_argument("--report_only", action="store_true", help="only write the tables and plots from the JSON")
    p.add_argument("--data_root", default=None, help="folder with the data sets (default: $DATA_ROOT, then ./data)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--augment", action="store_true", help="random crop + flip on CIFAR-10")
    p.add_argument("--norm_posterior", choices=("gaussian", "point"), default=None,
                   help="Bayesian methods: posterior of the norm layers' affine parameters (default: the optimizers')")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default); 1 avoids oversubscribing a shared machine")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the JSON and the PNGs")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "results.md", help="markdown report")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.epochs, args.conv_epochs, args.seeds, args.sweep_epochs = 1, None, 1, 1
        args.subset = args.subset or 5000
        args.tasks = "mnist_mlp"
    if args.sweep_epochs is None:
        args.sweep_epochs = args.epochs
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.methods = [m for m in args.methods.split(",") if m]
    for t in args.tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if min(args.epochs, args.seeds, args.sweep_epochs) < 1:
        p.error("--epochs, --seeds and --sweep_epochs must be >= 1")
    args.results = args.out / ("accuracy_quick.json" if args.quick else "accuracy.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    store = Store(args.results, sweep={}, plans={}, skipped={})
    if args.report_only:
        report(args, store)
        print(f"wrote {args.md if not args.quick else 'stdout'} and plots under {args.out}")
        return
    store["environment"] = environment(device=args.device)  # after set_num_threads: records the threads
    data = Data(args.data_root, args.device)
    tasks = []
    for name in args.tasks:
        task = TASKS[name]
        missing = [d for d in (task.dataset, task.ood) if d and not data.available(d)]
        if missing:
            why = (f"{', '.join(missing)} not found under --data_root / $DATA_ROOT / ./data; "
                   f"give --data_root a folder with it to include {name}.")
            print(f"skipping {name}: {why}", flush=True)
            store["skipped"][name] = why
        else:
            store["skipped"].pop(name, None)
            tasks.append(name)
    t0 = time.perf_counter()
    if args.no_sweep:
        stored = store.get("chosen_lr", {})
        lrs = {m: stored.get(m, DEFAULT_LR[m]) for m in METHODS}
        args.sweep_id = store.get("chosen_sweep") if all(m in stored for m in args.methods) else None
        args.lr_source = (f"chosen by the stored sweep `{args.sweep_id}` (below)" if args.sweep_id
                          else "the optimizers' defaults (`--no_sweep`, no stored sweep)")
    else:
        if not data.available(TASKS[SWEEP_TASK].dataset):
            raise SystemExit(f"the sweep needs {TASKS[SWEEP_TASK].dataset}; pass --data_root or --no_sweep")
        chosen = sweep(args, data, store)
        lrs = {m: chosen.get(m, DEFAULT_LR[m]) for m in METHODS}
        args.sweep_id = _sweep_id(args)
        args.lr_source = f"chosen by the {args.sweep_epochs}-epoch sweep on {SWEEP_TASK} (below)"
        print("chosen learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()), flush=True)
    if not args.sweep_only:
        main_grid(args, data, store, lrs, tasks)
    store.save()
    report(args, store)
    print(f"done in {time.perf_counter() - t0:.0f}s: {_rel(args.results)}"
          + ("" if args.quick else f", {_rel(args.md)}") + f", plots under {_rel(args.out)}", flush=True)


if __name__ == "__main__":
    main()
