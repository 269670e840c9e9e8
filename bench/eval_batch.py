"""Benchmark: the evaluation's wall time against its batch size on the CPU (``--eval_batch_size``).

The predictive does not depend on the batch size (``evaluation.predict`` draws its S networks once), so the
batch size is a speed setting only, and every batch size does the same floating-point work: the FLOP ratio
between any two is 1, and what differs is memory traffic. This measures ``evaluation.predict`` of a Noisy Adam
(FFG) network at its initial posterior, S = 2 weight samples, on real test images (MNIST ``mlp`` and ``covnet``:
10,000; FashionMNIST ``resnet20``: 2,000), at batch sizes 32 .. 1000, for 1 and 2 intra-op threads, in one
process: interleaved rounds, medians, each as a multiple of batch 1000's time. It also checks that the
predictive is the same at every batch size (the largest absolute difference of a probability).

    python bench/eval_batch.py --data_root ../shared/data --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import RESULTS, environment, interleaved, write_json  # noqa: E402
from runner import Data, Method, Task, options  # noqa: E402

from evaluation import CPU_EVAL_BATCH_SIZE_PER_THREAD, predict  # noqa: E402
from experiment import make_model  # noqa: E402

#: architecture -> (task, test images timed)
CASES = {"mlp": (Task("MNIST", "mlp"), 10000), "covnet": (Task("MNIST", "covnet"), 10000),
         "resnet20": (Task("FashionMNIST", "resnet20"), 2000)}
BATCHES = (32, 64, 128, 256, 1000)
SAMPLES = 2
OUT = RESULTS / "eval_batch.json"


def measure(arch: str, threads: int, rounds: int, data: Data) -> dict:
    task, n = CASES[arch]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = make_model(options(task, Method("FFG"), 0, data_root=data.root))
    images = data.split(task.dataset, False)[0][:n]
    probs = {b: predict(model, images, SAMPLES, batch_size=b) for b in BATCHES}  # also the warm-up
    times = interleaved({str(b): (lambda b=b: predict(model, images, SAMPLES, batch_size=b)) for b in BATCHES},
                        rounds, warmup=0)
    med = {b: statistics.median(times[str(b)]) for b in BATCHES}
    return {"threads": threads, "images": n, "samples": SAMPLES, "median_s": {str(b): med[b] for b in BATCHES},
            "ratio_to_1000": {str(b): med[b] / med[1000] for b in BATCHES},
            "default_batch": CPU_EVAL_BATCH_SIZE_PER_THREAD * threads,
            "max_abs_diff": max(float((probs[b] - probs[1000]).abs().max()) for b in BATCHES)}


def report(results: dict) -> str:
    lines = ["| net | threads | " + " | ".join(f"batch {b}" for b in BATCHES) + " | batch 1000, s | same predictive |",
             "| --- | --- | " + " | ".join("---" for _ in BATCHES) + " | --- | --- |"]
    for key, r in results["runs"].items():
        cells = []
        for b in BATCHES:
            cell = f"{r['ratio_to_1000'][str(b)]:.2f}"
            cells.append(f"**{cell}**" if b == r["default_batch"] else cell)
        lines.append(f"| {key.split('|')[0]} | {r['threads']} | " + " | ".join(cells)
                     + f" | {r['median_s']['1000']:.3f} | max diff {r['max_abs_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_root", default=os.environ.get("DATA_ROOT"))
    p.add_argument("--archs", default=",".join(CASES))
    p.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args(argv)
    if args.report_only:
        print(report(json.loads(args.out.read_text())))
        return
    data = Data(args.data_root)
    results = {"environment": environment(), "rounds": args.rounds, "runs": {}}
    for arch in args.archs.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            results["runs"][f"{arch}|threads={threads}"] = r = measure(arch, threads, args.rounds, data)
            print(f"{arch} threads={threads}: " + ", ".join(f"{b} x{r['ratio_to_1000'][str(b)]:.2f}"
                                                            for b in BATCHES), flush=True)
    write_json(args.out, results)
    print(report(results))


if __name__ == "__main__":
    main()
