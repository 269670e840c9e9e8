"""Naive, loop-based references for the curvature statistics (independent of ``optimizers``).

Everything here is deliberately slow and literal: one forward/backward per example, patches of
a convolution gathered by explicit index loops (no ``F.unfold``), outer products summed one by
one. The tests compare the library's vectorised hooks against these in float64.
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


class KFACPosteriorReference:
    """The Noisy K-FAC posterior and preconditioner of MATH.md written with dense inverses (and ``kron`` for the
    exact damping), shared by the hand-written step references. Needs ``M``, ``dec`` (the factors ``(A, S)`` per
    layer at the last refresh, or None), ``mode``, ``gin``, ``damping``, ``c2 = lambda/N`` and ``init_std``.
    """

    @staticmethod
    def damped(A, S, gamma):
        pi = math.sqrt((torch.trace(A).item() / A.shape[0]) / (torch.trace(S).item() / S.shape[0]))
        return A + pi * math.sqrt(gamma) * torch.eye(A.shape[0]), S + math.sqrt(gamma) / pi * torch.eye(S.shape[0])

    def std(self, ell):
        if self.dec is None:
            return torch.full_like(self.M[ell], self.init_std)
        A, S = self.dec[ell]
        if self.mode == "factored":
            Ag, Sg = self.damped(A, S, self.gin)
            return (self.c2 * torch.linalg.inv(Sg).diagonal()[:, None] * torch.linalg.inv(Ag).diagonal()[None]).sqrt()
        cov = self.c2 * torch.linalg.inv(torch.kron(A, S) + self.gin * torch.eye(A.shape[0] * S.shape[0]))
        return cov.diagonal().sqrt().reshape(A.shape[0], S.shape[0]).T  # column-major vec

    def noise(self, ell, eps):
        """The factored sampler W - M = sqrt(lambda/N) L_S^-T E L_A^-1 (None where it is not unique)."""
        if self.dec is None:
            return self.init_std * eps
        if self.mode != "factored":
            return None
        Ag, Sg = self.damped(*self.dec[ell], self.gin)
        LA, LS = torch.linalg.cholesky(Ag), torch.linalg.cholesky(Sg)
        return math.sqrt(self.c2) * torch.linalg.inv(LS).T @ eps @ torch.linalg.inv(LA)

    def precondition(self, ell, V):
        A, S = self.dec[ell]
        gamma = self.gin + self.damping
        if self.mode == "factored":
            Ag, Sg = self.damped(A, S, gamma)
            return torch.linalg.inv(Sg) @ V @ torch.linalg.inv(Ag)
        F_ = torch.kron(A, S) + gamma * torch.eye(A.shape[0] * S.shape[0])
        d = torch.linalg.inv(F_) @ V.T.reshape(-1)  # column-major vec
        return d.reshape(A.shape[0], S.shape[0]).T
