"""Benchmark: Noisy K-FAC's amortisation and low-rank factors against exact factors (issue 11).

Each configuration is the seed's MVG command with the flags listed, ``train.py --model=MVG --epoch=3``
on MNIST (the MLP, or ``--arch=covnet``), scored by ``test.py --epoch=3`` (10 weight samples), run
through ``bench/acceptance.py``'s ``run``; seeds 0 .. S-1, 1 thread. Results accumulate in
``bench/results/kfac_study.json`` (a run already there is skipped), and the report prints mean ± sd.

    python bench/kfac_study.py --data_root ../shared/data --seeds 3               # every configuration
    python bench/kfac_study.py --data_root ../shared/data --only mlp/rank64 --seeds 1
    python bench/kfac_study.py --report_only
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from acceptance import REPO, run

EPOCHS = 3
#: name -> train.py flags after ``--model=MVG --dataset=MNIST``
CONFIGS = {
    "mlp/t1,20": ["--t_stats=1", "--t_inv=20"],
    "mlp/defaults": [],
    "mlp/t10,200": ["--t_inv=200"],
    "mlp/rank16": ["--kfac_rank=16"],
    "mlp/rank32": ["--kfac_rank=32"],
    "mlp/rank64": ["--kfac_rank=64"],
    "mlp/rank128": ["--kfac_rank=128"],
    "covnet/t1,20": ["--arch=covnet", "--t_stats=1", "--t_inv=20", "--kfac_conv_stride=1"],
    "covnet/stride1": ["--arch=covnet", "--kfac_conv_stride=1"],
    "covnet/stride1,t10,200": ["--arch=covnet", "--kfac_conv_stride=1", "--t_inv=200"],
    "covnet/defaults": ["--arch=covnet"],
}
#: runs kept from the previous round's code (same math, other rounding): reported, not re-run
EARLIER = {"mlp/defaults_r4": "mlp/defaults", "covnet/stride1_r4": "covnet/stride1"}
OUT = REPO / "bench" / "results" / "kfac_study.json"


def _cell(runs: list[dict], key: str, scale: float = 1.0, digits: int = 4) -> str:
    xs = [scale * r[key] for r in runs]
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {sd:.{digits}f}"


def report(results: dict) -> None:
    print("| configuration | n | test acc % | NLL | ECE | s/epoch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in [*CONFIGS, *EARLIER]:
        runs = [r for key, r in results.items() if key.rsplit("|", 1)[0] == name]
        if not runs:
            continue
        label = f"{EARLIER[name]} (previous round's code)" if name in EARLIER else name
        print(f"| {label} | {len(runs)} | {_cell(runs, 'test_acc', 100, 2)} | {_cell(runs, 'test_nll')} | "
              f"{_cell(runs, 'test_ece')} | {_cell(runs, 'sec_per_epoch_median', 1, 1)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default=None)
    p.add_argument("--only", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if not args.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(args.seeds):
                for name in args.only:
                    key = f"{name}|seed={seed}"
                    if key in results:
                        continue
                    flags = ["--model=MVG", "--dataset=MNIST", f"--seed={seed}", *CONFIGS[name]]
                    run_name = key.replace("/", "_").replace("|", "_").replace(",", "_").replace("=", "")
                    results[key] = run(run_name, flags, EPOCHS, Path(tmp), args.data_root, args.num_threads)
                    OUT.write_text(json.dumps(results, indent=2) + "\n")
    report(results)


if __name__ == "__main__":
    main()
