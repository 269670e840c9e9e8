"""Where one training step's time goes: phases and top operators, per method and architecture.

Runs the step of ``bench/step_time.py`` (``train.py``'s, with its default flags) for a block of Noisy K-FAC's
``t_inv`` steps under ``torch.profiler`` and splits each step into phases by wrapping (in this process only) the
functions that implement them in ``record_function`` labels:

* ``forward`` / ``backward`` / ``step`` / ``zero_grad``: the four calls of the training step;
* ``sample``: the Bayesian layers' weight sampling (inside ``forward``);
* ``curvature hook``: the per-example squares / Kronecker factors (inside ``backward``);
* ``decompose``: NoisyKFAC's factor refresh, once per ``t_inv`` steps (inside ``step``);
* ``precondition``: NoisyKFAC's ``S^-1 V A^-1`` (inside ``step``).

Times are the profiler's CPU totals divided by the number of steps (so include its overhead).
Usage: ``python bench/profile_kfac.py [--arch mlp] [--methods NoisyKFAC,NoisyAdam,Adam] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import ARCH_DATASETS, ARCHS, table  # noqa: E402
from runner import METHODS, Task, build, options  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from experiment import optimizer_defaults  # noqa: E402
from models.bayesian_layers import BayesianLayer  # noqa: E402
from optimizers.curvature import CurvatureCapture  # noqa: E402
from optimizers.noisy_kfac import NoisyKFAC  # noqa: E402

T_INV = optimizer_defaults("noisy_kfac")["t_inv"]
PHASES = ("zero_grad", "forward", "sample", "backward", "curvature hook", "step", "decompose", "precondition")


def labelled(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def instrument() -> None:
    """Label the phases that happen inside forward, backward and step (this process only)."""
    BayesianLayer.sample_noise = labelled(BayesianLayer.sample_noise, "sample")
    CurvatureCapture._on_grad = labelled(CurvatureCapture._on_grad, "curvature hook")
    NoisyKFAC._decompose = labelled(NoisyKFAC._decompose, "decompose")
    NoisyKFAC._precondition = labelled(NoisyKFAC._precondition, "precondition")


def profiled_block(method: str, arch: str) -> tuple[dict[str, float], object]:
    """Profile one block of ``t_inv`` steps (after two warm-up blocks); ms per step by phase and the profiler."""
    channels, size, batch, n = ARCHS[arch]
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, channels, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    opt = options(Task(ARCH_DATASETS[arch], arch, batch_size=batch), METHODS[method], 0)
    model, optimizer = build(opt, METHODS[method], n, ivon_lr=0.1)
    if method == "IVON":
        optimizer = optimizer.ivon  # its own step, so that sampling shows under the forward
    loss_fn = torch.nn.functional.cross_entropy

    def step() -> None:
        with record_function("zero_grad"):
            optimizer.zero_grad()
        ctx = optimizer.sampled_params(train=True) if method == "IVON" else contextlib.nullcontext()
        with ctx:
            with record_function("forward"):
                loss = loss_fn(model(x), y)
            with record_function("backward"):
                loss.backward()
        with record_function("step"):
            optimizer.step()

    for _ in range(2 * T_INV):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(T_INV):
            step()
    totals = {e.key: e.cpu_time_total / 1e3 / T_INV for e in prof.key_averages() if e.key in PHASES}
    return {p: totals.get(p, 0.0) for p in PHASES}, prof


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="mlp", choices=tuple(ARCHS))
    p.add_argument("--methods", default="Adam,NoisyAdam,VOGN,NoisyKFAC",
                   help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=12, help="operators to list per method")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    instrument()
    methods = args.methods.split(",")
    rows = []
    for method in methods:
        phases, prof = profiled_block(method, args.arch)
        rows.append([method, *phases.values()])
        print(f"\n{method} on {args.arch}: top operators by self CPU time ({T_INV} steps)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(f"\nms per step by phase ({args.arch}, {args.threads} thread(s); nested phases are part of their parent)")
    print(table(["method", *PHASES], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
