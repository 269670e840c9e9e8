"""Benchmark: time of one training step (forward + backward + update), relative to Adam.

For ``mlp`` on MNIST shapes (batch 100 of 1x28x28), ``lenet5`` on CIFAR-10 shapes
(batch 128 of 3x32x32) and ``resnet20`` (BatchNorm, residual blocks) on FashionMNIST shapes
(batch 128 of 1x28x28), random data, every method runs the step of ``train.py``::

    optimizer.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); optimizer.step()

(IVON wraps the forward/backward in ``optimizer.sampled_params(train=True)``). The optimizers
are built as ``train.py`` builds them with default flags (``experiment.make_optimizer``,
so the optimizer classes' defaults; NoisyKFAC: its default ``t_stats``, ``t_inv``, plus
``NoisyKFACr<K>`` = ``--kfac_rank K`` for each K of ``--kfac_rank``); IVON uses ``lr=0.1, ess=N``.
The timed unit is a block of ``t_inv`` consecutive steps for every method, so NoisyKFAC's
statistics and decompositions are amortised exactly (one refresh per block, after the untimed
first block that holds the warm-up); a method's ms/step is the median over rounds of block
time / t_inv, the rounds interleaving all methods in a shuffled order
(``bench.common.interleaved``); the step is ``common.training_steps``. Each ratio is to Adam's median.

Threads: measured with 1 thread first, then with torch's default thread count (what
``train.py`` uses unless ``--num_threads``; 2 on the 2-core benchmark machine). The headline
(top-level JSON entries, PASS/MISS) is the 1-thread run: on a shared machine, multi-threaded
OpenMP regions stall whenever another process holds one of the cores, so the 2-thread numbers measure
the machine's load more than the methods. Both runs are under ``by_threads``.

The FLOP ratio beside each time ratio is an analytic count (``flop_model``): 2 FLOPs per MAC,
forward + backward = 3x forward (2x for the first layer), plus each method's extra work.

Usage: ``python bench/step_time.py [--quick] [--archs mlp,lenet5] [--methods ...] [--repeats R] [--threads 1,0]
[--kfac_rank 64] [--out PATH]``; writes ``bench/results/step_time.json``. The default ``--archs`` leave
``resnet20`` out: its blocks are slow on a CPU, so it is measured on its own, into its own
file: ``--archs resnet20 --methods Adam,NoisyAdam,NoisyAdamBatch,VOGN,NoisyKFAC --kfac_rank "" --repeats 3
--warmup 0 --threads 1 --out bench/results/step_time_resnet20.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ivon  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    LayerShape,
    environment,
    forward_backward_flops,
    interleaved,
    layer_shapes,
    median,
    table,
    training_steps,
    write_json,
)
from torch import Tensor, nn  # noqa: E402

from experiment import make_optimizer, optimizer_defaults  # noqa: E402
from models import build_model  # noqa: E402
from optimizers.noisy_kfac import DENSE_ROOT_MAX, T_INV, T_STATS  # noqa: E402
from optimizers.registry import OPTIMIZERS  # noqa: E402

METHODS = ["Adam", "NoisyAdam", "NoisyAdamBatch", "NoisyAdamHessian", "VOGN", "NoisyKFAC", "IVON"]
#: the low-rank Noisy K-FAC variants are named ``NoisyKFACr<K>`` (added to METHODS by ``--kfac_rank``)
RANK_PREFIX = "NoisyKFACr"
#: arch -> (channels, image size, batch size, N); ``main`` narrows it to ``--archs`` (and ``--quick``'s batch)
ARCHS = dict(common.ARCHS)
DEFAULT_ARCHS = ("mlp", "lenet5")
#: time-ratio targets (<= target passes)
TARGETS = {"NoisyAdam": {"mlp": 1.7, "lenet5": 1.55, "resnet20": 1.6},
           "NoisyAdamBatch": {"mlp": 1.35, "lenet5": 1.1, "resnet20": 1.15},
           "NoisyAdamHessian": {"mlp": 1.15, "lenet5": 1.15},
           "VOGN": {"mlp": 1.7, "lenet5": 1.55, "resnet20": 1.6},
           "NoisyKFAC": {"mlp": 6.0, "lenet5": 1.35, "resnet20": 2.0},
           "NoisyKFACr64": {"mlp": 3.0, "lenet5": 1.35}}
QUICK_BATCH = 8
#: method -> (train.py --optimizer, flags beside its defaults); IVON (None) comes from its package
OPTIMIZER_OF = {"Adam": ("adam", {}), "NoisyAdam": ("noisy_adam", {}),
                "NoisyAdamBatch": ("noisy_adam", {"fisher": "batch"}),
                "NoisyAdamHessian": ("noisy_adam", {"fisher": "hessian"}),
                "VOGN": ("vogn", {}), "NoisyKFAC": ("noisy_kfac", {}), "IVON": (None, {})}


def kfac_rank(method: str) -> int | None:
    """K of a ``NoisyKFACr<K>`` method, else None."""
    return int(method[len(RANK_PREFIX):]) if method.startswith(RANK_PREFIX) else None


# -- what is timed --------------------------------------------------------------------------------
def build(method: str, arch: str, t_inv: int = T_INV) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model (same initial means for every method) and optimizer of ``method``, as ``train.py`` builds them
    (its ``--optimizer`` and flags: ``OPTIMIZER_OF``, ``--kfac_rank K`` for ``NoisyKFACr<K>``, ``--t_inv t_inv``)."""
    channels, size, _, n = ARCHS[arch]
    rank = kfac_rank(method)
    name, flags = OPTIMIZER_OF["NoisyKFAC" if rank is not None else method]
    torch.manual_seed(0)
    model = build_model(arch, OPTIMIZERS[name].posterior if name else "MAP", channels, size, 10)
    if method == "IVON":
        return model, ivon.IVON(model.parameters(), lr=0.1, ess=n)
    opt = Namespace(optimizer=name, n=n, t_inv=t_inv, kfac_rank=rank, **flags)  # a flag it does not take is unused
    return model, make_optimizer(opt, model)


def block_of_steps(method: str, arch: str, batches: list[tuple[Tensor, Tensor]], steps: int = T_INV
                   ) -> Callable[[], float]:
    """A function running ``steps`` training steps of ``method`` (NoisyKFAC: ``t_inv = steps``).

    Returns the last loss."""
    model, optimizer = build(method, arch, t_inv=steps)
    model.train()
    return training_steps(model, optimizer, batches, steps, sampled=method == "IVON")


# -- analytic FLOPs ---------------------------------------------------------------------------------
def side_kind(n: int, rank: int | None, sampler: bool = False) -> str:
    """How Noisy K-FAC keeps an n x n factor's side: "cholesky" (exact), "dense" or "low_rank" (``damped_roots``);
    the sampler's exact sides up to ``DENSE_ROOT_MAX`` as explicit matrices."""
    if rank is None or rank >= n:
        return "dense" if sampler and n <= DENSE_ROOT_MAX else "cholesky"
    return "dense" if 2 * rank >= n else "low_rank"


def decomposition_flops(n: int, extra_damping: bool, rank: int | None = None, iters: int = 2) -> float:
    """FLOPs to refresh one damped n x n factor as ``models.kronecker.damped_roots`` does (steady state).

    Exact: Cholesky n^3/3, with extrinsic damping a second one, then ``cholesky_inverse`` 2 n^3/3 (and the
    sampler's explicit ``L^-1``, n^3/3, up to ``DENSE_ROOT_MAX``).
    Low rank: ``iters`` subspace-iteration steps (F Q: 2 n^2 K, QR: 4 n K^2), Rayleigh-Ritz
    (2 n^2 K + 2 n K^2, eigh ~9 K^3, Q U: 2 n K^2); formed densely (2K >= n): two n x n products 4 n^2 K.
    """
    kind = side_kind(n, rank)
    if kind == "cholesky":
        return n**3 / 3 + (n**3 / 3 if extra_damping else 0) + 2 * n**3 / 3 + (n**3 / 3 if n <= DENSE_ROOT_MAX else 0)
    k = rank
    total = iters * (2 * n * n * k + 4 * n * k * k) + 2 * n * n * k + 4 * n * k * k + 9 * k**3
    return total + (4 * n * n * k if kind == "dense" else 0)


def side_flops(n: int, m: int, rank: int | None, solve: bool) -> float:
    """FLOPs to apply an n x n side to an m x n (or n x m) matrix: triangular solve (``solve``, the sampler's
    exact side) m n^2, dense product 2 m n^2, low rank 4 m n K + 2 m n."""
    kind = side_kind(n, rank, sampler=solve)
    if kind == "cholesky":
        return m * n * n if solve else 2 * m * n * n
    return 2 * m * n * n if kind == "dense" else 4 * m * n * rank + 2 * m * n


def flop_model(method: str, shapes: list[LayerShape],
               extra_damping: bool = optimizer_defaults("noisy_kfac")["damping"] > 0) -> float:
    """FLOPs of one step of ``method`` (elementwise ops counted as 1 FLOP per entry, randn too)."""
    total = forward_backward_flops(shapes)
    params = sum(s.params for s in shapes)
    if method == "Adam":  # lerp, mul+addcmul, sqrt/div/add eps, addcdiv
        return total + 13 * params
    if method == "IVON":  # sample (randn, 5 ops), noise*grad, momentum 3, hessian ~9, mean update ~9
        return total + 32 * params
    if method in ("NoisyAdam", "NoisyAdamBatch", "NoisyAdamHessian", "VOGN"):  # sample 3, update ~13, std 3
        total += 19 * params
        if method == "NoisyAdamHessian":  # g * noise, its scale (f + gamma) / sigma0**2, the positivity term
            return total + 9 * params
        for s in shapes:
            if method == "NoisyAdamBatch":
                total += s.params  # g**2
            elif s.locations == 1:  # (ds**2)^T (a**2): one weight-gradient-sized product + squares
                total += 2 * s.macs + s.batch * (s.n_in + s.n_out) + (s.batch * s.n_out if s.bias else 0)
            else:  # per-example bmm over the T locations, then square and sum over the batch
                total += 2 * s.macs + 2 * s.batch * s.params + s.batch * s.locations * s.n_out
        return total
    if method == "NoisyKFAC" or kfac_rank(method) is not None:
        rank, stride = kfac_rank(method), optimizer_defaults("noisy_kfac")["kfac_conv_stride"]
        for s in shapes:
            o, i, bt = s.n_out, s.n_in + s.bias, s.batch * s.locations
            total += 3 * o * i + side_flops(o, i, rank, True) + side_flops(i, o, rank, True)  # randn*R, U E V, M+
            a_rows = s.batch * -(-s.locations // stride**2) if s.locations > 1 else bt  # conv A: one grid
            total += (2 * a_rows * i * i + 2 * bt * o * o + 3 * (i * i + o * o)) / T_STATS  # batch factors, average
            total += side_flops(o, i, rank, False) + side_flops(i, o, rank, False) + 9 * o * i  # S^-1 V A^-1, ...
            total += (decomposition_flops(i, extra_damping, rank) + decomposition_flops(o, extra_damping, rank)) / T_INV
        return total
    raise ValueError(method)


# -- driver -----------------------------------------------------------------------------------------
def measure(arch: str, rounds: int, warmup: int, steps: int = T_INV) -> dict[str, list[float]]:
    """Seconds per step of every method on ``arch`` (one sample per round)."""
    channels, size, batch, _ = ARCHS[arch]
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, channels, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
               for _ in range(4)]
    blocks = {m: block_of_steps(m, arch, batches, steps) for m in METHODS}
    losses = {m: blocks[m]() for m in METHODS}  # first block: lazy initialisation, not timed
    bad = [m for m, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"{arch}: non-finite loss for {bad}")
    samples = interleaved(blocks, rounds=rounds, warmup=warmup)
    return {m: [t / steps for t in ts] for m, ts in samples.items()}


def quartiles_ms(ts: list[float]) -> list[float]:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return [1e3 * q[0], 1e3 * q[2]]


def summarise(samples: dict[str, dict[str, list[float]]]) -> dict:
    """Ratio of medians (the headline), plus quartiles and the median of per-round ratios (a check)."""
    raw = {a: {m: 1e3 * median(ts) for m, ts in s.items()} for a, s in samples.items()}
    ratio = {a: {m: raw[a][m] / raw[a]["Adam"] for m in METHODS if m != "Adam"} for a in raw}
    paired = {a: {m: median([t / t0 for t, t0 in zip(s[m], s["Adam"])]) for m in METHODS if m != "Adam"}
              for a, s in samples.items()}
    iqr = {a: {m: quartiles_ms(ts) for m, ts in s.items()} for a, s in samples.items()}
    return {**ratio, "raw_ms": raw, "iqr_ms": iqr, "paired_ratio": paired,
            "rounds": {a: len(s["Adam"]) for a, s in samples.items()}}


def report(result: dict, flops: dict, threads: int, steps: int) -> None:
    for arch in ARCHS:
        _, _, batch, _ = ARCHS[arch]
        rows = []
        for m in METHODS:
            r = 1.0 if m == "Adam" else result[arch][m]
            target = TARGETS.get(m, {}).get(arch)
            verdict = "" if target is None else ("PASS" if r <= target else "MISS")
            rows.append([m, result["raw_ms"][arch][m], r, flops[arch][m], "" if target is None else f"<= {target}",
                         verdict])
        print(f"\n{arch}, batch {batch}, {threads} thread(s), median of {result['rounds'][arch]} blocks of "
              f"{steps} steps")
        print(table(["method", "ms/step", "time x Adam", "FLOP x Adam", "target", ""], rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: one round of 2-step blocks (NoisyKFAC t_inv=2), batch {QUICK_BATCH}, "
                        "one thread setting")
    p.add_argument("--repeats", type=int, default=30, help=f"timed blocks of {T_INV} steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before the timed ones")
    p.add_argument("--repeats_other", type=int, default=5,
                   help="timed blocks per method for the thread settings after the first")
    p.add_argument("--kfac_rank", default="64",
                   help="comma-separated ranks K of the NoisyKFACr<K> variants (empty: none)")
    p.add_argument("--threads", default="1,0",
                   help="comma-separated thread counts, the first one is the headline; 0 = torch's default")
    p.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help=f"comma-separated, of {', '.join(ARCHS)}")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: all; Adam is always timed)")
    p.add_argument("--out", default=str(RESULTS / "step_time.json"))
    args = p.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    if not archs or any(a not in ARCHS for a in archs):
        p.error(f"--archs: choose from {', '.join(ARCHS)}")
    for arch in [a for a in ARCHS if a not in archs]:
        del ARCHS[arch]
    if args.methods is not None:
        chosen = [m for m in args.methods.split(",") if m]
        if any(m not in METHODS for m in chosen):
            p.error(f"--methods: choose from {', '.join(METHODS)}")
        METHODS[:] = ["Adam"] + [m for m in METHODS if m in chosen and m != "Adam"]
    default_threads = torch.get_num_threads()
    thread_list = [int(t) or default_threads for t in args.threads.split(",")]
    rounds, warmup, steps = args.repeats, args.warmup, T_INV
    METHODS[:] = [m for m in METHODS if kfac_rank(m) is None]
    METHODS.extend(f"{RANK_PREFIX}{int(k)}" for k in args.kfac_rank.split(",") if k.strip())
    if args.quick:
        rounds, warmup, steps, thread_list = 1, 0, 2, thread_list[:1]
        for arch, (channels, size, _, n) in ARCHS.items():
            ARCHS[arch] = (channels, size, QUICK_BATCH, n)

    t_start = time.perf_counter()
    flops: dict[str, dict[str, float]] = {}
    for arch, (channels, size, batch, _) in ARCHS.items():
        shapes = layer_shapes(build("Adam", arch)[0], torch.zeros(batch, channels, size, size))
        base = flop_model("Adam", shapes)
        flops[arch] = {m: flop_model(m, shapes) / base for m in METHODS}

    by_threads = {}
    for k, threads in enumerate(thread_list):
        torch.set_num_threads(threads)
        n_rounds = rounds if k == 0 else args.repeats_other
        samples = {arch: measure(arch, n_rounds, warmup, steps) for arch in ARCHS}
        by_threads[str(threads)] = summarise(samples)
        report(by_threads[str(threads)], flops, threads, steps)
    torch.set_num_threads(default_threads)

    main_result = by_threads[str(thread_list[0])]
    verdicts = {a: {m: main_result[a][m] <= t[a] for m, t in TARGETS.items() if m in METHODS and a in t}
                for a in ARCHS}
    out = {
        **{a: main_result[a] for a in ARCHS},
        "raw_ms": main_result["raw_ms"],
        "iqr_ms": main_result["iqr_ms"],
        "paired_ratio": main_result["paired_ratio"],
        "flop_ratio": {a: {m: r for m, r in f.items() if m != "Adam"} for a, f in flops.items()},
        "targets": TARGETS,
        "pass": verdicts,
        "by_threads": by_threads,
        "config": environment(threads=thread_list, default_threads=default_threads, repeats=rounds, warmup=warmup,
                              steps_per_block=steps, quick=args.quick, batch={a: v[2] for a, v in ARCHS.items()},
                              seconds=time.perf_counter() - t_start),
    }
    path = write_json(args.out, out)
    print(f"\nwrote {path} ({out['config']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
