"""The optimizers of ``train.py --optimizer``: each one's name, the posterior it trains and its flags.

An optimizer is registered with three declarations, which the NGVI classes make as class attributes
(``cli_name``, ``posterior``, ``cli_flags``) and torch's Adam and SGD through the factories below:

* its name, the value of ``--optimizer``;
* the posterior its model must have: ``FFG``, ``MVG`` or ``MAP`` (``models.POSTERIORS``);
* its flags: flag -> constructor argument (``"betas[0]"``: an element of a tuple argument). A flag's
  default is the argument's default in the constructor's signature, so the class is the one home of its
  defaults, and its checks (a ``ValueError``) the one home of the values it accepts.

Everything else is derived: which optimizers train which model (the first registered for a posterior is
its default), the optimizer flags of ``train.py`` (how each is read and its help are in :data:`FLAGS`, one
entry per flag, shared by the optimizers that declare it), their defaults, and the construction of an
optimizer from flag values. ``--n`` is the ELBO's N, not a hyper-parameter: it is passed as ``num_data``
to a constructor that takes one.

A plug-in optimizer is one :func:`register` call away from ``train.py`` (a new flag also needs an entry in
:data:`FLAGS`)::

    import train
    from optimizers.registry import register

    register(MyOptimizer)  # with the class attributes cli_name, posterior and cli_flags
    train.main(["--model", "MAP", "--optimizer", "my_optimizer", "--lr", "0.01"])
"""

from __future__ import annotations

import argparse
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from models import POSTERIORS
from optimizers.base import AUTO, NORM_POSTERIORS
from optimizers.diagonal import FISHERS
from optimizers.noisy_adam import NoisyAdam
from optimizers.noisy_kfac import STRUCTURES, NoisyKFAC
from optimizers.vogn import VOGN


def prior_var(text: str) -> float | str:
    """``--prior_var``: a positive number, or ``auto``."""
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid prior variance {text!r}; use a positive number or auto") from None


def boolean(text: str) -> bool:
    """``--warm_start``: true/false (also yes/no, on/off, 1/0)."""
    value = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
             "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use true or false")
    return value


@dataclass(frozen=True)
class Flag:
    """How the command line reads an optimizer flag. ``help`` may hold ``{default}``: each optimizer's default."""

    type: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    #: the constructor's value for a flag value (``--kl_clip 0`` is the trust region off, ``kl_clip=None``)
    to_argument: Callable[[Any], Any] = field(default=lambda value: value)


#: every optimizer flag, in ``--help`` order (a plug-in adds its new flags here)
FLAGS: dict[str, Flag] = {
    "lr": Flag(float, "learning rate ({default})"),
    "momentum": Flag(float, "beta1 (Noisy Adam) or momentum ({default})"),
    "beta2": Flag(float, "running-average rate of the curvature ({default})"),
    "kl_weight": Flag(float, "lambda, the weight of the KL term ({default})"),
    "prior_var": Flag(prior_var, "eta, the prior variance, or auto: learned per layer by empirical Bayes, the "
                                 "ELBO's maximiser every --prior_every steps ({default})"),
    "prior_every": Flag(int, "steps between the estimates of --prior_var auto ({default})"),
    "damping": Flag(float, "extrinsic damping gamma_ex ({default})"),
    "init_precision": Flag(float, "posterior precision before the first step ({default})"),
    "warm_start": Flag(boolean, "true: the curvature is the plain mean of the batches seen until its running "
                                "average's window 1/(1 - beta2) fills, so the posterior follows the data from "
                                "the first step ({default})"),
    "fisher": Flag(str, "curvature estimate: per-example squares (the empirical Fisher), squared batch gradient, "
                        "reparameterisation Hessian (diagonal methods), or sampled labels (noisy_kfac) ({default})",
                   choices=(*FISHERS, "true")),
    "t_stats": Flag(int, "steps between curvature-statistics updates ({default})"),
    "t_inv": Flag(int, "steps between curvature decompositions ({default})"),
    "kfac_rank": Flag(int, "noisy_kfac: keep the top-K eigenpairs of each Kronecker factor larger than K, plus the "
                           "mean of the rest of its spectrum (default: exact factors)"),
    "kfac_conv_stride": Flag(int, "noisy_kfac: a convolution's input factor from every s-th output location in each "
                                  "direction, the s^2 grids in turn ({default})"),
    "kfac_structure": Flag(str, "noisy_kfac posterior: block_diagonal (layers independent) or block_tridiagonal "
                                "(adjacent Linear layers of a chain correlated; docs/MATH.md) ({default})",
                           choices=STRUCTURES),
    "norm_posterior": Flag(str, "affine parameters of BatchNorm/LayerNorm/GroupNorm layers (FFG/MVG): gaussian "
                                "(sampled) or point (same preconditioned step, no noise) ({default})",
                           choices=NORM_POSTERIORS),
    "damping_mode": Flag(str, "K-FAC damping ({default})", choices=("factored", "exact")),
    "kl_clip": Flag(float, "K-FAC trust region on the update ({default}; 0 turns it off)",
                    to_argument=lambda value: value or None),
    "eps": Flag(float, "Adam's epsilon ({default})"),
}

_ELEMENT = re.compile(r"(\w+)\[(\d+)\]$")


def _split(argument: str) -> tuple[str, int | None]:
    """``"betas[1]"`` -> ``("betas", 1)``; ``"lr"`` -> ``("lr", None)``."""
    m = _ELEMENT.match(argument)
    return (m.group(1), int(m.group(2))) if m else (argument, None)


@dataclass(frozen=True)
class OptimizerEntry:
    """A registered optimizer: ``factory(model, **arguments)`` builds it."""

    name: str
    factory: Callable[..., Optimizer]
    posterior: str
    #: flag -> constructor argument
    flags: Mapping[str, str]

    def _parameters(self) -> Mapping[str, inspect.Parameter]:
        return inspect.signature(self.factory).parameters

    def defaults(self, normalized: bool = False) -> dict[str, Any]:
        """Each flag's default, read from the constructor's signature (in :data:`FLAGS` order); ``normalized``:
        on a network with normalisation layers, where the factory's ``normalized_defaults`` replace them."""
        params = self._parameters()
        out = {}
        for flag, argument in self.flags.items():
            name, index = _split(argument)
            default = params[name].default
            out[flag] = default if index is None else default[index]
        if normalized:
            out.update(self.normalized_defaults())
        return {flag: out[flag] for flag in FLAGS if flag in out}

    def normalized_defaults(self) -> dict[str, Any]:
        """The flags whose default differs on a network with normalisation layers, and that default."""
        return dict(getattr(self.factory, "normalized_defaults", {}))

    def arguments(self, values: Mapping[str, Any], num_data: int | None = None) -> dict[str, Any]:
        """The constructor's keyword arguments for flag ``values`` (a flag missing or ``None``: its default)."""
        params, defaults = self._parameters(), self.defaults()
        out: dict[str, Any] = {}
        for flag, argument in self.flags.items():
            value = values.get(flag)
            value = FLAGS[flag].to_argument(defaults[flag] if value is None else value)
            name, index = _split(argument)
            if index is None:
                out[name] = value
            else:  # one element of a tuple argument, the others from its default until their flags set them
                elements = list(out.get(name, params[name].default))
                elements[index] = value
                out[name] = tuple(elements)
        if num_data is not None and "num_data" in params:
            out["num_data"] = num_data
        return out

    def build(self, model: nn.Module, values: Mapping[str, Any], num_data: int | None = None) -> Optimizer:
        """The optimizer of ``model`` with flag ``values``; a bad value raises the constructor's ``ValueError``."""
        return self.factory(model, **self.arguments(values, num_data))

    def flag_message(self, error: ValueError) -> str:
        """The constructor's ``error`` (in its argument names) in flag names, e.g. ``rank`` -> ``--kfac_rank``."""
        names: dict[str, list[str]] = {"num_data": ["--n"]} if "num_data" in self._parameters() else {}
        for flag, argument in self.flags.items():
            names.setdefault(_split(argument)[0], []).append(f"--{flag}")
        pattern = r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b"
        text = re.sub(pattern, lambda m: "/".join(names[m.group(1)]), str(error))
        text = re.sub(r"(--\w+)='([^']*)'", r"\1 \2", text)  # as typed: --damping_mode factored
        text = re.sub(r"(--\w+)=None", r"no \1", text)
        return f"{text} (--optimizer {self.name})"


_REGISTRY: dict[str, OptimizerEntry] = {}
#: every registered optimizer by ``--optimizer`` name, in registration order (a live, read-only view)
OPTIMIZERS: Mapping[str, OptimizerEntry] = MappingProxyType(_REGISTRY)


def register(factory: Callable[..., Optimizer], *, name: str | None = None, posterior: str | None = None,
             flags: Mapping[str, str] | None = None) -> OptimizerEntry:
    """Make ``factory(model, **arguments)`` an optimizer of ``train.py``; ``name``, ``posterior`` and ``flags``
    default to its ``cli_name``, ``posterior`` and ``cli_flags`` attributes."""
    entry = OptimizerEntry(name or factory.cli_name, factory, posterior or factory.posterior,
                           dict(factory.cli_flags if flags is None else flags))
    if entry.posterior not in POSTERIORS:
        raise ValueError(f"{entry.name}: posterior must be one of {POSTERIORS}, got {entry.posterior!r}")
    params = entry._parameters()
    for flag, argument in entry.flags.items():
        if flag not in FLAGS:
            raise ValueError(f"{entry.name}: flag {flag!r} is not in optimizers.registry.FLAGS; add it there")
        parameter = params.get(_split(argument)[0])
        if parameter is None or parameter.default is inspect.Parameter.empty:
            raise ValueError(f"{entry.name}: flag {flag!r} sets {argument!r}, which is not an argument with a "
                             "default")
    for flag in entry.normalized_defaults():
        if flag not in entry.flags:
            raise ValueError(f"{entry.name}: normalized_defaults names {flag!r}, which is not one of its flags")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove the optimizer ``name``."""
    del _REGISTRY[name]


def option_names() -> tuple[str, ...]:
    """The flags some registered optimizer takes, in :data:`FLAGS` order."""
    taken = {flag for entry in _REGISTRY.values() for flag in entry.flags}
    return tuple(flag for flag in FLAGS if flag in taken)


def optimizer_defaults(name: str, normalized: bool = False) -> dict[str, Any]:
    """The defaults of the flags optimizer ``name`` takes, read from its constructor's signature (``normalized``:
    on a network with normalisation layers, its ``normalized_defaults`` instead where it has them)."""
    return _REGISTRY[name].defaults(normalized)


def compatible_optimizers(posterior: str) -> tuple[str, ...]:
    """The optimizers that train a model with ``posterior``, the default first."""
    return tuple(name for name, entry in _REGISTRY.items() if entry.posterior == posterior)


def default_optimizers() -> dict[str, str]:
    """Each posterior's default optimizer: the first registered for it."""
    return {p: names[0] for p in POSTERIORS if (names := compatible_optimizers(p))}


# -- the built-in optimizers ----------------------------------------------------------------------------------------
def adam(model: nn.Module, lr: float = 1e-3, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam on ``model``'s parameters: the MAP baseline."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    return torch.optim.Adam(model.parameters(), lr=lr, eps=eps)


def sgd(model: nn.Module, lr: float = 0.1, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD with heavy-ball momentum on ``model``'s parameters: the other MAP baseline (torch's defaults are lr 1e-3
    without momentum)."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)


register(NoisyAdam)
register(VOGN)
register(NoisyKFAC)
register(adam, name="adam", posterior="MAP", flags={"lr": "lr", "eps": "eps"})
register(sgd, name="sgd", posterior="MAP", flags={"lr": "lr", "momentum": "momentum"})
