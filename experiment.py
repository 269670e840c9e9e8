"""From parsed options to the objects of a run: model, optimizer, LR schedule.

Each optimizer option (``--lr``, ``--damping``, ...) defaults to the default of the optimizer class it configures,
read from the class's signature by :func:`optimizer_defaults`: the classes are the one home of those defaults.
``option_parser`` fills them in before anything is printed or saved, so a run records the values it used.
"""

from __future__ import annotations

import argparse
import inspect

import torch
from torch import nn

from data import DATASETS
from models import build_model
from models.joint_posterior import attach_chains
from optimizers import VOGN, NoisyAdam, NoisyKFAC
from util.errors import UserError

#: the optimizer class behind each ``--optimizer``
OPTIMIZER_CLASSES: dict[str, type] = {"noisy_adam": NoisyAdam, "vogn": VOGN, "noisy_kfac": NoisyKFAC,
                                      "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
#: the options that configure an optimizer; each one an optimizer does not take stays ``None``
OPTIMIZER_OPTIONS = ("lr", "momentum", "beta2", "kl_weight", "prior_var", "damping", "init_precision", "fisher",
                     "damping_mode", "kl_clip", "t_stats", "t_inv", "kfac_rank", "kfac_conv_stride", "kfac_structure",
                     "norm_posterior", "eps", "prior_every")
#: the SGD baseline's defaults (torch's are lr 1e-3 without momentum)
SGD_DEFAULTS = {"lr": 0.1, "momentum": 0.9}


def _signature_defaults(cls: type) -> dict:
    params = inspect.signature(cls).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def optimizer_defaults(name: str) -> dict:
    """The defaults of the options optimizer ``name`` takes, read from its class (``momentum``, ``beta2``: the
    ``betas`` of Noisy Adam; ``kfac_rank``: Noisy K-FAC's ``rank``)."""
    if name == "sgd":
        return dict(SGD_DEFAULTS)
    found = _signature_defaults(OPTIMIZER_CLASSES[name])
    if name == "noisy_adam":
        found["momentum"], found["beta2"] = found["betas"]
    if name == "noisy_kfac":
        found["kfac_rank"], found["kfac_structure"] = found["rank"], found["structure"]
        found["kfac_conv_stride"] = found["conv_stats_stride"]
    return {k: found[k] for k in OPTIMIZER_OPTIONS if k in found}


def resolve_optimizer_options(opt: argparse.Namespace) -> None:
    """Set every optimizer option of ``opt`` left ``None`` (or absent) to the default of ``opt.optimizer``'s class."""
    defaults = optimizer_defaults(opt.optimizer)
    for key in OPTIMIZER_OPTIONS:
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
    """The optimizer of ``opt`` (options left ``None`` take the class's defaults; ``--kl_clip 0`` is off)."""
    opt = argparse.Namespace(**vars(opt))
    resolve_optimizer_options(opt)
    name = opt.optimizer
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=opt.lr, eps=opt.eps)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum)
    common = dict(lr=opt.lr, num_data=opt.n, kl_weight=opt.kl_weight, prior_var=opt.prior_var, damping=opt.damping,
                  init_precision=opt.init_precision, norm_posterior=opt.norm_posterior, prior_every=opt.prior_every)
    if name == "noisy_kfac":
        if getattr(opt, "beta2", None) is not None:
            raise UserError("--beta2 is for noisy_adam and vogn; drop it for noisy_kfac")
        if opt.fisher in ("batch", "hessian"):
            raise UserError(f"--fisher {opt.fisher} is for the diagonal optimizers; noisy_kfac takes example or true")
        return NoisyKFAC(model, momentum=opt.momentum, t_stats=opt.t_stats, t_inv=opt.t_inv, rank=opt.kfac_rank,
                         damping_mode=opt.damping_mode, kl_clip=opt.kl_clip or None, fisher=opt.fisher,
                         conv_stats_stride=opt.kfac_conv_stride, structure=opt.kfac_structure, **common)
    if opt.fisher == "true":
        raise UserError(f"--fisher true is implemented for noisy_kfac only; {name} takes example, batch or hessian")
    if name == "noisy_adam":
        return NoisyAdam(model, betas=(opt.momentum, opt.beta2), fisher=opt.fisher, **common)
    return VOGN(model, momentum=opt.momentum, beta2=opt.beta2, fisher=opt.fisher, **common)


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

