"""What the three natural-gradient VI optimizers share: the model's Bayesian layers, the
curvature hooks, the ELBO constants, and the cross-rank reduction of statistics.

Symbols follow ``docs/MATH.md``: N = ``num_data``, lambda = ``kl_weight``, eta = ``prior_var``,
intrinsic damping ``gamma_in = lambda / (N eta)``, extrinsic damping ``gamma_ex = damping``.

Usage (the two-step update of the first seed)::

    optimizer.zero_grad()
    logits = model(x)                       # train mode: weights sampled from the posterior
    optimizer.true_fisher_backward(logits)  # no-op unless fisher="true"
    F.cross_entropy(logits, y).backward()   # hooks capture the curvature statistics
    optimizer.step()                        # means + curvature, then the posterior scale

Several forward/backward pairs before one ``step()`` are several Monte-Carlo samples: their
gradients and statistics are averaged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from models.bayesian_layers import BayesianLayer, BayesianNorm
from optimizers.curvature import CurvatureCapture, is_norm_layer, supported_layers
from util.distributed import all_reduce_mean, is_distributed

#: how the affine parameters of normalisation layers are treated (MATH.md, "Normalisation layers")
NORM_POSTERIORS = ("gaussian", "point")


class NGVIOptimizer(Optimizer):
    """Base class: owns a ``CurvatureCapture`` over ``model`` and the layers' posteriors."""

    posterior: str = ""

    def __init__(self, model: nn.Module, defaults: dict, capture_kind: str, fisher: str = "example",
                 norm_posterior: str = "point") -> None:
        for key in ("lr", "num_data", "kl_weight", "prior_var"):
            if not defaults[key] > 0:
                raise ValueError(f"{key} must be positive, got {defaults[key]}")
        if defaults.get("damping", 0.0) < 0:
            raise ValueError(f"damping must be >= 0, got {defaults['damping']}")
        if norm_posterior not in NORM_POSTERIORS:
            raise ValueError(f"norm_posterior must be one of {NORM_POSTERIORS}, got {norm_posterior!r}")
        self.norm_posterior = norm_posterior
        self.layers: list[tuple[str, nn.Module]] = []
        for name, module in supported_layers(model):
            if is_norm_layer(module):
                if norm_posterior == "gaussian" and not isinstance(module, BayesianNorm):
                    raise ValueError(f"norm_posterior='gaussian' needs Bayesian normalisation layers, but layer "
                                     f"{name!r} is a plain {type(module).__name__}; build the model with "
                                     "models.build_model / models.bayesianize, or use norm_posterior='point'")
            elif not isinstance(module, BayesianLayer) or module.posterior != self.posterior:
                kind = getattr(module, "posterior", "deterministic")
                raise ValueError(f"{type(self).__name__} needs {self.posterior} Bayesian layers, but layer "
                                 f"{name!r} is {type(module).__name__} ({kind}); build the model with "
                                 f"posterior={self.posterior!r}")
            self.layers.append((name, module))
        if not self.layers:
            raise ValueError(f"{type(self).__name__}: the model has no Bayesian layers")
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        # (layer, group index, params), looked up once: finding a layer's group costs more Python time than
        # a small net's whole update (an index, as load_state_dict and schedulers replace or edit the dicts)
        self._layer_groups = []
        for _, layer in self.layers:
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            group = self.group_of(layer.weight)
            self._layer_groups.append((layer, next(i for i, g in enumerate(self.param_groups) if g is group), params))
        self.capture = CurvatureCapture(model, capture_kind, fisher)
        if norm_posterior == "point":  # point estimates: the layers' samples are their means
            for _, layer in self.layers:
                if isinstance(layer, BayesianNorm):
                    layer.set_ffg_posterior(torch.zeros_like(layer.weight),
                                            torch.zeros_like(layer.bias) if layer.bias is not None else None)

    def sampled(self, layer: nn.Module) -> bool:
        """Whether ``layer`` has a Gaussian posterior whose scale this optimizer writes."""
        return not is_norm_layer(layer) or self.norm_posterior == "gaussian"

    # -- helpers ----------------------------------------------------------------------------
    def group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter not managed by this optimizer")

    @staticmethod
    def gamma_in(group: dict) -> float:
        """Intrinsic damping ``lambda / (N eta)`` (the prior's precision in the ELBO's scale)."""
        return group["kl_weight"] / (group["num_data"] * group["prior_var"])

    @classmethod
    def gamma(cls, group: dict) -> float:
        """Total damping ``gamma = gamma_in + gamma_ex`` of the mean update (``gamma_ex`` = ``damping``)."""
        return cls.gamma_in(group) + group["damping"]

    @staticmethod
    def noise_scale(group: dict) -> float:
        """``sqrt(lambda / N)``: the posterior covariance is (lambda/N) times the inverse curvature."""
        return math.sqrt(group["kl_weight"] / group["num_data"])

    def layer_params(self) -> list[tuple[nn.Module, dict, list[Tensor]]]:
        """``(layer, its param group, [weight, bias])`` for every Bayesian (or normalisation) layer."""
        return [(layer, self.param_groups[i], params) for layer, i, params in self._layer_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.capture.clear()
        for _, layer in self.layers:
            layer.pop_noise_grad()

    def true_fisher_backward(self, logits: Tensor) -> None:
        """With ``fisher="true"``, back-propagate labels sampled from the predictive into the hooks."""
        if self.capture.fisher == "true" and self.capture.active:
            self.capture.sampled_label_backward(logits, [p for g in self.param_groups for p in g["params"]])

    @property
    def distributed(self) -> bool:
        return is_distributed()

    def all_reduce_mean(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` in place over all ranks, in one bucketed all-reduce."""
        all_reduce_mean(tensors)

    def _run_closure(self, closure: Callable[[], Tensor] | None) -> Tensor | None:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()
