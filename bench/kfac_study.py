"""Benchmark: Noisy K-FAC's amortisation and low-rank factors against exact factors.

Each configuration is the seed's MVG command with the flags listed, ``train.py --model=MVG --epoch=3``
on MNIST (the MLP, or ``--arch=covnet``), scored by ``test.py --epoch=3`` (10 weight samples), run
through ``runner.run_commands``; seeds 0 .. S-1, 1 thread. Results accumulate in
``bench/results/kfac_study.json`` (a run already there is skipped), and the report prints mean ± sd.

    python bench/kfac_study.py --data_root ../shared/data --seeds 3               # every configuration
    python bench/kfac_study.py --data_root ../shared/data --only mlp/rank64 --seeds 1
    python bench/kfac_study.py --report_only
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from runner import Store, Study, commands_parser, md_table, mean_sd, run_commands  # noqa: E402

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
OUT = RESULTS / "kfac_study.json"


def report(runs: dict) -> None:
    rows = []
    for name in CONFIGS:
        done = [r for key, r in runs.items() if key.rsplit("|", 1)[0] == name]
        if not done:
            continue
        rows.append([name, len(done), *(mean_sd([r[k] for r in done], fmt, scale, zero_sd=True)
                                         for k, fmt, scale in (("test_acc", ".2f", 100), ("test_nll", ".4f", 1),
                                                               ("test_ece", ".4f", 1),
                                                               ("sec_per_epoch_median", ".1f", 1)))])
    print("\n".join(md_table(["configuration", "n", "test acc %", "NLL", "ECE", "s/epoch"], rows)))


def main() -> None:
    args = commands_parser(__doc__, CONFIGS, seeds=3).parse_args()
    store = Store(OUT)
    if not args.report_only:
        with tempfile.TemporaryDirectory() as tmp:
            def one(task: None, name: str, seed: int) -> dict:
                flags = ["--model=MVG", "--dataset=MNIST", f"--seed={seed}", *CONFIGS[name]]
                run_name = f"{name}_seed{seed}".replace("/", "_").replace(",", "_")
                return run_commands(run_name, flags, EPOCHS, Path(tmp), args.data_root, args.num_threads).summary()

            Study([None], args.only, range(args.seeds)).run(store, lambda task, name, seed: f"{name}|seed={seed}", one)
    report(store.runs)


if __name__ == "__main__":
    main()
