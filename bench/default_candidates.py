"""The candidates for the defaults on the runs that bound them: the first seed's commands and a BatchNorm ResNet.

    python bench/default_candidates.py --data_root ../shared/data                  # every run (ResNet-20: long)
    python bench/default_candidates.py --data_root ../shared/data --only seed_defaults seed_b999
    python bench/default_candidates.py --report_only

``seed_*``: the first seed's command line verbatim, ``python train.py --model=FFG --batch_size=100 --lr=1e-3
--dataset=MNIST`` (train.py's 20 epochs), plus what the candidate changes besides the learning rate; its target is
``bench/acceptance.py``'s, 97.5% and a log loss below Adam's 20-epoch run (``acceptance.json``, ``map20``).
``seed_mvg_*``: the first seed's Noisy K-FAC command verbatim (``--model=MVG --batch_size=100 --lr=1e-2
--dataset=MNIST --n=60000``) at another KL clip; its target is 97%. ``resnet20_*``: FashionMNIST ResNet-20, batch
128, at the candidate's flags. Each run is ``train.py`` then ``test.py --epoch=N`` (10 weight samples;
``runner.run_commands``); runs already in ``bench/results/default_candidates.json`` are not run again, and a run
finished in ``--ckpt_dir`` is only tested.
Prints a markdown table.
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
SEED_MVG = ["--model=MVG", "--batch_size=100", "--lr=1e-2", "--dataset=MNIST", "--n=60000"]
RESNET20 = ["--model=FFG", "--arch=resnet20", "--dataset=FashionMNIST", "--batch_size=128"]
#: the MNIST defaults spelled out (a ResNet-20 takes the normalised-network defaults unless they are given)
MNIST_DEFAULTS = ["--lr", "3e-3", "--beta2", "0.9999", "--init_precision", "1e3"]
#: name -> (train.py flags, epochs: None is train.py's default)
CANDIDATES = {
    "seed_defaults": (SEED_FFG, None),
    "seed_b9998": (SEED_FFG + ["--beta2", "0.9998"], None),
    "seed_b9995": (SEED_FFG + ["--beta2", "0.9995"], None),
    "seed_b999": (SEED_FFG + ["--beta2", "0.999"], None),
    "seed_i1e4": (SEED_FFG + ["--init_precision", "1e4"], None),
    "seed_warm_start": (SEED_FFG + ["--warm_start", "true"], None),
    "seed_ivon_regime": (SEED_FFG + ["--beta2", "0.99999", "--init_precision", "6e4"], None),
    "seed_mvg_defaults": (SEED_MVG, None),
    "seed_mvg_clip1e-3": (SEED_MVG + ["--kl_clip", "1e-3"], None),
    "seed_mvg_clip_off": (SEED_MVG + ["--kl_clip", "0"], None),
    "seed_mvg_prior_auto": (SEED_MVG + ["--prior_var", "auto"], None),
    "resnet20_mnist_defaults": (RESNET20 + MNIST_DEFAULTS, 1),
    "resnet20_i1e4_lr1e-2": (RESNET20 + ["--lr", "1e-2", "--beta2", "0.9999", "--init_precision", "1e4"], 3),
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
    parser.add_argument("--out", default=str(RESULTS / "default_candidates.json"))
    parser.add_argument("--ckpt_dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    store = Store(args.out)
    if not args.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            def one(task: None, name: str, seed: int) -> dict:
                flags, epochs = CANDIDATES[name]
                return run_commands(name, flags, epochs, Path(args.ckpt_dir or tmp), args.data_root,
                                    args.num_threads, quiet=True).summary()

            Study([None], args.only, [0]).run(store, lambda task, name, seed: name, one)
    report(store.runs)


if __name__ == "__main__":
    main()
