"""Tiny networks and batches shared by the tests.

Each builder seeds torch's global generator first, so a call returns the same weights every time (and the
tests' tolerances and thresholds were set on those weights); a batch comes from its own seeded generator.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models import BayesianLinear
from optimizers import NoisyKFAC


def tanh_mlp(posterior: str = "FFG", sizes: tuple[int, ...] = (4, 3, 2), seed: int = 0,
             dtype: torch.dtype | None = torch.float64) -> nn.Sequential:
    """``BayesianLinear(sizes[0], sizes[1]) - tanh - ... - BayesianLinear(sizes[-2], sizes[-1])``, with biases,
    drawn after ``torch.manual_seed(seed)`` in the default dtype and then cast to ``dtype`` (None: left as drawn)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.Tanh())
        layers.append(BayesianLinear(a, b, posterior=posterior))
    net = nn.Sequential(*layers)
    return net if dtype is None else net.to(dtype)


def linears(model: nn.Module) -> list[BayesianLinear]:
    """The ``BayesianLinear`` layers of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, BayesianLinear)]


def gaussian_batch(n: int, d: int, classes: int = 2, seed: int = 1, scale: float = 1.0,
                   dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs ``scale * N(0, I_d)`` and uniform labels in ``[0, classes)``, from a generator seeded ``seed``
    (inputs first); ``dtype`` None is the default dtype."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=dtype) * scale, torch.randint(0, classes, (n,), generator=gen)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer,
                batches: Iterable[tuple[torch.Tensor, torch.Tensor]], samples: int = 1) -> list[float]:
    """One optimizer step per batch, after ``samples`` forward/backward passes (MC samples) of the cross-entropy
    (``opt.true_fisher_backward`` first where the optimizer has it: a no-op unless ``fisher="true"``); returns
    the first pass's loss of each step."""
    losses = []
    for x, y in batches:
        opt.zero_grad()
        for s in range(samples):
            logits = model(x)
            if hasattr(opt, "true_fisher_backward"):
                opt.true_fisher_backward(logits)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            if s == 0:
                losses.append(loss.item())
        opt.step()
    return losses


def mvg_mlp_after_one_step(mode: str = "factored", kl_weight: float = 0.5, num_data: int = 10,
                           prior_var: float = 1.0) -> tuple[nn.Sequential, NoisyKFAC]:
    """The 2-3-2 MVG ``tanh_mlp`` (seed 4, default dtype) after one Noisy K-FAC step (lr 0.05, damping 0.1,
    ``damping_mode=mode``) on 6 points ``2 N(0, I)`` (seed 5): a posterior with non-isotropic Kronecker factors."""
    model = tanh_mlp("MVG", (2, 3, 2), seed=4, dtype=None)
    opt = NoisyKFAC(model, lr=0.05, num_data=num_data, kl_weight=kl_weight, prior_var=prior_var, damping=0.1,
                    damping_mode=mode)
    train_steps(model, opt, [gaussian_batch(6, 2, seed=5, scale=2.0)])
    return model, opt
