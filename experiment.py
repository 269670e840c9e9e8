"""From parsed options to the objects of a run: model, optimizer, LR schedule.

Each optimizer option (``--lr``, ``--damping``, ...) defaults to the default of the optimizer class it configures,
read from the class's signature (``optimizers.registry``): the classes are the one home of those defaults, and
their checks the one home of the values they accept. ``option_parser`` fills the defaults in before anything is
printed or saved, so a run records the values it used.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from data import DATASETS
from models import NORMALIZED_ARCHS, build_model
from models.joint_posterior import attach_chains
from optimizers.registry import OPTIMIZERS, optimizer_defaults, option_names
from util.errors import UserError


def resolve_optimizer_options(opt: argparse.Namespace) -> None:
    """Set every optimizer option of ``opt`` left ``None`` (or absent) to the default of ``opt.optimizer``'s class
    (on an architecture with normalisation layers, its ``normalized_defaults`` where it has them); an option it does
    not take stays ``None``."""
    defaults = optimizer_defaults(opt.optimizer, normalized=getattr(opt, "arch", None) in NORMALIZED_ARCHS)
    for key in option_names():
        if getattr(opt, key, None) is None:
            setattr(opt, key, defaults.get(key))


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
    """The optimizer ``opt.optimizer`` with its flags' values from ``opt`` (``None`` or absent: the class's default).

    A value the class rejects (its ``ValueError``) is a :class:`UserError` in flag names: this is where every
    bad optimizer flag becomes the command line's one-line error."""
    entry = OPTIMIZERS[opt.optimizer]
    try:
        return entry.build(model, {flag: getattr(opt, flag, None) for flag in entry.flags}, getattr(opt, "n", None))
    except ValueError as e:
        raise UserError(entry.flag_message(e)) from None


def check_optimizer_options(opt: argparse.Namespace) -> None:
    """Raise the :class:`UserError` :func:`make_optimizer` would for ``opt``, before the run's data and model exist:
    the optimizer is built on a tiny network of its posterior (the global random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        probe = build_model("mlp", OPTIMIZERS[opt.optimizer].posterior, 1, 2, 2, hidden=[2])
        make_optimizer(opt, probe)


def make_scheduler(opt: argparse.Namespace, optimizer: torch.optim.Optimizer):
    """``--lr_schedule``: none, step (x lr_decay every lr_step epochs), exponential, cosine."""
    if opt.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=opt.lr_step, gamma=opt.lr_decay)
    if opt.lr_schedule == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=opt.lr_decay)
    if opt.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt.epoch)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def finite(model: nn.Module) -> bool:
    """Whether every parameter is finite (one device sync)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True

