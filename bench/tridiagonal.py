"""Benchmark: block-tridiagonal vs block-diagonal Noisy K-FAC vs Noisy Adam on the MNIST MLP (issue 12).

Two architectures, ``mlp`` 784-100-10 (``--hidden 100``) and 784-100-100-10 (``--hidden 100 100``); methods
``NoisyAdam`` (FFG), ``KFAC-diag`` (``--kfac_structure block_diagonal``) and ``KFAC-tri``
(``--kfac_structure block_tridiagonal``). Each run is what ``train.py`` does with those flags (options from
``TrainOptions().parse``, model and optimizer from ``experiment``; same in-memory loader and seed), at the
learning rates ``bench/accuracy.py``'s 10-epoch sweep chose (Noisy Adam 3e-3, Noisy K-FAC 1e-3, the same for
both structures), Noisy K-FAC with ``--t_stats 1 --t_inv 20`` (the defaults when this was measured) and every
other setting at its default. After the last epoch: test accuracy, NLL, ECE (15
bins) of the predictive over 10 weight samples, and OOD AUROC of the predictive entropy (MNIST test vs
FashionMNIST test).

Step time is measured separately, in one process, interleaved (``common.interleaved``): blocks of 20 training
steps (one ``t_inv`` period, so the refresh is included once per block) of Adam, Noisy Adam and the two
Noisy K-FAC structures on the same batches; medians over the rounds, ratios to Adam and tri / diag.

Results go to ``bench/results/tridiagonal.json`` (runs already there are skipped) and
``docs/results_tridiagonal.md``.

    python bench/tridiagonal.py --data_root ../shared/data --epochs 3 --seeds 3
    python bench/tridiagonal.py --report_only
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import REPO, RESULTS, environment, interleaved, training_steps  # noqa: E402

from data import InMemoryLoader, load_split  # noqa: E402
from evaluation import evaluate, ood_auroc, predict  # noqa: E402
from experiment import finite, make_model, make_optimizer  # noqa: E402
from option_parser import TrainOptions  # noqa: E402

#: method -> train.py flags
METHODS = {
    "NoisyAdam": ("--model", "FFG", "--lr", "3e-3"),
    "KFAC-diag": ("--model", "MVG", "--lr", "1e-3", "--t_stats", "1", "--t_inv", "20",
                  "--kfac_structure", "block_diagonal"),
    "KFAC-tri": ("--model", "MVG", "--lr", "1e-3", "--t_stats", "1", "--t_inv", "20",
                 "--kfac_structure", "block_tridiagonal"),
}
HIDDEN = {"784-100-10": ("100",), "784-100-100-10": ("100", "100")}
TEST_SAMPLES = 10
JSON = RESULTS / "tridiagonal.json"
MD = REPO / "docs" / "results_tridiagonal.md"


def options(method: str, hidden: str, seed: int, data_root: str | None, epochs: int) -> argparse.Namespace:
    argv = [*METHODS[method], "--hidden", *HIDDEN[hidden], "--seed", str(seed), "--epoch", str(epochs),
            "--test_samples", str(TEST_SAMPLES), "--device", "cpu", "--no_visdom", "--no_progress"]
    if data_root:
        argv += ["--data_root", data_root]
    return TrainOptions().parse(argv)


def run(method: str, hidden: str, seed: int, epochs: int, data: dict) -> dict:
    opt = options(method, hidden, seed, data["root"], epochs)
    train_x, train_y = data["train"]
    loader = InMemoryLoader(train_x, train_y, opt.batch_size, shuffle=True, seed=opt.seed)
    torch.manual_seed(opt.seed)
    model = make_model(opt)
    optimizer = make_optimizer(opt, model)
    torch.manual_seed(opt.seed)
    seconds = []
    for epoch in range(1, epochs + 1):
        model.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        seconds.append(time.perf_counter() - t0)
        if not finite(model):
            return {"diverged": f"epoch {epoch}"}
    metrics, probs = evaluate(model, *data["test"], TEST_SAMPLES, seed, epochs)
    metrics["ood_auroc"] = ood_auroc(probs, predict(model, data["ood"], TEST_SAMPLES, seed, epochs))
    metrics["sec_per_epoch"] = statistics.mean(seconds)
    if hasattr(optimizer, "guard_count"):
        metrics["guard_count"] = optimizer.guard_count()
    return metrics


def step_times(data: dict, rounds: int) -> dict:
    """Median seconds per step of 20-step blocks, interleaved; per architecture."""
    train_x, train_y = data["train"]
    batches = [(train_x[i:i + 100], train_y[i:i + 100]) for i in range(0, 2000, 100)]
    out = {}
    for hidden in HIDDEN:
        blocks = {}
        for method in ("Adam", *METHODS):
            flags = ("--model", "MAP") if method == "Adam" else METHODS[method]
            opt = TrainOptions().parse([*flags, "--hidden", *HIDDEN[hidden], "--device", "cpu", "--no_visdom"])
            torch.manual_seed(0)
            model = make_model(opt)
            optimizer = make_optimizer(opt, model)
            model.train()
            blocks[method] = training_steps(model, optimizer, batches, 20)
        samples = interleaved(blocks, rounds)
        med = {m: statistics.median(s) / 20 for m, s in samples.items()}
        out[hidden] = {"ms_per_step": {m: 1e3 * v for m, v in med.items()},
                       "ratio_to_adam": {m: v / med["Adam"] for m, v in med.items()},
                       "tri_over_diag": med["KFAC-tri"] / med["KFAC-diag"], "rounds": rounds}
    return out


def mean_sd(xs: list[float], fmt: str = ".4f") -> str:
    if not xs:
        return "-"
    m = statistics.mean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:{fmt}} ± {sd:{fmt}}"


def report(store: dict) -> str:
    env = store.get("environment", {})
    lines = ["# Block-tridiagonal Noisy K-FAC: results", "",
             "Generated by `bench/tridiagonal.py` from `bench/results/tridiagonal.json`; do not edit by hand. "
             "Method: docs/MATH.md, \"Block-tridiagonal Noisy K-FAC\".", "",
             f"MNIST, `mlp`, {store.get('epochs')} epochs, batch 100, 60000 training examples, seeds "
             f"{store.get('seeds')}; test split; predictive = mean softmax over {TEST_SAMPLES} weight samples; "
             "OOD AUROC: predictive entropy, MNIST test vs FashionMNIST test. Learning rates: bench/accuracy.py's "
             "sweep (Noisy Adam 3e-3, Noisy K-FAC 1e-3 for both structures), everything else at the defaults "
             "(Noisy K-FAC: damping 1e-3, prior variance 1, t_stats 1, t_inv 20, kl_clip 1e-3, momentum 0.9). "
             "Mean ± sd over seeds.", "",
             f"Machine: {env.get('summary', 'see JSON')}.", "",
             "```", "python bench/tridiagonal.py --data_root ../shared/data --epochs 3 --seeds 3", "```", ""]
    for hidden in HIDDEN:
        lines += [f"## {hidden}", "",
                  "| method | n | test acc % | NLL | ECE | OOD AUROC | s/epoch | guard acted (refreshes) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        finals = {}
        for method in METHODS:
            runs = [r for k, r in store["runs"].items() if k.startswith(f"{hidden}|{method}|")]
            ok = [r for r in runs if "diverged" not in r]
            finals[method] = ok
            guards = [r["guard_count"] for r in ok if "guard_count" in r]
            lines.append(
                f"| {method} | {len(ok)}{' (' + str(len(runs) - len(ok)) + ' diverged)' if len(ok) < len(runs) else ''}"
                f" | {mean_sd([100 * r['acc'] for r in ok], '.2f')} | {mean_sd([r['nll'] for r in ok])} | "
                f"{mean_sd([r['ece'] for r in ok])} | {mean_sd([r['ood_auroc'] for r in ok])} | "
                f"{mean_sd([r['sec_per_epoch'] for r in ok], '.1f')} | {', '.join(map(str, guards)) or '-'} |")
        tri, diag = finals.get("KFAC-tri"), finals.get("KFAC-diag")
        if tri and diag:
            d = {k: statistics.mean(r[k] for r in tri) - statistics.mean(r[k] for r in diag)
                 for k in ("acc", "nll", "ece", "ood_auroc")}
            rel = statistics.mean(r["nll"] for r in tri) / statistics.mean(r["nll"] for r in diag)
            lines += ["", f"Tri minus diag (means): accuracy {100 * d['acc']:+.2f} points, NLL {d['nll']:+.4f} "
                      f"(x{rel:.3f}), ECE {d['ece']:+.4f}, OOD AUROC {d['ood_auroc']:+.4f}."]
        st = store.get("step_time", {}).get(hidden)
        if st:
            ms, ratio = st["ms_per_step"], st["ratio_to_adam"]
            lines += ["", f"Step time (median over {st['rounds']} interleaved rounds of 20-step blocks, one t_inv "
                      "period each, same process): " + ", ".join(f"{m} {ms[m]:.2f} ms (x{ratio[m]:.2f} Adam)"
                                                                for m in ms)
                      + f"; **tri / diag = {st['tri_over_diag']:.2f}** (target <= 1.5)."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_root", default=os.environ.get("DATA_ROOT"))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the step-time measurement")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--skip_runs", action="store_true", help="only the step-time measurement")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    store = json.loads(JSON.read_text()) if JSON.exists() else {"runs": {}}
    if not args.report_only:
        data = {"root": args.data_root, "train": load_split("MNIST", True, args.data_root, "cpu"),
                "test": load_split("MNIST", False, args.data_root, "cpu"),
                "ood": load_split("FashionMNIST", False, args.data_root, "cpu")[0]}
        store.update(epochs=args.epochs, seeds=list(range(args.seeds)), environment=environment())
        store["environment"]["summary"] = (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} "
                                           f"thread(s), load average {os.getloadavg()[0]:.1f} at the start; the "
                                           "machine was shared with other jobs, so times are noisy")
        if not args.skip_runs:
            for seed, hidden, method in itertools.product(range(args.seeds), HIDDEN, METHODS):
                key = f"{hidden}|{method}|seed={seed}|epochs={args.epochs}"
                if key in store["runs"]:
                    continue
                t0 = time.perf_counter()
                store["runs"][key] = run(method, hidden, seed, args.epochs, data)
                print(f"{key}: {store['runs'][key]} ({time.perf_counter() - t0:.0f}s)", flush=True)
                _save(store)
        store["step_time"] = step_times(data, args.rounds)
        print(json.dumps(store["step_time"], indent=1), flush=True)
        _save(store)
    text = report(store)
    MD.write_text(text + "\n")
    print(text)


def _save(store: dict) -> None:
    JSON.parent.mkdir(parents=True, exist_ok=True)
    tmp = JSON.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(store, indent=1) + "\n")
    os.replace(tmp, JSON)


if __name__ == "__main__":
    main()
