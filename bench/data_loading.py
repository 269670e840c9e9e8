"""Benchmark: one MNIST training epoch of data loading, in-memory vs DataLoader.

Compares :class:`data.InMemoryLoader` over the whole normalized MNIST train
split (batch 100, shuffled) against the usual
``DataLoader(torchvision.datasets.MNIST(root, transform=ToTensor()+Normalize),
batch_size=100, shuffle=True, num_workers=0)``.  Both feed every batch through
the same tiny MLP forward pass (so neither loop is optimized away and the
consumer cost is identical), and each epoch is timed end to end.  Medians over
the repeats are reported; the one-time cost of reading the split into memory
is reported separately.

Usage (from the repository root)::

    python bench/data_loading.py --data_root ../shared/data

Writes ``bench/results/data_loading.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torchvision  # noqa: E402
from common import REPO, RESULTS, write_json  # noqa: E402
from torchvision import transforms  # noqa: E402

from data import DATASETS, InMemoryLoader, find_data, load_split  # noqa: E402
from util.errors import UserError  # noqa: E402


def _consumer() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))


def _epoch(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], model: torch.nn.Module, device: torch.device
) -> tuple[float, int]:
    """Time one pass over ``batches``; returns (seconds, examples seen)."""
    seen = 0
    acc = torch.zeros((), device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            acc += model(x).sum()
            seen += y.shape[0]
    acc.item()  # waits for queued GPU work
    return time.perf_counter() - t0, seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_root", default=None, help="default: $DATA_ROOT, ./data, then ../shared/data")
    p.add_argument("--repeats", type=int, default=5, help="timed epochs of the in-memory loader")
    p.add_argument("--repeats_dataloader", type=int, default=1, help="timed epochs of the DataLoader")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_threads", type=int, default=1,
                   help="torch intra-op threads (1 keeps timings stable on a shared machine)")
    p.add_argument("--out", default=str(RESULTS / "data_loading.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.num_threads)
    root = find_data("MNIST", args.data_root)
    if root is None and args.data_root is None and find_data("MNIST", REPO.parent / "shared" / "data"):
        root = REPO.parent / "shared" / "data"
    if root is None:
        print("error: MNIST not found; pass --data_root (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model = _consumer().to(device)
    info = DATASETS["MNIST"]

    # One-time cost of building the in-memory split (fresh process state: clear the cache).
    from data import datasets as _ds

    _ds._RAW_CACHE.clear()
    t0 = time.perf_counter()
    images, labels = load_split("MNIST", True, root, device=device)
    load_s = time.perf_counter() - t0

    loader = InMemoryLoader(images, labels, args.batch_size, shuffle=True, seed=0)
    _epoch(loader, model, device)  # warm-up
    mem_times = []
    for r in range(args.repeats):
        loader.set_epoch(r)
        dt, seen = _epoch(loader, model, device)
        assert seen == info.train_size
        mem_times.append(dt)

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    ds = torchvision.datasets.MNIST(str(root), train=True, transform=tf, download=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=0,
                                     generator=torch.Generator().manual_seed(0))
    dl_times = []
    for _ in range(args.repeats_dataloader):
        dt, seen = _epoch(dl, model, device)
        assert seen == info.train_size
        dl_times.append(dt)

    mem_med, dl_med = statistics.median(mem_times), statistics.median(dl_times)
    ratio = dl_med / mem_med
    rows = [
        ("InMemoryLoader", len(mem_times), mem_med, min(mem_times)),
        ("DataLoader(MNIST, ToTensor+Normalize)", len(dl_times), dl_med, min(dl_times)),
    ]
    print(f"MNIST train epoch, batch {args.batch_size}, shuffled, device {device}, "
          f"{args.num_threads} thread(s), {os.cpu_count()} cores")
    print(f"{'loader':<40}{'repeats':>8}{'median s':>11}{'min s':>9}")
    for name, n, med, mn in rows:
        print(f"{name:<40}{n:>8}{med:>11.3f}{mn:>9.3f}")
    print(f"one-time in-memory load: {load_s:.3f} s")
    print(f"speed-up (DataLoader median / in-memory median): {ratio:.1f}x")

    result = {
        "benchmark": "data_loading",
        "dataset": "MNIST",
        "split": "train",
        "examples": info.train_size,
        "batch_size": args.batch_size,
        "device": str(device),
        "num_threads": args.num_threads,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "in_memory_epoch_s": mem_times,
        "dataloader_epoch_s": dl_times,
        "in_memory_median_s": mem_med,
        "dataloader_median_s": dl_med,
        "in_memory_load_s": load_s,
        "speedup": ratio,
    }
    print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
