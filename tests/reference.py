"""Naive, loop-based references for the curvature statistics and the Noisy K-FAC step (independent of
``optimizers``; written from docs/MATH.md).

Everything here is deliberately slow and literal: one forward/backward per example, patches of
a convolution gathered by explicit index loops (no ``F.unfold``), outer products summed one by
one, inverses by ``torch.linalg.inv`` and ``torch.kron``. The tests compare the library's vectorised
hooks and steps against these in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> list[dict[str, Tensor]]:
    """For each example i: ``{name: d loss_i / d param}`` with ``loss_i = CE(model(x_i), y_i)``."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    out = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append({n: (g if g is not None else torch.zeros_like(p)) for n, p, g in zip(names, params, grads)})
    return out


def naive_sum_grad_squared(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``mean_i (d loss_i / d theta)**2`` by a loop over single examples."""
    grads = per_example_grads(model, x, y)
    return {n: sum(g[n].square() for g in grads) / len(grads) for n in grads[0]}


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_patches(image: Tensor, conv: nn.Conv2d) -> list[list[float]]:
    """Patches of one (C, H, W) image, one list per output location (row-major over (oh, ow)).

    Each patch is ordered (channel, kernel row, kernel column), zero outside the image: the
    order of ``conv.weight.view(out, -1)``. Built by explicit index loops.
    """
    c_in, h, w = image.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = conv.padding
    dh, dw = conv.dilation
    oh_n = conv_output_size(h, kh, sh, ph, dh)
    ow_n = conv_output_size(w, kw, sw, pw, dw)
    img = image.tolist()
    patches = []
    for oh in range(oh_n):
        for ow in range(ow_n):
            patch = []
            for c in range(c_in):
                for i in range(kh):
                    for j in range(kw):
                        r = oh * sh - ph + i * dh
                        s = ow * sw - pw + j * dw
                        patch.append(img[c][r][s] if 0 <= r < h and 0 <= s < w else 0.0)
            patches.append(patch)
    return patches


def _curvature_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def naive_kronecker_factors(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC/KFC factors by explicit loops over examples i and output locations t.

    ``A = (1/B) sum_i sum_t a_t a_t^T`` (homogeneous 1 appended LAST when the layer has a bias),
    ``S = (1/B) sum_i (1/T) sum_t ds_t ds_t^T`` with ``ds`` the gradient of example i's OWN loss
    w.r.t. the layer's output (pre-activation) at location t.
    """
    modules = _curvature_modules(model)
    b = x.shape[0]
    acc: dict[str, list[Tensor]] = {}
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    for i in range(b):
        seen.clear()
        handles = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
                   for name, m in modules]
        try:
            loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        finally:
            for h in handles:
                h.remove()
        names = [n for n, _ in modules if n in seen]
        ds_all = torch.autograd.grad(loss, [seen[n][1] for n in names])
        for name, ds in zip(names, ds_all):
            module = dict(modules)[name]
            inp = seen[name][0].detach()
            if isinstance(module, nn.Conv2d):
                patches = conv_patches(inp[0], module)
                assert len(patches) == ds.shape[2] * ds.shape[3]
                ds_t = [ds[0, :, oh, ow] for oh in range(ds.shape[2]) for ow in range(ds.shape[3])]
                a_t = [torch.tensor(p, dtype=inp.dtype) for p in patches]
            else:
                a_t = [inp.reshape(-1)]
                ds_t = [ds.reshape(-1)]
            if module.bias is not None:
                a_t = [torch.cat([a, a.new_ones(1)]) for a in a_t]
            t = len(a_t)
            a_i = sum(torch.outer(a, a) for a in a_t)
            s_i = sum(torch.outer(d, d) for d in ds_t) / t
            if name not in acc:
                acc[name] = [a_i / b, s_i / b]
            else:
                acc[name][0] = acc[name][0] + a_i / b
                acc[name][1] = acc[name][1] + s_i / b
    return {n: (v[0], v[1]) for n, v in acc.items()}


def weight_matrix(layer: nn.Module, w: Tensor, b: Tensor | None) -> Tensor:
    """The matrix view of MATH.md written without the library's: ``[w.reshape(out, -1) | b]``, a kernel row-major
    (``C_in kh kw``, the order of ``conv_patches``), the bias (when the layer has one) as the last column."""
    w = w.reshape(w.shape[0], -1)
    return torch.cat([w, b[:, None]], 1) if layer.bias is not None else w


def chain_forward(layers: list[nn.Module], Ws: list[Tensor], x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The chain ``layer - tanh - layer - ... - layer`` (flattened before a Linear) at weight matrices ``Ws``: the
    logits, each layer's input and its pre-activation."""
    inputs, pre = [], []
    h = x
    for k, (layer, W) in enumerate(zip(layers, Ws)):
        bias = W[:, -1] if layer.bias is not None else None
        w = W[:, :-1] if layer.bias is not None else W
        if isinstance(layer, nn.Linear):
            h = h.flatten(1)
        inputs.append(h.detach())
        if isinstance(layer, nn.Conv2d):
            s = F.conv2d(h, w.reshape(layer.weight.shape), bias, layer.stride, layer.padding, layer.dilation)
        else:
            s = F.linear(h, w, bias)
        pre.append(s)
        h = torch.tanh(s) if k < len(layers) - 1 else s
    return h, inputs, pre


def kfac_batch_statistics(layers: list[nn.Module], Ws: list[Tensor], x: Tensor, y: Tensor,
                          grid: tuple[int, int] = (1, 0)) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per layer of ``chain_forward``: ``G`` (the gradient of the mean loss as a matrix), ``A`` and ``S`` of this
    batch, by a loop over single examples and explicit patches.

    ``A = mean_i sum_t a_t a_t^T``, ``S = mean_i (1/T) sum_t ds_t ds_t^T``. ``grid = (s, j)``: a convolution's
    ``A`` sums only the output locations (r, c) with r = j // s and c = j % s (mod s), times s^2 (MATH.md, "Noisy
    K-FAC", conv location grids)."""
    s, j = grid
    b = x.shape[0]
    Ws = [W.detach().requires_grad_() for W in Ws]  # so that the pre-activations have a graph
    G = [torch.zeros_like(W) for W in Ws]
    A = [torch.zeros(W.shape[1], W.shape[1], dtype=W.dtype) for W in Ws]
    S = [torch.zeros(W.shape[0], W.shape[0], dtype=W.dtype) for W in Ws]
    for i in range(b):
        logits, inputs, pre = chain_forward(layers, Ws, x[i:i + 1])
        ds_all = torch.autograd.grad(F.cross_entropy(logits, y[i:i + 1]), pre)
        for ell, (layer, inp, ds) in enumerate(zip(layers, inputs, ds_all)):
            if isinstance(layer, nn.Conv2d):
                a_t = [torch.tensor(p, dtype=inp.dtype) for p in conv_patches(inp[0], layer)]
                ds_t = [ds[0, :, r, c] for r in range(ds.shape[2]) for c in range(ds.shape[3])]
                in_grid = [r % s == j // s and c % s == j % s for r in range(ds.shape[2]) for c in range(ds.shape[3])]
                weight = s * s
            else:
                a_t, ds_t, in_grid, weight = [inp[0]], [ds[0]], [True], 1
            assert len(a_t) == len(ds_t)
            if layer.bias is not None:
                a_t = [torch.cat([a, a.new_ones(1)]) for a in a_t]
            T = len(a_t)
            for a, d, used in zip(a_t, ds_t, in_grid):
                G[ell] += torch.outer(d, a) / b
                if used:
                    A[ell] += weight * torch.outer(a, a) / b
                S[ell] += torch.outer(d, d) / (b * T)
    return G, A, S


def factored_damping(A: Tensor, S: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """MATH.md's factored Tikhonov damping: ``A + pi sqrt(gamma) I`` and ``S + sqrt(gamma)/pi I``, with
    ``pi = sqrt((tr A / dim A) / (tr S / dim S))``."""
    pi = math.sqrt((torch.trace(A).item() / A.shape[0]) / (torch.trace(S).item() / S.shape[0]))
    return (A + pi * math.sqrt(gamma) * torch.eye(A.shape[0], dtype=A.dtype),
            S + math.sqrt(gamma) / pi * torch.eye(S.shape[0], dtype=S.dtype))


def kronecker_covariance(A: Tensor, S: Tensor, mode: str, c2: float, gamma_in: float) -> Tensor:
    """The dense posterior covariance of a layer's matrix, in column-major ``vec`` order: ``c2 (A^g (x) S^g)^-1``
    with factored damping (``g = gamma_in``), ``c2 (A (x) S + gamma_in I)^-1`` with exact damping."""
    if mode == "factored":
        Ag, Sg = factored_damping(A, S, gamma_in)
        return c2 * torch.linalg.inv(torch.kron(Ag, Sg))
    return c2 * torch.linalg.inv(torch.kron(A, S) + gamma_in * torch.eye(A.shape[0] * S.shape[0], dtype=A.dtype))


class NoisyKFACReference:
    """MATH.md's Noisy K-FAC on the chain of ``layers`` (``chain_forward``), with dense inverses and ``kron``:
    statistics every ``t_stats`` steps, decompositions every ``t_inv`` (and the warm-up's), both dampings, the KL
    clip, momentum, conv location grids, and several MC samples per step (``G`` and the factors are the means over
    the samples, the prior term is taken at the mean of the samples' weights ``M + mean_s noise_s``).

    ``M``: the means as matrices; ``A``, ``S``: the running factors; ``dec``: the factors at the last refresh (None
    before the first step); ``buf``: the momentum; ``nus``: the KL clip's factor of every step.
    """

    def __init__(self, layers: list[nn.Module], lr: float, momentum: float, num_data: int, kl_weight: float,
                 prior_var: float, damping: float, stat_decay: float, t_stats: int, t_inv: int, damping_mode: str,
                 kl_clip: float | None, init_precision: float, conv_stats_stride: int = 1) -> None:
        self.layers = layers
        self.M = [weight_matrix(m, m.weight.detach(), m.bias.detach() if m.bias is not None else None).clone()
                  for m in layers]
        self.lr, self.mom, self.damping, self.beta = lr, momentum, damping, stat_decay
        self.t_stats, self.t_inv, self.mode, self.kl_clip = t_stats, t_inv, damping_mode, kl_clip
        self.c2 = kl_weight / num_data
        self.gin = kl_weight / (num_data * prior_var)
        self.init_std = init_precision ** -0.5
        self.A: list[Tensor | None] = [None] * len(layers)
        self.S: list[Tensor | None] = [None] * len(layers)
        self.dec: list[tuple[Tensor, Tensor]] | None = None
        self.buf = [torch.zeros_like(m) for m in self.M]
        self.k = 0
        self.stride, self.stats_taken = conv_stats_stride, 0
        self.nus: list[float] = []

    def step(self, x: Tensor, y: Tensor, noises: list[list[Tensor]]) -> None:
        """One step; ``noises``: per MC sample, the per-layer noise matrices of that forward pass."""
        self.k += 1
        # warm-up: statistics every step while k <= t_inv, decompositions at k - 1 = 0, 1, 2, 4, ... < t_inv
        use_stats = self.k <= self.t_inv or (self.k - 1) % self.t_stats == 0
        grid = (self.stride, self.stats_taken % self.stride**2)  # the grids in turn, one per statistics step
        self.stats_taken += use_stats
        per_sample = [kfac_batch_statistics(self.layers, [m + n for m, n in zip(self.M, noise)], x, y, grid)
                      for noise in noises]
        n_s = len(noises)
        Vs = []
        for ell in range(len(self.M)):
            G = sum(st[0][ell] for st in per_sample) / n_s
            if use_stats:
                Ab = sum(st[1][ell] for st in per_sample) / n_s
                Sb = sum(st[2][ell] for st in per_sample) / n_s
                if self.A[ell] is None:
                    self.A[ell], self.S[ell] = Ab, Sb
                else:
                    self.A[ell] = self.beta * self.A[ell] + (1 - self.beta) * Ab
                    self.S[ell] = self.beta * self.S[ell] + (1 - self.beta) * Sb
            mean_noise = sum(noise[ell] for noise in noises) / n_s
            Vs.append(G + self.gin * (self.M[ell] + mean_noise))
        warm = {2**j for j in range(30) if 2**j < self.t_inv}
        if self.dec is None or (self.k - 1) % self.t_inv == 0 or (self.k - 1) in warm:
            self.dec = [(A.clone(), S.clone()) for A, S in zip(self.A, self.S)]
        Ds = [self.precondition(ell, V) for ell, V in enumerate(Vs)]
        nu = 1.0
        if self.kl_clip is not None:
            nu = min(1.0, math.sqrt(self.kl_clip / sum(self.lr**2 * (D * V).sum().item() for D, V in zip(Ds, Vs))))
        self.nus.append(nu)
        for ell, D in enumerate(Ds):
            self.buf[ell] = self.mom * self.buf[ell] + nu * D
            self.M[ell] = self.M[ell] - self.lr * self.buf[ell]

    def std(self, ell: int) -> Tensor:
        """The posterior's marginal std of layer ``ell``'s matrix entries."""
        if self.dec is None:
            return torch.full_like(self.M[ell], self.init_std)
        A, S = self.dec[ell]
        if self.mode == "factored":
            Ag, Sg = factored_damping(A, S, self.gin)
            return (self.c2 * torch.linalg.inv(Sg).diagonal()[:, None] * torch.linalg.inv(Ag).diagonal()[None]).sqrt()
        cov = kronecker_covariance(A, S, "exact", self.c2, self.gin)
        return cov.diagonal().sqrt().reshape(A.shape[0], S.shape[0]).T  # column-major vec

    def noise(self, ell: int, eps: Tensor, eigen: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """The sample ``W - M`` for standard normal ``eps``: ``sqrt(lambda/N) L_S^-T E L_A^-1`` (factored damping).

        Exact damping's eigenbasis is unique only up to signs, so the caller passes the one to use,
        ``eigen = (Q_A, d_A, Q_S, d_S)``; it is first checked to decompose this reference's factors."""
        if self.dec is None:
            return self.init_std * eps
        A, S = self.dec[ell]
        if self.mode == "factored":
            Ag, Sg = factored_damping(A, S, self.gin)
            LA, LS = torch.linalg.cholesky(Ag), torch.linalg.cholesky(Sg)
            return math.sqrt(self.c2) * torch.linalg.inv(LS).T @ eps @ torch.linalg.inv(LA)
        assert eigen is not None, "exact damping: pass the eigenbasis to sample in"
        QA, dA, QS, dS = eigen
        for Q, d, Fm in ((QA, dA, A), (QS, dS, S)):
            torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0]), rtol=1e-8, atol=1e-12)
            torch.testing.assert_close(Q @ torch.diag(d) @ Q.T, Fm, rtol=1e-8, atol=1e-10)
        return math.sqrt(self.c2) * QS @ (eps / (dS[:, None] * dA[None] + self.gin).sqrt()) @ QA.T

    def precondition(self, ell: int, V: Tensor) -> Tensor:
        """``D = (S^gamma)^-1 V (A^gamma)^-1`` (factored) or ``(A (x) S + gamma I)^-1 vec(V)`` (exact)."""
        A, S = self.dec[ell]
        gamma = self.gin + self.damping
        if self.mode == "factored":
            Ag, Sg = factored_damping(A, S, gamma)
            return torch.linalg.inv(Sg) @ V @ torch.linalg.inv(Ag)
        F_ = torch.kron(A, S) + gamma * torch.eye(A.shape[0] * S.shape[0])
        d = torch.linalg.inv(F_) @ V.T.reshape(-1)  # column-major vec
        return d.reshape(A.shape[0], S.shape[0]).T


def vec(m: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec of (..., out, in') matrices."""
    return m.transpose(-1, -2).reshape(*m.shape[:-2], -1)


def unvec(v: torch.Tensor, out: int, n_in: int) -> torch.Tensor:
    """The inverse of ``vec`` for (out, n_in) matrices."""
    return v.reshape(*v.shape[:-1], n_in, out).transpose(-1, -2)


def dense_fhat(A: list[Tensor], S: list[Tensor], Ac: list[Tensor], Gc: list[Tensor], gamma: float
               ) -> tuple[Tensor, list[int]]:
    """Block-tridiagonal Noisy K-FAC's dense F-hat (MATH.md) of a chain's factors, factored-damped by ``gamma``: the
    tridiagonal Kronecker blocks as given (``A_i (x) S_i``, ``A_cross_i (x) G_cross_i``), the rest completed as a
    Gaussian chain (``F_ij = F_i,i+1 F_i+1,i+1^-1 F_i+1,j``) so that its inverse is block-tridiagonal, which is
    checked. Returns F-hat (column-major ``vec`` order per layer) and the layers' offsets in it."""
    L = len(A)
    blocks = [[None] * L for _ in range(L)]
    for i in range(L):
        Ad, Sd = factored_damping(A[i], S[i], gamma)
        blocks[i][i] = torch.kron(Ad, Sd)
    for i in range(L - 1):
        blocks[i][i + 1] = torch.kron(Ac[i], Gc[i])
        blocks[i + 1][i] = blocks[i][i + 1].T
    for gap in range(2, L):
        for i in range(L - gap):
            j = i + gap
            blocks[i][j] = blocks[i][i + 1] @ torch.linalg.inv(blocks[i + 1][i + 1]) @ blocks[i + 1][j]
            blocks[j][i] = blocks[i][j].T
    Fh = torch.cat([torch.cat(row, 1) for row in blocks], 0)
    # the defining property, checked: its inverse vanishes outside the tridiagonal blocks
    sizes = [b.shape[0] for b in blocks[0][0:1]] + [blocks[i][i].shape[0] for i in range(1, L)]
    offs = [0]
    for s_ in sizes:
        offs.append(offs[-1] + s_)
    inv = torch.linalg.inv(Fh)
    for i in range(L):
        for j in range(L):
            if abs(i - j) > 1:
                blk = inv[offs[i]:offs[i + 1], offs[j]:offs[j + 1]]
                assert blk.abs().max() < 1e-9 * inv.abs().max(), "reference F-hat is not a chain"
    return Fh, offs
