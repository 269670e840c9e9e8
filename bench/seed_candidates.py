"""The first seed's Noisy Adam command under each candidate for the diagonal defaults.

    python bench/seed_candidates.py --data_root ../shared/data
    python bench/seed_candidates.py --report_only

Each run is the first seed's command line verbatim, ``python train.py --model=FFG --batch_size=100 --lr=1e-3
--dataset=MNIST`` (train.py's 20 epochs), with a candidate's flags added for what the candidate changes besides the
learning rate, then ``test.py --epoch=20`` (``runner.run_commands``). The target is ``bench/acceptance.py``'s:
97.5% and a log loss below Adam's 20-epoch run (``acceptance.json``, ``map20``). Runs already in
``bench/results/seed_candidates.json`` are not run again; prints a markdown table.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from runner import Store, Study, commands_parser, md_table, run_commands  # noqa: E402

SEED_FFG = ["--model=FFG", "--batch_size=100", "--lr=1e-3", "--dataset=MNIST"]
#: name -> the flags added to the seed's command (the defaults: --beta2 0.9999 --init_precision 1e3)
CANDIDATES = {
    "defaults": [],
    "b9998": ["--beta2", "0.9998"],
    "b9995": ["--beta2", "0.9995"],
    "b999": ["--beta2", "0.999"],
    "i1e4": ["--init_precision", "1e4"],
    "warm_start": ["--warm_start", "true"],
    "ivon_regime": ["--beta2", "0.99999", "--init_precision", "6e4"],
}


def report(runs: dict) -> None:
    adam = json.loads((RESULTS / "acceptance.json").read_text())["runs"].get("map20")
    rows = [[name, f"`{runs[name]['command']}`", f"{100 * runs[name]['test_acc']:.2f}%",
             f"{runs[name]['test_nll']:.4f}", f"{runs[name]['test_ece']:.4f}"]
            for name in CANDIDATES if name in runs]
    if adam:
        rows.append(["Adam (acceptance.json)", f"`{adam['command']}`", f"{100 * adam['test_acc']:.2f}%",
                     f"{adam['test_nll']:.4f}", f"{adam['test_ece']:.4f}"])
    print("\n" + "\n".join(md_table(["candidate", "command", "test acc (test.py)", "NLL", "ECE"], rows)))


def main() -> None:
    parser = commands_parser(__doc__, CANDIDATES)
    parser.add_argument("--out", default=str(RESULTS / "seed_candidates.json"))
    args = parser.parse_args()
    store = Store(args.out)
    if not args.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            def one(task: None, name: str, seed: int) -> dict:
                return run_commands(name, SEED_FFG + CANDIDATES[name], None, Path(tmp), args.data_root,
                                    args.num_threads, quiet=True).summary()

            Study([None], args.only, [0]).run(store, lambda task, name, seed: name, one)
    report(store.runs)


if __name__ == "__main__":
    main()
