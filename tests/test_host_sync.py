"""No host synchronisation in an optimizer step between refreshes.

On a GPU, reading a device tensor on the host (``item``, ``bool``, ``tolist``) or building a device tensor
from Python data (``torch.tensor``, ``new_tensor``: a host-to-device copy) waits for the stream. The steps
between decompositions must do neither, so that the host runs ahead of the GPU. On the CPU the same calls are
counted by a ``TorchFunctionMode`` (the step counters, CPU tensors by design, excepted); on a GPU the test runs
under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from models import BayesianBatchNorm2d, BayesianConv2d, BayesianLinear
from optimizers import VOGN, NoisyAdam, NoisyKFAC

#: what waits for the device when its tensor lives there
SYNCING = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor, torch.Tensor.item, torch.Tensor.tolist,
           torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.cpu,
           torch.Tensor.numpy}


class HostSyncs(TorchFunctionMode):
    """Records the calls in ``SYNCING``, except those whose first argument is one of ``cpu_tensors``."""

    def __init__(self, cpu_tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.cpu_tensors = cpu_tensors
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING and not (args and any(args[0] is t for t in self.cpu_tensors)):
            self.calls.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def net(posterior: str, device: str = "cpu") -> nn.Module:
    """A convolution, a BatchNorm (diagonal curvature in every optimizer) and a chain of two Linear layers."""
    torch.manual_seed(0)
    return nn.Sequential(BayesianConv2d(1, 2, 3, posterior=posterior), BayesianBatchNorm2d(2), nn.ReLU(),
                         nn.Flatten(), BayesianLinear(32, 6, posterior=posterior), nn.Tanh(),
                         BayesianLinear(6, 3, posterior=posterior)).to(device)


#: t_inv = 3: decompositions on steps 1, 2, 3 (warm-up), 4, 7; t_stats = 2: statistics on steps 1-3, 5, 7
KFAC = dict(t_inv=3, t_stats=2)  # kl_clip on, as by default
CASES = {
    "noisy_kfac": ("MVG", lambda m: NoisyKFAC(m, **KFAC)),
    "noisy_kfac_gaussian_norm": ("MVG", lambda m: NoisyKFAC(m, norm_posterior="gaussian", **KFAC)),
    "noisy_kfac_rank": ("MVG", lambda m: NoisyKFAC(m, rank=2, **KFAC)),
    "noisy_kfac_tridiagonal": ("MVG", lambda m: NoisyKFAC(m, structure="block_tridiagonal", **KFAC)),
    "noisy_adam": ("FFG", lambda m: NoisyAdam(m)),
    "vogn": ("FFG", lambda m: VOGN(m)),
}
QUIET_STEPS = (5, 6, 8)  # no decomposition: 5 takes statistics, 6 and 8 do not


def steps(name: str, device: str, n: int = 8):
    """Yield ``(k, optimizer)`` before each step k = 1..n of case ``name``; the caller runs ``optimizer.step()``."""
    posterior, make = CASES[name]
    model = net(posterior, device)
    opt = make(model)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=gen).to(device), torch.randint(0, 3, (16,), generator=gen).to(device)
    for k in range(1, n + 1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        yield k, opt


@pytest.mark.parametrize("name", list(CASES))
def test_steps_between_refreshes_do_not_sync(name: str) -> None:
    synced = {}
    for k, opt in steps(name, "cpu"):
        counters = [s["step"] for s in opt.state.values() if "step" in s]
        with HostSyncs(counters) as mode:
            opt.step()
        synced[k] = mode.calls
    for k in QUIET_STEPS:
        assert synced[k] == [], f"step {k} reads or builds device tensors on the host: {synced[k]}"
    if name.startswith("noisy_kfac"):  # the counter sees what a refresh reads (Cholesky's info flags)
        assert synced[7]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CASES))
def test_steps_between_refreshes_do_not_sync_on_cuda(name: str) -> None:
    for k, opt in steps(name, "cuda"):
        if k not in QUIET_STEPS:
            opt.step()
            continue
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
