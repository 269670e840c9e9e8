"""Benchmark: which of IVON's ingredients make it better calibrated than Noisy Adam (issue 15).

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
predictive samples comes from the same trained networks. Training follows ``bench/accuracy.py``
(same loader, seeding, batch 100, 1 MC sample per step).

    python bench/ivon_ablation.py --data_root ../shared/data --tasks mnist_mlp --epochs 10 --seeds 3
    python bench/ivon_ablation.py --data_root ../shared/data --tasks mnist_covnet,fmnist_covnet --epochs 5 \\
        --configs base,ivon-like,IVON
    python bench/ivon_ablation.py --report_only

Results accumulate in ``bench/results/ivon_ablation.json`` (a run already there is skipped). The report
adds, as reference rows, the accuracy study's runs of Noisy Adam (old defaults, lr 3e-3) and IVON (lr 0.1)
from ``bench/results/accuracy.json``: same protocol, other random streams (that study also scores every epoch).
s/epoch was measured on a shared, heavily loaded machine: not comparable between rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ivon  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accuracy import TASKS, Data, options  # noqa: E402
from common import RESULTS, environment, ivon_predict  # noqa: E402

from data import InMemoryLoader  # noqa: E402
from evaluation import predict  # noqa: E402
from experiment import make_model  # noqa: E402
from optimizers import NoisyAdam  # noqa: E402
from util.metrics import accuracy, ece, nll  # noqa: E402

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
    # the candidate defaults, which also train ResNet-20 (issue 10)
    out["+init +beta2 +lr"] = {**base_settings(), **IVON_LIKE["init"], **IVON_LIKE["beta2"], **IVON_LIKE["lr"]}
    out["+init +beta2=0.9999 +lr"] = {**out["+init +beta2 +lr"], "beta2": 0.9999}
    out["IVON"] = None
    return out


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels), "ece": ece(probs, labels)}


def train_run(task_name: str, settings: dict | None, seed: int, epochs: int, data: Data, args) -> dict:
    task = TASKS[task_name]
    train_x, train_y = data.split(task.dataset, True)
    test_x, test_y = data.split(task.dataset, False)
    is_ivon = settings is None
    opt = options(task, "IVON" if is_ivon else "NoisyAdam", 0.1 if is_ivon else settings["lr"], train_x.shape[0],
                  seed, args.data_root, "cpu", False)
    loader = InMemoryLoader(train_x, train_y, opt.batch_size, shuffle=True, seed=opt.seed)
    torch.manual_seed(opt.seed)
    model = make_model(opt)
    if is_ivon:
        optimizer = ivon.IVON(model.parameters(), lr=0.1, ess=train_x.shape[0])
    else:
        s = settings
        optimizer = NoisyAdam(model, lr=s["lr"], betas=(s["beta1"], s["beta2"]), num_data=train_x.shape[0],
                              prior_var=s["prior_var"], damping=s["damping"], init_precision=s["init_precision"],
                              fisher=s["fisher"])
    torch.manual_seed(opt.seed)
    seconds, diverged = 0.0, None
    for epoch in range(1, epochs + 1):
        model.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad()
            if is_ivon:
                with optimizer.sampled_params(train=True):
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
            else:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            if not math.isfinite(loss.item()):
                diverged = f"loss {loss.item()} in epoch {epoch}"
                break
            optimizer.step()
        seconds += time.perf_counter() - t0
        if diverged:
            break
    run = {"task": task_name, "settings": settings, "seed": seed, "epochs": epochs, "diverged": diverged,
           "sec_per_epoch": seconds / epoch, "final": {}}
    if diverged:
        return run
    model.eval()
    for k in args.samples:
        if not is_ivon:
            probs = predict(model, test_x, k, seed, epochs)
        elif k > 0:
            probs = ivon_predict(model, optimizer, test_x, k, seed, epochs)
        else:
            with torch.no_grad():
                probs = torch.cat([F.softmax(model(test_x[i:i + 1000]), -1) for i in range(0, len(test_x), 1000)])
        run["final"][str(k)] = scores(probs, test_y)
    return run


def _ms(xs: list[float], fmt: str, scale: float = 1.0) -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs) * scale
    sd = statistics.stdev(xs) * scale if len(xs) > 1 else 0.0
    return f"{m:{fmt}} ± {sd:{fmt}}"


def report(store: dict, samples: list[int]) -> str:
    md = []
    by_task: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for key, r in store["runs"].items():
        name = key.split("|")[1]
        by_task.setdefault((r["task"], r["epochs"]), {}).setdefault(name, []).append(r)
    study = RESULTS / "accuracy.json"  # the accuracy study's runs of the same protocol, as reference rows
    if study.exists():
        for key, r in json.loads(study.read_text())["runs"].items():
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
        md += [f"### {task}, {epochs} epochs (predictive: {main} samples)", "",
               "| config | n | test acc % | NLL | ECE | s/epoch |", "| --- | --- | --- | --- | --- | --- |"]
        for name in sorted(groups, key=lambda n: order.index(n) if n in order else len(order)):
            rs = groups[name]
            ok = [r for r in rs if r["final"]]
            n = f"{len(ok)}" + (f" (+{len(rs) - len(ok)} diverged)" if len(ok) < len(rs) else "")
            f = [r["final"][main] for r in ok if main in r["final"]]
            md.append(f"| {name} | {n} | {_ms([x['acc'] for x in f], '.2f', 100)} | {_ms([x['nll'] for x in f], '.4f')}"
                      f" | {_ms([x['ece'] for x in f], '.4f')} | {_ms([r['sec_per_epoch'] for r in ok], '.1f')} |")
        other = [k for k in samples if str(k) != main
                 and any(str(k) in r["final"] for rs in groups.values() for r in rs)]
        if other:
            md += ["", "Predictive samples (same networks): NLL / ECE", "",
                   "| config | " + " | ".join(f"{k} samples" if k else "mean weights" for k in other) + " |",
                   "| --- " * (len(other) + 1) + "|"]
            for name in sorted(groups, key=lambda n: order.index(n) if n in order else len(order)):
                cells = []
                for k in other:
                    f = [r["final"][str(k)] for r in groups[name] if str(k) in r["final"]]
                    nll_, ece_ = (statistics.mean(x[m] for x in f) for m in ("nll", "ece")) if f else (0, 0)
                    cells.append(f"{nll_:.4f} / {ece_:.4f}" if f else "-")
                if any(c != "-" for c in cells):
                    md.append(f"| {name} | " + " | ".join(cells) + " |")
        md.append("")
    return "\n".join(md)


def save(path: Path, store: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(store, indent=1) + "\n")
    os.replace(tmp, path)


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
    store = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    if not args.report_only:
        store["environment"] = environment(device="cpu")
        table, data = configs(), Data(args.data_root, "cpu")
        names = [c for c in args.configs.split(",") if c]
        unknown = [c for c in names if c not in table]
        if unknown:
            p.error(f"unknown config(s) {unknown}; choose from {list(table)}")
        for seed in range(args.seeds):  # seeds outer: a partial study has every task and config at seed 0
            for task in args.tasks.split(","):
                for name in names:
                    key = f"{task}|{name}|seed={seed}|epochs={args.epochs}"
                    if key in store["runs"] and store["runs"][key]["settings"] == table[name]:
                        continue
                    t0 = time.perf_counter()
                    run = train_run(task, table[name], seed, args.epochs, data, args)
                    store["runs"][key] = run
                    save(args.out, store)
                    f = run["final"].get(str(args.samples[0]))
                    print(f"{key}: " + (f"acc {f['acc']:.4f} nll {f['nll']:.4f} ece {f['ece']:.4f}" if f
                                        else f"DIVERGED {run['diverged']}") + f" ({time.perf_counter() - t0:.0f}s)",
                          flush=True)
    print(report(store, args.samples))


if __name__ == "__main__":
    main()
