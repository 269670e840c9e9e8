"""The MNIST runs the issues name as acceptance, and the seeds' own commands verbatim.

    python bench/acceptance.py --data_root ../shared/data            # about 15-30 min on 2 CPU cores
    python bench/acceptance.py --data_root ../shared/data --only seed_ffg seed_mvg

Each run is ``train.py`` with the flags listed (nothing else but where to write, the thread count and no
dashboard), then ``test.py --epoch=N`` on the result (its JSON line is parsed). The ``seed_*`` runs are the
first seed's command lines as it prints them, ``--lr`` included, with train.py's default epoch count (20)
and the seed's ``test.py --epoch=20``. The 1-epoch figures are read from the epoch-1 record of the same
run's ``metrics.jsonl``. Writes ``bench/results/acceptance.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from option_parser import TrainOptions  # noqa: E402
from util.run_dir import RunDir  # noqa: E402

#: name -> (train.py flags, epochs (None: train.py's default, as the seed ran it), threshold on test.py
#: accuracy, 1-epoch threshold or None)
RUNS = {
    "seed_ffg": (["--model=FFG", "--batch_size=100", "--lr=1e-3", "--dataset=MNIST"], None, 0.975, None),
    "seed_mvg": (["--model=MVG", "--batch_size=100", "--lr=1e-2", "--dataset=MNIST", "--n=60000"], None, 0.97,
                 None),
    "ffg3": (["--model=FFG", "--dataset=MNIST"], 3, 0.955, 0.93),
    "mvg3": (["--model=MVG", "--dataset=MNIST"], 3, 0.955, 0.93),
    "vogn3": (["--model=FFG", "--optimizer=vogn", "--arch=covnet", "--dataset=MNIST"], 3, 0.98, 0.96),
    "ffg20": (["--model=FFG", "--dataset=MNIST"], 20, 0.975, None),
    "map20": (["--model=MAP", "--dataset=MNIST"], 20, None, None),
}


def run(name: str, flags: list[str], epochs: int | None, ckpt_dir: Path, data_root: str | None,
        threads: int) -> dict:
    common = ["--ckpt_dir", str(ckpt_dir), "--name", name, "--num_threads", str(threads)]
    if data_root:
        common += ["--data_root", data_root]
    epoch_flag = [] if epochs is None else [f"--epoch={epochs}"]
    epochs = epochs or TrainOptions().parse(flags + ["--no_visdom"]).epoch
    train = [sys.executable, "train.py", *flags, *epoch_flag, "--no_visdom", "--no_progress", *common]
    print("$", " ".join(train[1:]), flush=True)
    subprocess.run(train, cwd=REPO, check=True)
    test = [sys.executable, "test.py", f"--epoch={epochs}", *common]
    out = subprocess.run(test, cwd=REPO, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    records = RunDir(ckpt_dir / name).read_metrics()
    epochs_rec = [r for r in records if r["kind"] == "epoch"]
    result["epoch1_test_acc"] = epochs_rec[0]["test_acc"]
    result["sec_per_epoch_median"] = statistics.median(r["sec_per_epoch"] for r in epochs_rec)
    result["command"] = " ".join(["python train.py", *flags, *epoch_flag])
    result["test_command"] = f"python test.py --epoch={epochs}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", default=None)
    parser.add_argument("--only", nargs="+", choices=tuple(RUNS), default=list(RUNS))
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "acceptance.json"))
    args = parser.parse_args()

    results = {}
    out = Path(args.out)
    if out.exists():
        results = json.loads(out.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            flags, epochs, _, _ = RUNS[name]
            results[name] = run(name, flags, epochs, Path(tmp), args.data_root, args.num_threads)
            out.write_text(json.dumps(results, indent=2) + "\n")

    print("\n| run | command | test acc (test.py) | target | epoch-1 acc | target | NLL | ECE | s/epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, (_, _, target, target1) in RUNS.items():
        if name not in results:
            continue
        r = results[name]
        t = f">= {100 * target:.1f}" if target else ""
        t1 = f">= {100 * target1:.0f}" if target1 else ""
        if name == "seed_ffg" and "map20" in results:  # the seed's Noisy Adam must also beat Adam's log loss
            t += f", NLL < Adam's {results['map20']['test_nll']:.4f}"
        print(f"| {name} | `{r['command']}` | {100 * r['test_acc']:.2f}% | {t} | {100 * r['epoch1_test_acc']:.2f}% | "
              f"{t1} | {r['test_nll']:.4f} | {r['test_ece']:.4f} | {r['sec_per_epoch_median']:.1f} |")


if __name__ == "__main__":
    main()
