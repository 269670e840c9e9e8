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

``prior_var="auto"`` learns eta per layer by empirical Bayes: every ``prior_every`` steps each layer's
eta is set to the ELBO's maximiser for the current posterior, ``mean over its entries of mu^2 + Var[w]``
(docs/MATH.md, "Learning the prior variance").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from models.bayesian_layers import BayesianLayer, BayesianNorm
from optimizers.curvature import CurvatureCapture
from optimizers.curvature_rules import is_norm_layer, supported_layers
from util.distributed import all_reduce_mean, is_distributed

#: how the affine parameters of normalisation layers are treated (MATH.md, "Normalisation layers")
NORM_POSTERIORS = ("gaussian", "point")

#: ``prior_var`` value that learns eta per layer (empirical Bayes)
AUTO = "auto"
#: eta of an ``auto`` run until its first estimate: the fixed default's value, so that the first
#: ``prior_every`` steps are exactly those of a default run (the means have moved off their initialisation,
#: whose scale, ~1/(3 fan_in), would otherwise be the first prior)
PRIOR_VAR_START = 1.0
#: steps between eta estimates: eta is a mean over a whole layer and moves slowly, an estimate costs one
#: pass over the parameters (FFG) or a layer's marginal variances (MVG, about one decomposition), and 100 is
#: Noisy K-FAC's ``t_inv``: each new eta reaches its decompositions at the next refresh, with no extra one
PRIOR_EVERY = 100
#: the command-line flags every NGVI optimizer takes, each the constructor argument of its name (optimizers.registry)
NGVI_FLAGS = {name: name for name in ("lr", "kl_weight", "prior_var", "prior_every", "damping", "init_precision",
                                      "fisher", "norm_posterior")}


class NGVIOptimizer(Optimizer):
    """Base class: owns a ``CurvatureCapture`` over ``model`` and the layers' posteriors."""

    #: the posterior the model's layers must have (``FFG``, ``MVG``)
    posterior: str = ""
    #: ``--optimizer`` name, and command-line flag -> constructor argument (optimizers.registry)
    cli_name: ClassVar[str] = ""
    cli_flags: ClassVar[dict[str, str]] = NGVI_FLAGS
    #: flag -> default on a network with normalisation layers, where it differs from the signature's
    #: (``train.py`` applies them for ``models.NORMALIZED_ARCHS``; pass them yourself on such a network)
    normalized_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, model: nn.Module, defaults: dict, capture_kind: str, fisher: str = "example",
                 norm_posterior: str = "point") -> None:
        for key in ("lr", "num_data", "kl_weight", "prior_var"):
            if key == "prior_var" and defaults[key] == AUTO:
                continue
            if isinstance(defaults[key], str) or not defaults[key] > 0:
                raise ValueError(f"{key} must be positive" + (" or 'auto'" if key == "prior_var" else "")
                                 + f", got {defaults[key]!r}")
        if not (isinstance(defaults.get("prior_every"), int) and defaults["prior_every"] >= 1):
            raise ValueError(f"prior_every must be a positive integer, got {defaults.get('prior_every')!r}")
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
        self._layer_index = {layer: i for i, (_, layer) in enumerate(self.layers)}
        #: each layer's learned eta (used where its group has ``prior_var="auto"``), and the steps taken
        self.prior_vars = [PRIOR_VAR_START] * len(self.layers)
        self.prior_steps = 0
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

    # -- the prior: fixed, or learned per layer ------------------------------------------------
    def prior_var(self, layer: nn.Module, group: dict) -> float:
        """``layer``'s eta: its group's ``prior_var``, or the layer's learned one where that is ``"auto"``."""
        if group["prior_var"] == AUTO:
            return self.prior_vars[self._layer_index[layer]]
        return group["prior_var"]

    def layer_gamma_in(self, layer: nn.Module, group: dict) -> float:
        """``gamma_in = lambda / (N eta)`` with ``layer``'s eta (``gamma_in(group)`` for a fixed prior)."""
        if group["prior_var"] == AUTO:
            return group["kl_weight"] / (group["num_data"] * self.prior_vars[self._layer_index[layer]])
        return self.gamma_in(group)

    def layer_gamma(self, layer: nn.Module, group: dict) -> float:
        """``gamma_in + gamma_ex`` with ``layer``'s eta."""
        if group["prior_var"] == AUTO:
            return self.layer_gamma_in(layer, group) + group["damping"]
        return self.gamma(group)

    @property
    def learns_prior(self) -> bool:
        return any(g["prior_var"] == AUTO for g in self.param_groups)

    def prior_variances(self) -> dict[str, float]:
        """Every layer's eta, by module name."""
        return {name: self.prior_var(layer, self.param_groups[i]) for (name, layer), (_, i, _)
                in zip(self.layers, self._layer_groups)}

    @torch.no_grad()
    def _layer_second_moment(self, layer: nn.Module) -> tuple[float, int]:
        """``(sum of mu^2 + Var[w] over the layer's entries, their number)``; a point estimate has Var = 0."""
        if isinstance(layer, BayesianLayer):
            return layer.second_moment()
        params = [p for p in (layer.weight, layer.bias) if p is not None]
        return sum(float(p.double().square().sum()) for p in params), sum(p.numel() for p in params)

    def estimate_prior_vars(self) -> list[float]:
        """Each layer's ELBO-maximising eta for the current posterior, ``(||mu||^2 + tr Cov) / d`` (layer order)."""
        out = []
        for _, layer in self.layers:
            total, count = self._layer_second_moment(layer)
            out.append(total / count)
        return out

    @torch.no_grad()
    def _advance_prior(self) -> bool:
        """Count a step; every ``prior_every`` steps set each auto layer's eta to its ELBO maximiser.

        ``eta = (||mu||^2 + tr Cov) / d`` per layer (docs/MATH.md). The estimates are averaged over ranks
        (the posteriors are replicated, so this only keeps rounding from splitting them). Returns whether
        eta changed.
        """
        self.prior_steps += 1
        auto = [i for i, (_, g, _) in enumerate(self._layer_groups) if self.param_groups[g]["prior_var"] == AUTO]
        if not auto or self.prior_steps % self.param_groups[self._layer_groups[auto[0]][1]]["prior_every"]:
            return False
        estimates = self.estimate_prior_vars()
        values = torch.tensor([estimates[i] for i in auto], dtype=torch.float64)
        if self.distributed:
            self.all_reduce_mean([values])
        for i, eta in zip(auto, values.tolist()):
            self.prior_vars[i] = eta
        return True

    @torch.no_grad()
    def kl_divergence(self) -> float:
        """``KL(q || p)`` of the Gaussian layers against ``N(0, eta I)`` each, closed form (float64).

        Per layer with d entries: ``(sum mu^2 + tr Cov) / (2 eta) - d/2 + (d/2) log eta - (1/2) log det Cov``.
        Point estimates (``norm_posterior="point"``) have no KL term.
        """
        total = 0.0
        for (layer, group, _) in self.layer_params():
            if not self.sampled(layer):
                continue
            eta = self.prior_var(layer, group)
            second, d = layer.second_moment()
            total += 0.5 * (second / eta - d + d * math.log(eta) - layer.log_det_covariance())
        return total

    def elbo(self, expected_nll: float) -> dict[str, float]:
        """The ELBO ``E_q[log p(D | w)] - lambda KL(q || p)`` from an estimate of ``E_q[mean loss]``.

        ``expected_loglik = -N expected_nll`` (N = ``num_data``, lambda = ``kl_weight`` of the first group).
        """
        group = self.param_groups[0]
        loglik = -group["num_data"] * expected_nll
        kl = self.kl_divergence()
        return {"elbo": loglik - group["kl_weight"] * kl, "expected_loglik": loglik, "kl": kl}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["prior"] = {"prior_vars": list(self.prior_vars), "steps": self.prior_steps}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        prior = state_dict.pop("prior", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # a checkpoint from before an option existed: its default
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        if prior is not None:  # saved before eta could be learned: a fixed prior, nothing to restore
            if len(prior["prior_vars"]) != len(self.layers):
                raise ValueError(f"the state holds {len(prior['prior_vars'])} prior variances for "
                                 f"{len(self.layers)} layers")
            self.prior_vars = [float(v) for v in prior["prior_vars"]]
            self.prior_steps = int(prior["steps"])

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
