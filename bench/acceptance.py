"""The MNIST runs named as acceptance, and the seeds' own commands verbatim.

    python bench/acceptance.py --data_root ../shared/data            # every run (the 20-epoch ones are long)
    python bench/acceptance.py --data_root ../shared/data --only seed_ffg seed_mvg
    python bench/acceptance.py --report_only

Each run is ``train.py`` with the flags listed (nothing else but where to write, the thread count and no
dashboard), then ``test.py --epoch=N`` on the result (its JSON line is parsed): ``runner.run_commands``. The
``seed_*`` runs are the first seed's command lines as it prints them, ``--lr`` included, with train.py's default
epoch count (20) and the seed's ``test.py --epoch=20``. The 1-epoch figures are read from the epoch-1 record of the
same run's ``metrics.jsonl``. Writes ``bench/results/acceptance.json`` (every listed run is run again) and prints a
markdown table.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from runner import Store, Study, commands_parser, md_table, run_commands  # noqa: E402

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


def report(runs: dict) -> None:
    rows = []
    for name, (_, _, target, target1) in RUNS.items():
        if name not in runs:
            continue
        r = runs[name]
        t = f">= {100 * target:.1f}" if target else ""
        t1 = f">= {100 * target1:.0f}" if target1 else ""
        if name == "seed_ffg" and "map20" in runs:  # the seed's Noisy Adam must also beat Adam's log loss
            t += f", NLL < Adam's {runs['map20']['test_nll']:.4f}"
        rows.append([name, f"`{r['command']}`", f"{100 * r['test_acc']:.2f}%", t, f"{100 * r['epoch1_test_acc']:.2f}%",
                     t1, f"{r['test_nll']:.4f}", f"{r['test_ece']:.4f}", f"{r['sec_per_epoch_median']:.1f}"])
    print("\n" + "\n".join(md_table(["run", "command", "test acc (test.py)", "target", "epoch-1 acc", "target", "NLL",
                                     "ECE", "s/epoch"], rows)))


def main() -> None:
    parser = commands_parser(__doc__, RUNS)
    parser.add_argument("--out", default=str(RESULTS / "acceptance.json"))
    args = parser.parse_args()
    store = Store(args.out)
    if not args.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            def one(task: None, name: str, seed: int) -> dict:
                flags, epochs, _, _ = RUNS[name]
                return run_commands(name, flags, epochs, Path(tmp), args.data_root, args.num_threads).summary()

            Study([None], args.only, [0]).run(store, lambda task, name, seed: name, one, done=lambda *_: False)
    report(store.runs)


if __name__ == "__main__":
    main()
