"""From parsed options to the objects of a run: model, optimizer, LR schedule.

The per-optimizer defaults live here, in one table, so that ``train.py``, ``test.py``, the
benchmarks and the README agree. They were chosen on MNIST (see README, "Defaults").
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from data import DATASETS
from models import build_model
from models.joint_posterior import attach_chains
from optimizers import VOGN, NoisyAdam, NoisyKFAC
from util.errors import UserError

#: defaults used when a flag is left unset (``None``)
DEFAULTS: dict[str, dict] = {
    "noisy_adam": dict(lr=3e-3, momentum=0.9, beta2=0.999, prior_var=1.0, damping=1e-3, init_precision=1e3,
                       fisher="example", norm_posterior="point"),
    "vogn": dict(lr=1e-2, momentum=0.9, beta2=0.999, prior_var=1.0, damping=0.0, init_precision=1e3, fisher="example",
                 norm_posterior="point"),
    "noisy_kfac": dict(lr=1e-3, momentum=0.9, prior_var=1.0, damping=1e-3, init_precision=1e3, fisher="example",
                       kl_clip=1e-3, damping_mode="factored", norm_posterior="point"),
    "adam": dict(lr=1e-3),
    "sgd": dict(lr=1e-1, momentum=0.9),
}


def setting(opt: argparse.Namespace, key: str):
    """The flag's value, or the optimizer's default when the flag was left unset."""
    value = getattr(opt, key, None)
    return DEFAULTS[opt.optimizer].get(key) if value is None else value


def make_model(opt: argparse.Namespace) -> nn.Module:
    info = DATASETS[opt.dataset]
    try:
        model = build_model(opt.arch, opt.model, info.in_channels, info.image_size, info.num_classes,
                            hidden=opt.hidden)
    except ValueError as e:
        raise UserError(f"{e}; choose another --arch") from None
    if getattr(opt, "kfac_structure", "block_diagonal") == "block_tridiagonal":
        attach_chains(model)  # the joint sampler's link buffers are part of the model's state
    return model


def make_optimizer(opt: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    name = opt.optimizer
    lr, momentum = setting(opt, "lr"), setting(opt, "momentum")
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, eps=opt.eps)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    common = dict(num_data=opt.n, kl_weight=opt.kl_weight, prior_var=setting(opt, "prior_var"),
                  damping=setting(opt, "damping"), init_precision=setting(opt, "init_precision"),
                  norm_posterior=setting(opt, "norm_posterior"))
    fisher = setting(opt, "fisher")
    if name == "noisy_kfac":
        if getattr(opt, "beta2", None) is not None:
            raise UserError("--beta2 is for noisy_adam and vogn; drop it for noisy_kfac")
        if fisher in ("batch", "hessian"):
            raise UserError(f"--fisher {fisher} is for the diagonal optimizers; noisy_kfac takes example or true")
        return NoisyKFAC(model, lr=lr, momentum=momentum, t_stats=opt.t_stats, t_inv=opt.t_inv,
                         rank=getattr(opt, "kfac_rank", None), damping_mode=setting(opt, "damping_mode"),
                         kl_clip=setting(opt, "kl_clip"),
                         fisher="true" if fisher == "true" else "empirical",
                         structure=getattr(opt, "kfac_structure", "block_diagonal"), **common)
    if fisher == "true":
        raise UserError(f"--fisher true is implemented for noisy_kfac only; {name} takes example, batch or hessian")
    if name == "noisy_adam":
        return NoisyAdam(model, lr=lr, betas=(momentum, setting(opt, "beta2")), fisher=fisher, **common)
    return VOGN(model, lr=lr, momentum=momentum, beta2=setting(opt, "beta2"), fisher=fisher, **common)


def make_scheduler(opt: argparse.Namespace, optimizer: torch.optim.Optimizer):
    """``--lr_schedule``: none, step (x lr_decay every lr_step epochs), exponential, cosine."""
    if opt.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=opt.lr_step, gamma=opt.lr_decay)
    if opt.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=opt.lr_decay)
    if opt.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt.epoch)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def is_bayesian(opt: argparse.Namespace) -> bool:
    return opt.model in ("FFG", "MVG")


def finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (one device sync)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True

