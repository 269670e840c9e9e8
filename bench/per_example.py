"""Benchmark: mean of per-example squared gradients, ``mean_i g_i**2``, four ways.

On the two nets of ``bench/step_time.py`` as plain ``nn`` (MAP) models, same weights, same
inputs (``mlp``: batch 100 of 1x28x28; ``lenet5``: batch 128 of 3x32x32):

* ``ours``: ``optimizers.sum_grad_squared(model, x, y)`` (hooks; one forward + backward);
* ``backpack``: BackPACK's ``SumGradSquared`` on an ``extend``-ed copy of the model.
  BackPACK squares the gradients of the per-example terms *of the loss as reduced*: with
  ``reduction="mean"`` those are ``g_i / B``, so ``p.sum_grad_squared = sum_i (g_i/B)**2`` and
  ``B * p.sum_grad_squared = mean_i g_i**2`` (checked below against the naive loop);
* ``torch.func``: ``vmap(grad(loss of one example))`` over ``functional_call``, then the mean of
  the squares of the B x (parameter) per-example gradients;
* ``naive loop``: B forward/backward passes of one example each (the reference).

Reported per net: median time of one call (interleaved rounds, ``bench.common.interleaved``)
and its ratio to a plain forward + backward (``loss.backward()``) on the same model; peak
tensor memory of one call (``bench.common.peak_tensor_bytes``: ``torch.profiler``'s allocation
events, so only what the call allocates beyond what was already live — the weights and inputs
are not counted; BackPACK's stored layer inputs/outputs are, since they are made by the call, and so are the
buffers our rules reuse from call to call, emptied before the measurement)
and its ratio to the plain forward + backward; and the largest deviation from the naive loop,
absolute and relative to the largest entry of each parameter's statistic.

Timed with 1 thread by default (``--threads``), for stable numbers on a shared machine.
Usage: ``python bench/per_example.py [--quick] [--repeats R] [--out PATH]``; writes
``bench/results/per_example.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from backpack import backpack, extend  # noqa: E402
from backpack.extensions import SumGradSquared  # noqa: E402
from common import RESULTS, environment, interleaved, median, peak_tensor_bytes, table, write_json  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

from models import build_model  # noqa: E402
from optimizers import chunking, sum_grad_squared  # noqa: E402

#: arch -> (channels, image size, batch size): the step benchmark's shapes
ARCHS = {arch: common.ARCHS[arch][:3] for arch in ("mlp", "lenet5")}
METHODS = ("plain", "ours", "backpack", "torch.func", "naive loop")
RTOL = 1e-5
QUICK_BATCH = 16
# BackPACK's full backward hooks warn when the input (the data) needs no gradient: expected here
warnings.filterwarnings("ignore", message="Full backward hook is firing")

Stats = dict[str, Tensor]


# -- the contenders: each returns {parameter name: mean_i g_i**2} ------------------------------------
def plain(model: nn.Module, x: Tensor, y: Tensor) -> Stats:
    """The baseline: one forward + backward of the mean loss (no squares)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {}


def ours(model: nn.Module, x: Tensor, y: Tensor) -> Stats:
    return sum_grad_squared(model, x, y)


def with_backpack(model: nn.Module, x: Tensor, y: Tensor) -> Stats:
    """``model`` must be ``extend``-ed; rescales BackPACK's ``sum_i (g_i/B)**2`` by B."""
    model.zero_grad(set_to_none=True)
    with backpack(SumGradSquared()):
        F.cross_entropy(model(x), y).backward()
    return {n: p.sum_grad_squared * x.shape[0] for n, p in model.named_parameters()}


def with_torch_func(model: nn.Module) -> Callable[[nn.Module, Tensor, Tensor], Stats]:
    def loss_one(params: Stats, xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, params, (xi[None],)), yi[None])

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def run(model: nn.Module, x: Tensor, y: Tensor) -> Stats:
        params = {n: p.detach() for n, p in model.named_parameters()}
        return {n: g.square().mean(0) for n, g in per_example(params, x, y).items()}

    return run


def naive_loop(model: nn.Module, x: Tensor, y: Tensor) -> Stats:
    params = dict(model.named_parameters())
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(params.values()))
        for n, g in zip(params, grads):
            out[n] += g.square()
    return {n: s / x.shape[0] for n, s in out.items()}


# -- driver -----------------------------------------------------------------------------------------
def deviation(stats: Stats, reference: Stats) -> tuple[float, float]:
    """Max absolute difference, and max over parameters of (that difference / max |reference|)."""
    abs_diff = [float((stats[n] - r).abs().max()) for n, r in reference.items()]
    rel = [d / float(r.abs().max()) for d, r in zip(abs_diff, reference.values())]
    return max(abs_diff), max(rel)


def bench_arch(arch: str, rounds: int, warmup: int) -> dict:
    channels, size, batch = ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(arch, "MAP", channels, size, 10)
    bp_model = extend(copy.deepcopy(model))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, channels, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    fns = {"plain": plain, "ours": ours, "backpack": with_backpack, "torch.func": with_torch_func(model),
           "naive loop": naive_loop}
    models = {m: bp_model if m == "backpack" else model for m in METHODS}
    calls = {m: (lambda m=m: fns[m](models[m], x, y)) for m in METHODS}

    reference = calls["naive loop"]()
    result: dict[str, dict] = {}
    for m in METHODS:
        chunking.release_scratch()  # so that "ours" is charged for the buffers its rules keep between calls
        entry: dict[str, float | bool] = {"peak_mb": peak_tensor_bytes(calls[m]) / 2**20}
        if m != "plain":
            entry["max_abs_diff"], entry["max_rel_diff"] = deviation(calls[m](), reference)
            entry["agrees"] = entry["max_rel_diff"] <= RTOL
        result[m] = entry
    samples = interleaved(calls, rounds=rounds, warmup=warmup)
    for m in METHODS:
        result[m]["ms"] = 1e3 * median(samples[m])
        result[m]["time_ratio"] = result[m]["ms"] / (1e3 * median(samples["plain"]))
        result[m]["memory_ratio"] = result[m]["peak_mb"] / result["plain"]["peak_mb"]
    return {"batch": batch, "rounds": rounds, **result}


def report(arch: str, res: dict) -> None:
    rows = [[m, res[m]["ms"], res[m]["time_ratio"], res[m]["peak_mb"], res[m]["memory_ratio"],
             res[m].get("max_abs_diff", ""), res[m].get("max_rel_diff", ""), res[m].get("agrees", "")]
            for m in METHODS]
    print(f"\n{arch}, batch {res['batch']}, median of {res['rounds']} rounds")
    print(table(["method", "ms", "time x plain", "peak MB", "mem x plain", "max |diff|", "rel diff", "ok"], rows))
    faster = res["ours"]["ms"] < min(res["backpack"]["ms"], res["torch.func"]["ms"])
    print(f"target (ours faster than BackPACK and torch.func): {'PASS' if faster else 'MISS'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"smoke test: one round, batch {QUICK_BATCH}")
    p.add_argument("--repeats", type=int, default=40, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--out", default=str(RESULTS / "per_example.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, warmup = (1, 0) if args.quick else (args.repeats, args.warmup)
    if args.quick:
        for arch, (channels, size, _) in ARCHS.items():
            ARCHS[arch] = (channels, size, QUICK_BATCH)

    t_start = time.perf_counter()
    out: dict[str, dict] = {}
    for arch in ARCHS:
        out[arch] = bench_arch(arch, rounds, warmup)
        report(arch, out[arch])
    out["pass"] = {a: out[a]["ours"]["ms"] < min(out[a]["backpack"]["ms"], out[a]["torch.func"]["ms"]) for a in ARCHS}
    out["config"] = environment(repeats=rounds, warmup=warmup, quick=args.quick, rtol=RTOL,
                                memory="torch.profiler profile_memory: peak of live tensor bytes during one call",
                                seconds=time.perf_counter() - t_start)
    path = write_json(args.out, out)
    print(f"\nwrote {path} ({out['config']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
