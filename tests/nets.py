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


#: the 5-4-3-2 chain of block-tridiagonal Noisy K-FAC and its optimizer's settings
CHAIN_SIZES = (5, 4, 3, 2)
CHAIN_KW = dict(lr=0.05, num_data=8, kl_weight=1.0, prior_var=5.0, damping=0.02, stat_decay=0.8, momentum=0.9,
                kl_clip=None, t_stats=1, t_inv=1, init_precision=10.0)


def chain_net(seed: int = 0) -> nn.Sequential:
    """The 5-4-3-2 MVG ``tanh_mlp`` with biases, float64: one chain of three layers."""
    return tanh_mlp("MVG", CHAIN_SIZES, seed)


def chain_data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    return gaussian_batch(n, CHAIN_SIZES[0], scale=1.5, dtype=torch.float64)


def trained_chain(steps: int = 2, **overrides) -> tuple[nn.Sequential, NoisyKFAC]:
    """``chain_net`` and its block-tridiagonal Noisy K-FAC (``CHAIN_KW`` and ``overrides``) after ``steps`` steps on
    ``chain_data``, step k's noise seeded ``100 + k``."""
    model = chain_net()
    opt = NoisyKFAC(model, structure="block_tridiagonal", **{**CHAIN_KW, **overrides})
    x, y = chain_data()
    for k in range(steps):
        torch.manual_seed(100 + k)
        train_steps(model, opt, [(x, y)])
    return model, opt


def chain_factors(opt: NoisyKFAC, layers: list[BayesianLinear]) -> tuple[list[torch.Tensor], ...]:
    """The chain's factors in the optimizer's state: ``A``, ``S`` per layer, ``A_cross``, ``G_cross`` per link."""
    st = [opt.state[m.weight] for m in layers]
    return ([s["A"] for s in st], [s["S"] for s in st], [s["A_cross"] for s in st[:-1]],
            [s["G_cross"] for s in st[:-1]])
