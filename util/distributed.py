"""Data-parallel training on ``torch.distributed`` (launched by ``torchrun``).

Each rank draws its own weight noise (seeded from ``--seed`` and the rank), so K ranks give K
Monte-Carlo samples per step. The natural-gradient optimizers average gradients, curvature
statistics and the prior's weight sample across ranks themselves, in one bucketed all-reduce
per step (``all_reduce_mean`` below, the one home of the collectives); the deterministic baselines use
``average_gradients``. Every rank evaluates its slice of the test set (``shard``, ``assemble``); only rank 0
logs, writes checkpoints and talks to visdom.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from util.errors import UserError

#: how long a rank waits in a collective (and in joining the group) before the job stops (``--dist_timeout``):
#: the other ranks wait while rank 0 downloads the data, evaluates the test set and writes checkpoints, which
#: can take longer than NCCL's default of 10 minutes
DIST_TIMEOUT_S = 3600.0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensors: list[Tensor]) -> None:
    """Average ``tensors`` in place over all ranks with one flat all-reduce (no-op on one process)."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str, timeout: float = DIST_TIMEOUT_S) -> tuple[DistContext, torch.device]:
    """Join the process group when launched by ``torchrun``; return the context and this rank's device.

    ``timeout``: seconds a collective may wait for the other ranks (``DIST_TIMEOUT_S``)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs; "
                            "lower --nproc_per_node")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # ranks sharing a machine split its cores; oversubscribed BLAS threads spin and crawl
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, available_cores() // local_world))
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout))
    return DistContext(rank, world_size, local_rank), dev


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. ``taskset``), else all of the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(model: nn.Module) -> None:
    """Average ``.grad`` over ranks in one flat all-reduce (for Adam/SGD; the NGVI optimizers do their own)."""
    all_reduce_mean([p.grad for p in model.parameters() if p.grad is not None])


def average_running_stats(model: nn.Module) -> None:
    """Average BatchNorm running means and variances over ranks in one flat all-reduce (no-op on one process).

    Each rank updates them from its own shard; ``train.py`` calls this at the end of every epoch,
    before evaluating and checkpointing, so that every rank (and the checkpoint) holds the same
    statistics. The mean of the ranks' variances is the usual choice (it omits the spread of the
    ranks' means, which is small for shards of one shuffled data set).
    """
    stats = [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for t in (m.running_mean, m.running_var) if t is not None]
    all_reduce_mean(stats)


def _collective_device() -> torch.device:
    """Where small tensors for a collective must live: this rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a non-finite loss)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def sum_over_ranks(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (e.g. the epoch's loss and counts), in float64."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def min_over_ranks(value: float, ctx: DistContext) -> float:
    """The smallest ``value`` over the ranks (e.g. the first step with a non-finite loss, ``inf`` for none)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.item()


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's ``obj`` on every rank (pickled; e.g. a checkpoint that only rank 0's machine holds)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def shard(n: int, ctx: DistContext) -> tuple[int, int]:
    """This rank's rows ``[lo, hi)`` of ``n``: contiguous slices whose sizes differ by at most one."""
    return ctx.rank * n // ctx.world_size, (ctx.rank + 1) * n // ctx.world_size


def assemble(part: Tensor, lo: int, n: int, ctx: DistContext) -> Tensor:
    """The ``n`` rows whose rows ``[lo, lo + len(part))`` each rank holds as ``part``, on every rank.

    One all-reduce of a zero-filled ``n``-row buffer: each row is its own rank's values plus zeros, exactly.
    """
    if not ctx.enabled:
        return part
    full = part.new_zeros((n, *part.shape[1:]))
    full[lo:lo + part.shape[0]] = part
    dist.all_reduce(full)
    return full
