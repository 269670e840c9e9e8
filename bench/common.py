"""Helpers shared by the speed benchmarks: interleaved timing, the timed training step, peak memory, layer shapes
for FLOP counts, output.

Timing on a shared machine is noisy, so every benchmark measures all of its contenders in the
same process, *interleaved*: each round runs every contender once, in a freshly shuffled order,
and a contender's figure is the median over the rounds. Ratios are then taken against a
baseline measured the same way, which cancels most of the drift in machine load.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

#: the architectures the speed benchmarks time, on the shapes of the data set each trains on (mlp: MNIST,
#: lenet5: CIFAR-10, resnet20: FashionMNIST): arch -> (channels, image size, batch size, training-set size N)
ARCHS = {"mlp": (1, 28, 100, 60000), "lenet5": (3, 32, 128, 50000), "resnet20": (1, 28, 128, 60000)}
ARCH_DATASETS = {"mlp": "MNIST", "lenet5": "CIFAR10", "resnet20": "FashionMNIST"}


# -- timing -------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call of every ``fns[name]``, round-robin in a shuffled order per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - t0)
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def training_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]],
                   steps: int, sampled: bool = False) -> Callable[[], float]:
    """A function running ``steps`` training steps of ``train.py``'s form on ``batches`` in turn, the unit the
    speed benchmarks time; it returns the last loss::

        optimizer.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); optimizer.step()

    ``sampled``: the forward and backward inside ``optimizer.sampled_params(train=True)`` (IVON's step).
    """
    data = itertools.cycle(batches)

    def step() -> Tensor:
        x, y = next(data)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    def sampled_step() -> Tensor:
        x, y = next(data)
        optimizer.zero_grad()
        with optimizer.sampled_params(train=True):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        optimizer.step()
        return loss

    one = sampled_step if sampled else step

    def block() -> float:
        for _ in range(steps):
            loss = one()
        return float(loss.detach())

    return block


# -- peak tensor memory ---------------------------------------------------------------------
def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors allocated (and not yet freed) during one call of ``fn``.

    Uses ``torch.profiler`` with ``profile_memory=True``: every allocation and free of the torch
    CPU allocator is an event, and the peak of their running sum in time order is the extra
    memory the call needed on top of what was live before it. Python objects and allocator
    caching are not counted (unlike ``ru_maxrss``, which also counts lazily loaded libraries).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


# -- layer shapes for analytic FLOP counts ------------------------------------------------------
@dataclass
class LayerShape:
    """A Linear/Conv2d layer as one matrix product per output location."""

    name: str
    batch: int       # B
    locations: int   # T: output positions per example (1 for Linear)
    n_in: int        # inputs per output: in_features, or C_in k k
    n_out: int       # out_features or C_out
    bias: bool
    first: bool      # first parametrised layer (no input gradient needed)

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the forward pass over the batch."""
        return self.batch * self.locations * self.n_in * self.n_out

    @property
    def params(self) -> int:
        return self.n_out * (self.n_in + self.bias)


def layer_shapes(model: nn.Module, x: Tensor) -> list[LayerShape]:
    """Shapes of the model's Linear/Conv2d layers (Bayesian ones included) seen on input ``x``."""
    shapes: list[LayerShape] = []

    def hook(name: str) -> Callable:
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            conv = isinstance(module, nn.Conv2d)
            n_in = module.weight[0].numel() if conv else module.in_features
            t = output[0, 0].numel() if conv else output[0].numel() // module.out_features
            shapes.append(LayerShape(name, output.shape[0], t, n_in, module.weight.shape[0],
                                     module.bias is not None, not shapes))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(x)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return shapes


def forward_backward_flops(shapes: list[LayerShape]) -> float:
    """FLOPs (2 per MAC) of forward + backward: weight gradient always, input gradient except layer 1."""
    return sum(2.0 * s.macs * (2 if s.first else 3) for s in shapes)


# -- output -------------------------------------------------------------------------------------
def environment(**extra: object) -> dict:
    """What the numbers depend on: versions, threads, machine, load."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        **extra,
    }


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(header: list[str], rows: list[list[object]]) -> str:
    """A plain-text table; floats are printed with 3 significant digits."""
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
