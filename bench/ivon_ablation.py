"""Benchmark: which of IVON's ingredients make it better calibrated than Noisy Adam.

IVON (Shen et al. 2024; the ``ivon`` package) and Noisy Adam (``optimizers/noisy_adam.py``) are
both natural-gradient VI with a diagonal Gaussian posterior. Written in Noisy Adam's symbols
(MATH.md, "Noisy Adam and VOGN"), IVON out of the box differs in five settings:

* curvature estimate: ``g (w - mu) / sigma**2`` (``fisher="hessian"``) instead of per-example squares;
* initial precision: ``hess_init = 1`` is ``f0 = 1``, i.e. ``init_precision = N (1 + 1e-4)`` (ours: 1e3);
* ``beta2 = 0.99999`` (ours: 0.999);
* weight decay 1e-4 as the prior: prior precision ``N * 1e-4``, ``prior_var = 1 / (N 1e-4)`` (ours: 1);
* learning rate 0.1 on ``m / (f + gamma)`` (ours: 3e-3), with the same momentum beta1 = 0.9.

Each ingredient is switched on alone inside Noisy Adam ("+x"), all together ("ivon-like"), and
switched off one at a time from "ivon-like" ("ivon-like -x"); IVON itself runs alongside. Every run
is scored at its last epoch on the test split (accuracy, NLL, ECE with 15 bins) with the predictive
averaged over ``--samples`` weight draws (0 = the mean weights), so the effect of the number of
predictive samples comes from the same trained networks. Each run is ``bench/runner.py``'s (a
configuration is Noisy Adam's ``train.py`` flags; batch 100, 1 MC sample per step), as in ``bench/accuracy.py``.

    python bench/ivon_ablation.py --data_root ../shared/data --tasks mnist_mlp --epochs 10 --seeds 3
    python bench/ivon_ablation.py --data_root ../shared/data --tasks mnist_covnet,fmnist_covnet --epochs 5 \\
        --configs base,ivon-like,IVON
    python bench/ivon_ablation.py --report_only

Results accumulate in ``bench/results/ivon_ablation.json`` (a run already there is skipped). The report
adds, as reference rows, the accuracy study's runs of Noisy Adam (lr 3e-3) and IVON (lr 0.1)
from ``bench/results/accuracy.json``: same protocol, other random streams (that study also scores every epoch).
s/epoch is measured on whatever machine ran the row: not comparable between rows.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import RESULTS, environment  # noqa: E402
from runner import METHODS, TASKS, Data, Run, Store, Study, md_table, mean_sd, options, scores  # noqa: E402

N_TRAIN = 60000
IVON_WD = 1e-4
#: Noisy Adam's settings as IVON sets them (N = 60000)
IVON_LIKE = {
    "fisher": dict(fisher="hessian"),
    "init": dict(init_precision=N_TRAIN * (1 + IVON_WD)),
    "beta2": dict(beta2=0.99999),
    "prior": dict(prior_var=1 / (N_TRAIN * IVON_WD)),
    "lr": dict(lr=0.1),
}


def base_settings() -> dict:
    """Noisy Adam's defaults before this study (fixed here, so that "base" stays the same runs)."""
    return dict(lr=3e-3, beta1=0.9, beta2=0.999, prior_var=1.0, damping=1e-3, init_precision=1e3, fisher="example")


def configs() -> dict[str, dict | None]:
    """name -> Noisy Adam settings (None: IVON itself)."""
    out: dict[str, dict | None] = {"base": base_settings()}
    for name, change in IVON_LIKE.items():
        out[f"+{name}"] = {**base_settings(), **change}
    full = base_settings()
    for change in IVON_LIKE.values():
        full.update(change)
    out["ivon-like"] = full
    for name in IVON_LIKE:
        out[f"ivon-like -{name}"] = {**full, **{k: base_settings()[k] for k in IVON_LIKE[name]}}
    # follow-ups: beta2 near 1 alone carries most of the gain (see docs/results.md); with f nearly frozen
    # the per-example squares buy little, so pair it with the cheaper estimate, and try a milder beta2
    out["+beta2 +fisher"] = {**base_settings(), **IVON_LIKE["beta2"], **IVON_LIKE["fisher"]}
    out["+beta2=0.9999"] = {**base_settings(), "beta2": 0.9999}
    out["+beta2=0.9999 +fisher"] = {**base_settings(), "beta2": 0.9999, **IVON_LIKE["fisher"]}
    # IVON's optimisation (small sigma_0, step lr / f_0 = 0.1, f nearly frozen) with our curvature and prior:
    # the candidate defaults, which also train ResNet-20
    out["+init +beta2 +lr"] = {**base_settings(), **IVON_LIKE["init"], **IVON_LIKE["beta2"], **IVON_LIKE["lr"]}
    out["+init +beta2=0.9999 +lr"] = {**out["+init +beta2 +lr"], "beta2": 0.9999}
    out["IVON"] = None
    return out


def flags(settings: dict) -> list[str]:
    """Noisy Adam's settings as ``train.py`` flags."""
    return ["--lr", repr(settings["lr"]), "--momentum", repr(settings["beta1"]), "--beta2", repr(settings["beta2"]),
            "--prior_var", repr(settings["prior_var"]), "--damping", repr(settings["damping"]),
            "--init_precision", repr(settings["init_precision"]), "--fisher", settings["fisher"]]


def train_run(task_name: str, settings: dict | None, seed: int, epochs: int, data: Data, args) -> dict:
    """Train Noisy Adam with ``settings`` (None: IVON at lr 0.1) and score it with each of ``args.samples``."""
    task = TASKS[task_name]
    train = data.split(task.dataset, True)
    test_x, test_y = data.split(task.dataset, False)
    method = "IVON" if settings is None else "NoisyAdam"
    opt = options(task, METHODS[method], seed, "--n", str(train[0].shape[0]), *(flags(settings) if settings else []),
                  data_root=args.data_root)
    run = Run(opt, METHODS[method], train, ivon_lr=0.1)
    seconds = []
    diverged = run.train(epochs, lambda epoch, result: seconds.append(result["seconds"]))
    record = {"task": task_name, "settings": settings, "seed": seed, "epochs": epochs, "diverged": diverged,
              "sec_per_epoch": statistics.mean(seconds) if seconds else None, "final": {}}
    if diverged:
        return record
    for k in args.samples:
        record["final"][str(k)] = scores(run.predict(test_x, k, epochs), test_y)
    return record


def report(store: dict, samples: list[int]) -> str:
    md = []
    by_task: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for key, r in store["runs"].items():
        name = key.split("|")[1]
        by_task.setdefault((r["task"], r["epochs"]), {}).setdefault(name, []).append(r)
    study = RESULTS / "accuracy.json"  # the accuracy study's runs of the same protocol, as reference rows
    if study.exists():
        for key, r in Store(study).runs.items():
            ref = {("NoisyAdam", 0.003): "base (accuracy.py)", ("IVON", 0.1): "IVON (accuracy.py)"}.get(
                (r["method"], r["lr"]))
            if ref and key.startswith("test|") and r["n_train"] == N_TRAIN and (r.get("task"), r["epochs"]) in by_task:
                final = {k: v for k, v in (r["final"] or {}).items() if k in ("acc", "nll", "ece")}
                by_task[(r["task"], r["epochs"])].setdefault(ref, []).append(
                    {"final": {"10": final} if final else {}, "sec_per_epoch": (r["final"] or {}).get("sec_per_epoch")})
    order = list(configs())
    rank = {t: i for i, t in enumerate(TASKS)}
    for (task, epochs), groups in sorted(by_task.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0][1])):
        main = str(10 if 10 in samples else samples[0])
        rows = []
        for name in sorted(groups, key=lambda n: order.index(n) if n in order else len(order)):
            rs = groups[name]
            ok = [r for r in rs if r["final"]]
            n = f"{len(ok)}" + (f" (+{len(rs) - len(ok)} diverged)" if len(ok) < len(rs) else "")
            f = [r["final"][main] for r in ok if main in r["final"]]
            rows.append([name, n, *(mean_sd([x[m] for x in f], fmt, scale, "-", zero_sd=True)
                                    for m, fmt, scale in (("acc", ".2f", 100), ("nll", ".4f", 1), ("ece", ".4f", 1))),
                         mean_sd([r["sec_per_epoch"] for r in ok], ".1f", missing="-", zero_sd=True)])
        md += [f"### {task}, {epochs} epochs (predictive: {main} samples)", "",
               *md_table(["config", "n", "test acc %", "NLL", "ECE", "s/epoch"], rows)]
        other = [k for k in samples if str(k) != main
                 and any(str(k) in r["final"] for rs in groups.values() for r in rs)]
        if other:
            rows = []
            for name in sorted(groups, key=lambda n: order.index(n) if n in order else len(order)):
                cells = []
                for k in other:
                    f = [r["final"][str(k)] for r in groups[name] if str(k) in r["final"]]
                    nll_, ece_ = (statistics.mean(x[m] for x in f) for m in ("nll", "ece")) if f else (0, 0)
                    cells.append(f"{nll_:.4f} / {ece_:.4f}" if f else "-")
                if any(c != "-" for c in cells):
                    rows.append([name, *cells])
            md += ["", "Predictive samples (same networks): NLL / ECE", "",
                   *md_table(["config", *(f"{k} samples" if k else "mean weights" for k in other)], rows)]
        md.append("")
    return "\n".join(md)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_root", default=None)
    p.add_argument("--tasks", default="mnist_mlp")
    p.add_argument("--configs", default=",".join(configs()), help="comma-separated config names")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples", default="10,0,1,32", help="predictive samples scored at the end (first: main)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "ivon_ablation.json")
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    args.samples = [int(k) for k in args.samples.split(",")]
    torch.set_num_threads(args.threads)
    store = Store(args.out)
    if not args.report_only:
        store["environment"] = environment(device="cpu")
        table, data = configs(), Data(args.data_root, "cpu")
        names = [c for c in args.configs.split(",") if c]
        unknown = [c for c in names if c not in table]
        if unknown:
            p.error(f"unknown config(s) {unknown}; choose from {list(table)}")

        def key(task: str, name: str, seed: int) -> str:
            return f"{task}|{name}|seed={seed}|epochs={args.epochs}"

        def one(task: str, name: str, seed: int) -> dict:
            t0 = time.perf_counter()
            run = train_run(task, table[name], seed, args.epochs, data, args)
            f = run["final"].get(str(args.samples[0]))
            print(f"{key(task, name, seed)}: " + (f"acc {f['acc']:.4f} nll {f['nll']:.4f} ece {f['ece']:.4f}" if f
                                                  else f"DIVERGED {run['diverged']}")
                  + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
            return run

        Study(args.tasks.split(","), names, range(args.seeds)).run(
            store, key, one, done=lambda run, task, name, seed: run["settings"] == table[name])
    print(report(store, args.samples))


if __name__ == "__main__":
    main()
