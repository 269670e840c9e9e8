"""Natural-gradient VI with a fully factorised Gaussian posterior: the mechanics shared by
Noisy Adam (Zhang et al. 2018, Algorithm 1) and VOGN (Khan et al. 2018; the second seed).

Per parameter, with ``s`` the curvature estimate of the step (``mean_i g_i**2`` over the batch
by default, ``g**2`` with ``fisher="batch"``, the reparameterisation Hessian estimate
``g * (w - mu) / sigma**2`` with ``fisher="hessian"``) and ``g`` the gradient of the mean loss
at the sampled weights ``w = mu + sigma * eps``::

    v     = g + gamma_in * w_prior            # w_prior = w (Noisy Adam) or mu (VOGN)
    m     = beta1 m + (1 - beta1) v
    f     = beta2 f + (1 - beta2) s           # + (1 - beta2)**2 (f - s)**2 / (2 (f + gamma_in)) for "hessian"
    mu    = mu - lr * (m / (1 - beta1**k)) / (f + gamma_in + gamma_ex)
    sigma = sqrt((lambda / N) / (f + gamma_in))

With ``lambda = 1``, ``beta1 = 0`` and ``w_prior = mu`` this is the second seed's
Algorithm 1 (``sigma = 1/sqrt(N s + lambda_p)`` with prior precision ``lambda_p = 1/eta``).
The initial ``f`` is set so that the posterior starts with precision ``init_precision``
(``None``: start at the prior, ``f = 0``); with ``warm_start`` the average's rate at step k is
``max(1 - beta2, 1/k)``: ``f`` is the mean of the estimates so far until its window fills.
Normalisation layers take the same step; with ``norm_posterior="point"`` their ``sigma`` stays 0
(MATH.md, "Normalisation layers").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from optimizers.base import PRIOR_EVERY, NGVIOptimizer

#: the curvature estimators of the diagonal methods (docs/MATH.md, "Noisy Adam and VOGN")
FISHERS = ("example", "batch", "hessian")


class DiagonalNGVI(NGVIOptimizer):
    """Shared implementation of the FFG optimizers; use ``NoisyAdam`` or ``VOGN``."""

    posterior = "FFG"
    prior_at_sample: bool = True
    #: IVON's optimisation: a posterior as wide as the signature's sigma_0 = 0.032 on every weight keeps a
    #: BatchNorm ResNet from training (docs/uncertainty.md)
    normalized_defaults = {"lr": 0.1, "beta2": 0.99999, "init_precision": 6e4}

    def __init__(self, model: nn.Module, lr: float, betas: tuple[float, float], num_data: int,
                 kl_weight: float = 1.0, prior_var: float | str = 1.0, damping: float = 0.0,
                 init_precision: float | None = None, fisher: str = "example",
                 norm_posterior: str = "point", prior_every: int = PRIOR_EVERY, warm_start: bool = False) -> None:
        if fisher not in FISHERS:
            raise ValueError(f"fisher must be 'example' (per-example squares), 'batch' or 'hessian' "
                             f"(reparameterisation estimate), got {fisher!r}")
        if warm_start and fisher == "hessian":
            raise ValueError("warm_start averages the first batches' curvature, which needs a nonnegative estimate: "
                             "use fisher='example' or fisher='batch'")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if init_precision is not None and init_precision <= 0:
            raise ValueError(f"init_precision must be positive, got {init_precision}")
        defaults = dict(lr=lr, betas=tuple(betas), num_data=num_data, kl_weight=kl_weight, prior_var=prior_var,
                        damping=damping, init_precision=init_precision, fisher=fisher, prior_every=prior_every,
                        warm_start=bool(warm_start))
        super().__init__(model, defaults, capture_kind="diag" if fisher == "example" else "none",
                         norm_posterior=norm_posterior)
        for _, layer in self.layers:
            if self.sampled(layer):
                layer.track_noise_grad = fisher == "hessian"
        self._refresh_posteriors()

    def _initial_fisher(self, group: dict, gamma_in: float) -> float:
        """``f`` before the first step: the posterior precision is ``init_precision`` (0 = the prior)."""
        if group["init_precision"] is None:
            return 0.0
        return max(0.0, group["init_precision"] * group["kl_weight"] / group["num_data"] - gamma_in)

    def _state(self, p: Tensor, group: dict, gamma_in: float) -> dict:
        """``p``'s state, created at its first step on ``p``'s device and dtype (so the optimizer may be
        built before ``model.to(device)``); the step counter stays on the CPU (no device sync to read it)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["fisher"] = torch.full_like(p, self._initial_fisher(group, gamma_in),
                                              memory_format=torch.preserve_format)
        return state

    def _fisher(self, p: Tensor, group: dict, gamma_in: float) -> Tensor:
        state = self.state.get(p)
        if state:
            return state["fisher"]
        return torch.full_like(p, self._initial_fisher(group, gamma_in), memory_format=torch.preserve_format)

    @torch.no_grad()
    def _refresh_posteriors(self) -> None:
        """``sigma = sqrt((lambda/N) / (f + gamma_in))`` into every layer's ``weight_sigma`` / ``bias_sigma``."""
        for group in self.param_groups:  # in place: sigma <- f; += gamma_in; rsqrt; *= sqrt(lambda/N)
            by_gamma: dict[float, list[tuple[Tensor, Tensor]]] = {}  # one entry unless eta is learned per layer
            for layer, grp, params in self.layer_params():
                if grp is group and self.sampled(layer):
                    by_gamma.setdefault(self.layer_gamma_in(layer, group), []).extend(
                        zip(params, (layer.weight_sigma, layer.bias_sigma)))
            for gamma_in, pairs in by_gamma.items():
                sigmas = [sigma for _, sigma in pairs]
                torch._foreach_copy_(sigmas, [self._fisher(p, group, gamma_in) for p, _ in pairs])
                torch._foreach_add_(sigmas, gamma_in)
                torch._foreach_rsqrt_(sigmas)
                torch._foreach_mul_(sigmas, self.noise_scale(group))

    def _update_group(self, group: dict, gamma_in: float, params: tuple[Tensor, ...], grads: tuple[Tensor, ...],
                      stats: tuple[Tensor, ...], noises: tuple[Tensor | None, ...]) -> None:
        """``v = g + gamma_in w``; ``m``, ``f`` running averages; ``mu -= lr m_hat / (f + gamma_in + gamma_ex)``."""
        beta1, beta2 = group["betas"]
        states = [self._state(p, group, gamma_in) for p in params]
        exp_avgs, fishers = [st["exp_avg"] for st in states], [st["fisher"] for st in states]
        torch._foreach_add_([st["step"] for st in states], 1)
        k = states[0]["step"].item()
        # warm start: f is the plain mean of the batches seen until the average's window 1/(1 - beta2) fills
        rate = max(1 - beta2, 1 / k) if group["warm_start"] else 1 - beta2
        v = torch._foreach_add(grads, params, alpha=gamma_in)
        sampled = [(x, n) for x, n in zip(v, noises) if n is not None]
        if sampled:  # the prior term at the sampled weights w = mu + noise
            torch._foreach_add_([x for x, _ in sampled], [n for _, n in sampled], alpha=gamma_in)
        torch._foreach_lerp_(exp_avgs, v, 1 - beta1)
        if group["fisher"] == "hessian":  # the positivity correction (docs/MATH.md), from the old f
            corr = torch._foreach_sub(fishers, list(stats))
            torch._foreach_mul_(corr, corr)
            torch._foreach_div_(corr, torch._foreach_add(fishers, gamma_in))
        torch._foreach_lerp_(fishers, list(stats), rate)
        if group["fisher"] == "hessian":
            torch._foreach_add_(fishers, corr, alpha=0.5 * (1 - beta2) ** 2)
        bias_correction = 1 - beta1 ** k
        denom = torch._foreach_add(fishers, gamma_in + group["damping"])
        torch._foreach_addcdiv_(list(params), exp_avgs, denom, value=-group["lr"] / bias_correction)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update means and Fisher estimates from the gradients since ``zero_grad``; resample scale."""
        loss = self._run_closure(closure)
        work = []
        for layer, group, params in self.layer_params():
            passes = self.capture.pop_passes(layer)
            stats = self.capture.pop(layer)
            noise = layer.pop_mean_noise() if hasattr(layer, "pop_mean_noise") else None
            sampled = self.sampled(layer)
            noise_grad = layer.pop_noise_grad() if sampled else None
            for i, p in enumerate(params):
                if p.grad is None:
                    continue
                g = p.grad / passes if passes > 1 else p.grad
                if group["fisher"] == "hessian" and sampled:  # mean_k g_k * noise_k / sigma**2 (all-reduced below)
                    if noise_grad[i] is None:
                        raise RuntimeError("fisher='hessian' needs the backward pass of a sampled forward "
                                           "(model.train()); this gradient came from the mean weights")
                    gamma_in = self.layer_gamma_in(layer, group)
                    s = noise_grad[i] * ((self._state(p, group, gamma_in)["fisher"] + gamma_in)
                                         / self.noise_scale(group) ** 2)
                else:
                    s = stats[i] if stats is not None else g.square()
                w_noise = noise[i] if (noise is not None and self.prior_at_sample) else None
                work.append((layer, group, p, g, s, w_noise))
        # data-parallel: average gradients, statistics and the prior's weight sample over ranks
        # (one bucket), so that every rank applies the same update to the same means
        self.all_reduce_mean([g for _, _, _, g, _, _ in work]
                             + [s for _, grp, _, _, s, _ in work if grp["fisher"] != "batch"]
                             + [n for *_, n in work if n is not None])
        if self.distributed:
            for _, grp, _, g, s, _ in work:
                if grp["fisher"] == "batch":
                    s.copy_(g.square())
        for group in self.param_groups:  # one fused (foreach) kernel per operation, group and eta
            by_gamma: dict[float, list[tuple]] = {}
            for w in work:
                if w[1] is group:
                    by_gamma.setdefault(self.layer_gamma_in(w[0], group), []).append(w[2:])
            for gamma_in, items in by_gamma.items():
                self._update_group(group, gamma_in, *zip(*items))
        self._advance_prior()  # a new eta enters sigma at once (below) and the mean update from the next step
        self._refresh_posteriors()
        return loss
