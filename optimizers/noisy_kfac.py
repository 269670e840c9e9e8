"""Noisy K-FAC: natural-gradient VI for a matrix-variate Gaussian posterior.

Zhang, Sun, Duvenaud, Grosse, ICML 2018, Algorithm 2 (docs/MATH.md, "Noisy K-FAC"). Each layer
is one matrix ``W`` (out x in', the bias as the homogeneous last column; convolutions use the
KFC factors of Grosse & Martens 2016) with posterior

    W ~ MN(M, (lambda/N) [A^gamma_in]^-1, [S^gamma_in]^-1)

where ``A``, ``S`` are running averages of the Kronecker factors (``optimizers.curvature``).
Each step k, for every layer::

    every t_stats steps:  A <- beta A + (1 - beta) A_batch ;  S <- beta S + (1 - beta) S_batch
    every t_inv steps:    decompose the damped factors (once; reused for update and sampling)
    V = G_W + gamma_in W                       (W: the sampled weights of this step)
    D = (S^gamma)^-1 V (A^gamma)^-1            (gamma = gamma_in + gamma_ex)
    nu = min(1, sqrt(kl_clip / sum_layers lr^2 <D, V>))   (optional trust region)
    buf <- momentum buf + nu D ;  M <- M - lr buf

Damping (``damping_mode``):

* ``"factored"`` (the paper): ``A^g = A + pi sqrt(g) I``, ``S^g = S + sqrt(g)/pi I`` with
  ``pi = sqrt((tr A / dim A) / (tr S / dim S))``. Computed with Cholesky factors
  ``A^g = L_A L_A^T`` (cheaper than an eigendecomposition): the preconditioner
  keeps the explicit inverses, and the sampler ``W = M + sqrt(lambda/N) L_S^-T E L_A^-1``
  applies the triangular factors of the ``gamma_in``-damped pair by triangular solves (the
  inverses are never formed). With ``rank=K`` a factor larger than K is replaced by its top-K
  eigenpairs plus the mean of the rest of its spectrum (``models.kronecker.damped_roots``), so that every
  per-step product costs O(out in K).
* ``"exact"``: one eigendecomposition per factor, ``A = Q_A diag(d_A) Q_A^T``, gives the exact
  ``(A (x) S + g I)^-1``: ``D = Q_S [(Q_S^T V Q_A) / (d_S d_A^T + g)] Q_A^T`` and samples
  ``sqrt(lambda/N) Q_S [E / sqrt(d_S d_A^T + gamma_in)] Q_A^T``.

The decompositions (``models.kronecker``) run in float64 and are stored in the parameters' dtype.

Normalisation layers (BatchNorm, LayerNorm, GroupNorm) take a diagonal curvature instead, as in
torchsso (MATH.md, "Normalisation layers"): with ``w`` their affine parameters as one vector and
``s`` the mean per-example squared gradient, ``f <- beta f + (1 - beta) s`` (``f = s`` the first
time), ``D = V / (f + gamma)``, the same trust region and momentum, and, with
``norm_posterior="gaussian"``, ``sigma = sqrt(lambda/N) / sqrt(f + gamma_in)`` refreshed every step
(``"point"``: no noise).

``structure="block_tridiagonal"`` couples adjacent layers of every chain of Linear layers
(``models.joint_posterior.find_chains``): the posterior covariance and the preconditioner become
``(lambda/N) F-hat^-1`` and ``F-hat^-1`` of docs/MATH.md, "Block-tridiagonal Noisy K-FAC"
(the link algebra is in ``optimizers.block_tridiagonal``); other layers stay block-diagonal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.joint_posterior import attach_chains
from models.kronecker import (
    SUBSPACE_MAX_ITERS,
    FactorRoot,
    eigen_decomposition,
    factored_damped,
    factored_decomposition,
)
from optimizers.base import NGVI_FLAGS, PRIOR_EVERY, NGVIOptimizer
from optimizers.block_tridiagonal import posterior_link, precondition_chain, preconditioner_link
from optimizers.curvature_rules import is_norm_layer

STRUCTURES = ("block_diagonal", "block_tridiagonal")

#: default steps between factor updates and between decompositions (the CLI's ``--t_stats`` / ``--t_inv``):
#: after the warm-up (``takes_stats``, ``refreshes``) the factors move slowly, and these steps are the costly ones
T_STATS, T_INV = 10, 100

#: a sampler side of at most this size is kept as the explicit triangular matrix ``L^-1`` (one GEMM per step)
#: instead of ``L`` (a triangular solve): on small factors a triangular solve runs well below GEMM speed, and
#: forming ``L^-1`` costs n^3/3 once per refresh
DENSE_ROOT_MAX = 256


def takes_stats(k: int, t_stats: int, t_inv: int) -> bool:
    """Whether step k (from 1) updates the factors: every step of the warm-up (k <= t_inv), then every t_stats."""
    return k <= t_inv or (k - 1) % t_stats == 0


def stats_grid(k: int, t_stats: int, t_inv: int, stride: int) -> tuple[int, int] | None:
    """``(stride, j)``: the grid of conv output locations step k's statistics use (None: all of them).

    j is the number of statistics steps before step k (``takes_stats``) modulo ``stride^2``, so that any
    ``stride^2`` consecutive statistics steps cover every location once.
    """
    if stride == 1:
        return None
    before = k - 1 if k <= t_inv + 1 else t_inv + (k - 2) // t_stats - (t_inv - 1) // t_stats
    return stride, before % (stride * stride)


def refreshes(k: int, t_inv: int) -> bool:
    """Whether step k (from 1) decomposes the factors: k - 1 = 0, 1, 2, 4, 8, ... < t_inv, then every t_inv.

    Factors estimated from a few batches change fast; the warm-up refreshes them while they do
    (docs/MATH.md, "Noisy K-FAC"), at a cost of log2(t_inv) extra decompositions in a whole run.
    """
    j = k - 1
    return j % t_inv == 0 or (j < t_inv and j & (j - 1) == 0)


@dataclass(slots=True)
class LayerUpdate:
    """One layer's step: ``V = G + gamma_in W`` and its preconditioned direction ``D`` (``None`` until a
    chain's joint preconditioner fills it in, ``NoisyKFAC._chain_updates``)."""

    layer: nn.Module
    group: dict
    state: dict
    V: Tensor
    D: Tensor | None


def _running_average(state: dict, keys: tuple[str, str], new: tuple[Tensor, Tensor], beta: float) -> None:
    """``X <- beta X + (1 - beta) X_batch`` for a pair of factors; the first batch initialises them."""
    for key, x in zip(keys, new):
        if key not in state:
            state[key] = x.clone()
        else:
            state[key].mul_(beta).add_(x, alpha=1 - beta)


class NoisyKFAC(NGVIOptimizer):
    """Noisy K-FAC (MVG posterior).

    Args:
        model: a network of ``MVG`` Bayesian layers (``models.build_model(..., "MVG", ...)``).
        lr: step size alpha.
        momentum: heavy-ball momentum on the preconditioned update (0 = Algorithm 2 as printed).
        num_data, kl_weight, prior_var, damping: N, lambda, eta, gamma_ex of docs/MATH.md.
        stat_decay: beta, running-average weight of the Kronecker factors.
        t_stats, t_inv: refresh the factors every ``t_stats`` steps, their decompositions (and
            the posterior's sampling scale) every ``t_inv`` steps.
        damping_mode: ``"factored"`` (paper) or ``"exact"`` (eigenbasis).
        fisher: ``"example"`` (the empirical Fisher: the data's labels) or ``"true"`` (labels sampled from
            the model; call ``true_fisher_backward(logits)`` before ``loss.backward()``).
        kl_clip: trust region on the update (``None`` = off), as in distributed K-FAC.
        init_precision: isotropic posterior precision before the first step.
        rank: ``None`` (exact factors) or K: a factor larger than K keeps its top-K eigenpairs and
            the mean of the rest of its spectrum (``models.kronecker.damped_roots``), so that sampling and
            preconditioning cost O(out in K); factored damping only. The eigenpairs come from
            at most ``subspace_iters`` products of a subspace iteration warm-started at the previous refresh's,
            until their residual is small (``models.kronecker.top_eigenpairs``), else from an exact ``eigh``.
        conv_stats_stride: s > 1 takes a convolution's factor ``A`` from every s-th output location in each
            direction (one of the s^2 grids, in turn, weighted s^2: ``stats_grid``), at 1/s^2 of its cost.
        norm_posterior: affine parameters of normalisation layers (diagonal curvature): ``"point"``
            (no noise; default) or ``"gaussian"`` (a diagonal Gaussian posterior, sampled).
        prior_every: with ``prior_var="auto"`` (eta learned per layer from the marginal variances), steps
            between the estimates; a new eta enters ``V`` at the next step and the posterior at the next
            refresh (with the default 100 = ``t_inv``, the very next step).
        structure: ``"block_diagonal"`` (the paper) or ``"block_tridiagonal"`` (adjacent Linear layers
            of a chain correlated; needs ``damping_mode="factored"`` and ``rank=None``).
    """

    posterior = "MVG"
    cli_name = "noisy_kfac"
    cli_flags = {**NGVI_FLAGS, "momentum": "momentum", "t_stats": "t_stats", "t_inv": "t_inv", "kfac_rank": "rank",
                 "kfac_conv_stride": "conv_stats_stride", "kfac_structure": "structure",
                 "damping_mode": "damping_mode", "kl_clip": "kl_clip"}
    #: a tempered posterior: at lambda = 1 the ELBO's optimum for a BatchNorm ResNet's convolutions is close to
    #: the prior and the network does not train (docs/uncertainty.md, "Noisy K-FAC on a BatchNorm network")
    normalized_defaults = {"kl_weight": 1e-3}

    def __init__(self, model: nn.Module, lr: float = 1e-3, momentum: float = 0.9, num_data: int = 60000,
                 kl_weight: float = 1.0, prior_var: float | str = 1.0, damping: float = 1e-3,
                 stat_decay: float = 0.95,
                 t_stats: int = T_STATS, t_inv: int = T_INV, damping_mode: str = "factored", fisher: str = "example",
                 kl_clip: float | None = 1e-4, init_precision: float = 1e3, rank: int | None = None,
                 subspace_iters: int = SUBSPACE_MAX_ITERS, conv_stats_stride: int = 2, norm_posterior: str = "point",
                 structure: str = "block_diagonal", prior_every: int = PRIOR_EVERY) -> None:
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if structure == "block_tridiagonal" and (damping_mode != "factored" or rank is not None):
            raise ValueError("structure='block_tridiagonal' needs damping_mode='factored' and rank=None")
        if damping_mode not in ("factored", "exact"):
            raise ValueError(f"damping_mode must be 'factored' or 'exact', got {damping_mode!r}")
        if t_stats < 1 or t_inv < 1:
            raise ValueError(f"t_stats and t_inv must be >= 1, got {t_stats}, {t_inv}")
        if not 0.0 <= stat_decay < 1.0 or not 0.0 <= momentum < 1.0:
            raise ValueError("stat_decay and momentum must lie in [0, 1)")
        if kl_clip is not None and kl_clip <= 0:
            raise ValueError(f"kl_clip must be positive, got {kl_clip}")
        if init_precision <= 0:
            raise ValueError(f"init_precision must be positive, got {init_precision}")
        if rank is not None and (rank < 1 or damping_mode != "factored"):
            raise ValueError(f"rank must be None or a positive integer with damping_mode='factored', got {rank} "
                             f"with {damping_mode!r}")
        if subspace_iters < 1:
            raise ValueError(f"subspace_iters must be >= 1, got {subspace_iters}")
        if conv_stats_stride < 1:
            raise ValueError(f"conv_stats_stride must be >= 1, got {conv_stats_stride}")
        defaults = dict(lr=lr, momentum=momentum, num_data=num_data, kl_weight=kl_weight, prior_var=prior_var,
                        damping=damping, stat_decay=stat_decay, t_stats=t_stats, t_inv=t_inv,
                        damping_mode=damping_mode, kl_clip=kl_clip, init_precision=init_precision, rank=rank,
                        subspace_iters=subspace_iters, conv_stats_stride=conv_stats_stride, prior_every=prior_every)
        super().__init__(model, defaults, capture_kind="kfac", fisher=fisher, norm_posterior=norm_posterior)
        for layer, _, params in self.layer_params():
            w = layer.weight
            if is_norm_layer(layer):
                if self.sampled(layer):
                    std = init_precision ** -0.5
                    layer.set_ffg_posterior(*(torch.full_like(p, std) for p in params))
                continue
            out, n_in = layer.matrix_shape
            eye_o, eye_i = torch.eye(out, dtype=w.dtype, device=w.device), torch.eye(n_in, dtype=w.dtype,
                                                                                     device=w.device)
            layer.set_mvg_posterior(eye_o, eye_i, init_precision ** -0.5)
        self._schedule_stats(1, self.param_groups[0])
        self.structure = structure
        self.chains = attach_chains(model) if structure == "block_tridiagonal" else []
        self._chained = {layer for chain in self.chains for layer in chain.layers}
        self._upstream = {layer: nxt for chain in self.chains for layer, nxt in zip(chain.layers, chain.layers[1:])}
        if self._upstream:
            self.capture.track_pairs(list(self._upstream.items()))

    # -- matrix view of a layer -------------------------------------------------------------
    @staticmethod
    def _gradient_matrix(layer, grads: list[Tensor], noise: tuple[Tensor, Tensor | None] | None,
                         gamma_in: float) -> Tensor:
        """``V = G + gamma_in W`` as one out x in' matrix, ``W = M + noise`` the step's weight sample.

        Summed per parameter (contiguous) and concatenated once: on a small net, building and
        slicing the matrices costs more than the arithmetic."""
        params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
        parts = []
        for i, (g, p) in enumerate(zip(grads, params)):
            v = torch.add(g, p, alpha=gamma_in)
            if noise is not None:
                v.add_(noise[i], alpha=gamma_in)
            parts.append(v.reshape(v.shape[0], -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    @staticmethod
    def _stored_root(state: dict, key: str) -> FactorRoot:
        """The preconditioner side ``key`` ("A_inv" / "S_inv") as kept in the state: dense, or low rank."""
        if key + "_coef" in state:
            return FactorRoot("low_rank", state[key], state[key + "_coef"], state[key + "_iso"])
        return FactorRoot("dense", state[key])

    @staticmethod
    def _as_vector(layer, w: Tensor, b: Tensor | None) -> Tensor:
        """A normalisation layer's affine parameters (or their gradients, noise) as one vector."""
        return torch.cat([w.reshape(-1), b.reshape(-1)]) if layer.bias is not None else w.reshape(-1)

    def _precondition(self, layer, state: dict, group: dict, V: Tensor) -> Tensor:
        if group["damping_mode"] == "factored":
            return self._stored_root(state, "A_inv").right(self._stored_root(state, "S_inv").left(V))
        gamma = self.layer_gamma(layer, group)
        QS, QA = state["QS"], state["QA"]
        return QS @ ((QS.T @ V @ QA) / (state["dS"][:, None] * state["dA"][None, :] + gamma)) @ QA.T

    def _state(self, layer) -> dict:
        """The layer's state, created at its first step on the weight's device and dtype (so the optimizer
        may be built before ``model.to(device)``); the step counter stays on the CPU (no device sync)."""
        state = self.state[layer.weight]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            if is_norm_layer(layer):  # a diagonal step over its flattened parameters
                size = sum(p.numel() for p in (layer.weight, layer.bias) if p is not None)
                state["momentum_buffer"] = layer.weight.new_zeros(size)
            else:
                state["momentum_buffer"] = layer.weight.new_zeros(*layer.matrix_shape)
        return state

    def _decompose(self, layer, state: dict, group: dict) -> None:
        gamma_in = self.layer_gamma_in(layer, group)
        dtype = layer.weight.dtype
        c = self.noise_scale(group)
        if group["damping_mode"] == "factored":
            bases = tuple(state[k] if k + "_coef" in state else None for k in ("A_inv", "S_inv"))
            dec = factored_decomposition(state["A"], state["S"], gamma_in, self.layer_gamma(layer, group),
                                         group["rank"], bases, group["subspace_iters"])
            for key in ("A_inv", "S_inv"):
                root = dec[key]
                state[key] = root.mat.to(dtype)
                if root.kind == "low_rank":
                    state[key + "_coef"], state[key + "_iso"] = root.coef.to(dtype), root.iso.to(dtype)
            out_root, in_root = dec["out_root"], dec["in_root"]
            if layer not in self._chained:  # a chain's links are computed from the Cholesky factors themselves
                out_root, in_root = out_root.explicit(DENSE_ROOT_MAX, left=True), in_root.explicit(DENSE_ROOT_MAX)
            layer.set_mvg_posterior(out_root, in_root, c)
        else:
            dec = eigen_decomposition(state["A"], state["S"])
            for key, value in dec.items():
                state[key] = value.to(dtype)
            mid = c / (dec["dS"][:, None] * dec["dA"][None, :] + gamma_in).sqrt()
            layer.set_mvg_posterior(dec["QS"].to(dtype), dec["QA"].T.to(dtype), mid.to(dtype))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update factors, decompositions, means, and the layers' posterior sampling scales."""
        loss = self._run_closure(closure)
        work = []
        for layer, group, _ in self.layer_params():
            if layer.weight.grad is None:
                continue
            passes = self.capture.pop_passes(layer)
            stats = self.capture.pop(layer)
            bias_grad = layer.bias.grad if layer.bias is not None else None
            if layer.bias is not None and bias_grad is None:
                bias_grad = torch.zeros_like(layer.bias)
            grads = [layer.weight.grad] + ([bias_grad] if layer.bias is not None else [])
            if passes > 1:
                grads = [g / passes for g in grads]
            # the (weight, bias) noise of the step's samples
            noise = layer.pop_mean_noise() if hasattr(layer, "pop_mean_noise") else None
            if stats is not None and is_norm_layer(layer):
                stats = [self._as_vector(layer, *stats)]
            work.append((layer, group, grads, stats, noise))
        crosses = {layer: self.capture.pop_cross(layer) for layer in self._upstream}
        # data-parallel: average gradients, factors and weight samples over ranks in one bucket
        self.all_reduce_mean([t for _, _, grads, stats, noise in work for t in (*grads, *(stats or ()), *(noise or ()))
                              if t is not None]
                             + [t for c in crosses.values() if c is not None for t in c])

        updates = []
        for layer, group, grads, stats, noise in work:
            state = self._state(layer)
            state["step"] += 1
            k = int(state["step"].item())  # a CPU counter: no device sync
            if is_norm_layer(layer):
                noise = self._as_vector(layer, *noise) if noise is not None else None
                G = self._as_vector(layer, grads[0], grads[1] if len(grads) > 1 else None)
                updates.append(LayerUpdate(layer, group, state,
                                           *self._diagonal_direction(layer, state, group, G, stats, noise)))
                self._schedule_stats(k + 1, group)
                continue
            if stats is None and "A" not in state and self.capture.fisher == "true":
                raise RuntimeError("NoisyKFAC(fisher='true') took no statistics: call "
                                   "optimizer.true_fisher_backward(logits) before loss.backward()")
            if stats is not None:
                _running_average(state, ("A", "S"), stats, group["stat_decay"])
            refresh = "A" in state and (refreshes(k, group["t_inv"]) or not self._has_decomposition(state))
            if refresh:
                self._decompose(layer, state, group)
            V = self._gradient_matrix(layer, grads, noise, self.layer_gamma_in(layer, group))
            if layer in self._chained:
                D = None  # the chain's joint preconditioner, below
            else:
                D = self._precondition(layer, state, group, V) if self._has_decomposition(state) else V
            updates.append(LayerUpdate(layer, group, state, V, D))
            self._schedule_stats(k + 1, group)
        if self.chains:
            self._chain_updates(updates, crosses)

        nu = self._kl_clip_scale(updates)
        for update in updates:
            layer, group, D = update.layer, update.group, update.D
            buf = update.state["momentum_buffer"].mul_(group["momentum"])
            if nu is None:
                buf.add_(D)
            else:
                torch.addcmul(buf, D, nu.to(D.dtype), out=buf)
            lr = group["lr"]
            if is_norm_layer(layer):
                n_w = layer.weight.numel()
                layer.weight.add_(buf[:n_w].view_as(layer.weight), alpha=-lr)
                if layer.bias is not None:
                    layer.bias.add_(buf[n_w:].view_as(layer.bias), alpha=-lr)
            elif layer.bias is not None:  # views of the buffer's columns: no copies
                layer.weight.add_(buf[:, :-1].unflatten(1, layer.weight.shape[1:]), alpha=-lr)
                layer.bias.add_(buf[:, -1], alpha=-lr)
            else:
                layer.weight.add_(buf.view_as(layer.weight), alpha=-lr)
        self._advance_prior()
        return loss

    def _diagonal_direction(self, layer, state: dict, group: dict, G: Tensor, stats: list[Tensor] | None,
                            noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(V, D)`` of a normalisation layer: ``f`` running average, ``D = V / (f + gamma)``; new sigma."""
        if stats is not None:
            if "fisher" not in state:
                state["fisher"] = stats[0].clone()
            else:
                beta = group["stat_decay"]
                state["fisher"].mul_(beta).add_(stats[0], alpha=1 - beta)
        gamma_in = self.layer_gamma_in(layer, group)
        M = self._as_vector(layer, layer.weight, layer.bias)
        V = G + gamma_in * (M + noise if noise is not None else M)
        if "fisher" not in state:
            return V, V
        f = state["fisher"]
        if self.sampled(layer):
            std = self.noise_scale(group) / (f + gamma_in).sqrt()
            n_w = layer.weight.numel()
            layer.set_ffg_posterior(std[:n_w].view_as(layer.weight),
                                    std[n_w:].view_as(layer.bias) if layer.bias is not None else None)
        return V, V / (f + gamma_in + group["damping"])

    # -- block-tridiagonal chains (docs/MATH.md, "Block-tridiagonal Noisy K-FAC") ------------
    def _chain_updates(self, updates: list[LayerUpdate], crosses: dict) -> None:
        """Update the cross factors, refresh the links, and fill in the chains' joint preconditioned ``D``."""
        index = {update.layer: update for update in updates}
        for chain in self.chains:
            states = [self.state[layer.weight] for layer in chain.layers]
            group = self.group_of(chain.layers[0].weight)
            if any(layer not in index for layer in chain.layers):  # a layer took no gradient: no joint step
                for layer, st in zip(chain.layers, states):
                    if layer in index:
                        V = index[layer].V
                        index[layer].D = self._precondition(layer, st, group, V) if self._has_decomposition(st) else V
                continue
            for layer, state in zip(chain.layers, states):
                cross = crosses.get(layer)
                if cross is None:
                    continue
                _running_average(state, ("A_cross", "G_cross"), cross, group["stat_decay"])
            k = int(states[0]["step"].item())
            ready = all(self._has_decomposition(st) for st in states) and "A_cross" in states[0]
            if ready and (refreshes(k, group["t_inv"]) or "gain" not in states[0]):
                self._refresh_links(chain, states, group)
            Vs = [index[layer].V for layer in chain.layers]
            if "gain" in states[0]:
                Ds = precondition_chain(Vs, [(st["S_inv"], st["A_inv"]) for st in states], states[:-1])
            else:
                Ds = [self._precondition(layer, st, group, V) if self._has_decomposition(st) else V
                      for layer, st, V in zip(chain.layers, states, Vs)]
            for layer, D in zip(chain.layers, Ds):
                index[layer].D = D

    def _refresh_links(self, chain, states: list[dict], group: dict) -> None:
        """Links of the gamma_in-damped factors (posterior, in the model) and gamma-damped ones (update, in state).

        Runs right after the layers' own refresh: the sampler's link reuses layer i's Cholesky factors
        (its ``factor_roots()``), the update's link its damped inverses ``A_inv``, ``S_inv``.
        """
        dtype = chain.layers[0].weight.dtype
        for i, (layer, st, nxt) in enumerate(zip(chain.layers, states[:-1], states[1:])):
            # the next layer's damping: its factors are the ones damped here (its own eta when learned)
            gamma_in = self.layer_gamma_in(chain.layers[i + 1], group)
            gamma = gamma_in + group["damping"]
            out_root, in_root = layer.factor_roots()  # Cholesky factors of the gamma_in-damped A, S
            cross = st["A_cross"].double(), st["G_cross"].double()
            damped_in = factored_damped(nxt["A"], nxt["S"], gamma_in)
            post = posterior_link(in_root.mat.double(), out_root.mat.double(), *damped_in, *cross)
            damped = damped_in if gamma == gamma_in else factored_damped(nxt["A"], nxt["S"], gamma)
            upd = preconditioner_link(st["A_inv"].double(), st["S_inv"].double(), *damped, *cross)
            chain.set_link(i, post["link_out"].to(dtype), post["link_in"].to(dtype), post["U_out"].to(dtype),
                           post["U_in"].to(dtype), (post["gap"].rsqrt() - 1).to(dtype))
            for key in ("link_out", "link_in", "P_out", "P_in"):
                st[key] = upd[key].to(dtype)
            st["gain"] = (1 / upd["gap"] - 1).to(dtype)
            guarded = int(post["guarded"]) + int(upd["guarded"])
            st["guard_count"] = st.get("guard_count", torch.zeros((), dtype=torch.int64)) + (guarded > 0)

    def cross_factors(self) -> dict[tuple[str, str], tuple[Tensor, Tensor]]:
        """The running-average cross factors ``(A_cross, G_cross)`` per pair of adjacent chain layers."""
        out = {}
        for chain in self.chains:
            for (name, layer), name_next in zip(zip(chain.names, chain.layers), chain.names[1:]):
                state = self.state[layer.weight]
                if "A_cross" in state:
                    out[(name, name_next)] = (state["A_cross"], state["G_cross"])
        return out

    def guard_count(self) -> int:
        """How many link refreshes floored ``1 - s1 s2`` at ``GAP_FLOOR`` (docs/MATH.md), over all links."""
        return sum(int(self.state[layer.weight].get("guard_count", 0)) for layer in self._upstream)

    @torch.no_grad()
    def sample_weights(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """One joint posterior sample ``{module_name: (weight, bias_or_None)}`` (chains drawn jointly)."""
        noise = {}
        for chain in self.chains:
            noise.update(zip(chain.names, chain.draw()))
        out = {}
        for name, layer in self.layers:
            if not hasattr(layer, "sample_noise"):  # a deterministic (norm) layer
                out[name] = (layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None)
                continue
            wn, bn = noise[name] if name in noise else layer.sample_noise()
            out[name] = (layer.weight.detach() + wn.view_as(layer.weight),
                         layer.bias.detach() + bn if layer.bias is not None else None)
        return out

    @staticmethod
    def _kl_clip_scale(updates: list[LayerUpdate]) -> Tensor | None:
        """``nu = min(1, sqrt(kl_clip / sum_layers lr^2 <D, V>))`` as a device scalar (no host sync);
        ``None`` when no group clips.

        The learning rates enter as Python scalars: a tensor built from them would be a host-to-device
        copy, which waits for the stream, in every step."""
        clips = [u.group["kl_clip"] for u in updates if u.group["kl_clip"] is not None]
        if not clips:
            return None
        vg = torch.stack([torch.dot(u.D.reshape(-1), u.V.reshape(-1)).double() * (u.group["lr"] * u.group["lr"])
                          for u in updates]).sum()
        return torch.where(vg > 0, (min(clips) / vg).sqrt().clamp(max=1.0), 1.0)

    @staticmethod
    def _has_decomposition(state: dict) -> bool:
        return "A_inv" in state or "QA" in state

    #: state entries that count events: int64 CPU tensors, read on the host without a device sync
    COUNTERS = ("guard_count",)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._restore_counters(state_dict)
        # whether the next backward takes statistics (``capture.active``) is not saved state:
        # re-derive it from the restored step counts, as ``step`` leaves it (else a resumed run
        # takes statistics on a step where the uninterrupted run does not, with t_stats > 1)
        for layer, group, _ in self.layer_params():
            if not self.state.get(layer.weight):  # saved before the first step
                continue
            self._schedule_stats(int(self.state[layer.weight]["step"].item()) + 1, group)

    def _restore_counters(self, state_dict: dict) -> None:
        """Put the saved ``COUNTERS`` back as int64 CPU tensors.

        ``Optimizer.load_state_dict`` casts every state tensor but ``step`` to its parameter's dtype and
        device: a count would come back as a float (on a GPU, a device tensor that syncs when read).
        Saved and current parameters pair up in order, as they do in ``Optimizer.load_state_dict``."""
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            for key in self.COUNTERS:
                if key in saved.get(i, {}):
                    self.state[p][key] = torch.as_tensor(saved[i][key]).to("cpu", torch.int64, copy=True)

    def _schedule_stats(self, k: int, group: dict) -> None:
        """Whether step k's backward takes statistics, and from which grid of conv locations."""
        self.capture.active = takes_stats(k, group["t_stats"], group["t_inv"])
        self.capture.locations = stats_grid(k, group["t_stats"], group["t_inv"], group["conv_stats_stride"])

    def kronecker_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The running-average factors ``(A, S)`` per layer name (e.g. for eigen-spectrum plots)."""
        out = {}
        for name, layer in self.layers:
            state = self.state.get(layer.weight, {})
            if "A" in state:
                out[name] = (state["A"], state["S"])
        return out
