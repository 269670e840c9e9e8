"""Linear algebra of a Kronecker-factored Gaussian: damped roots of the factors and how a layer keeps them.

The matrix-variate posterior of a layer (docs/MATH.md, "Noisy K-FAC") has covariance
``(lambda/N) [A^gamma_in]^-1 (x) [S^gamma_in]^-1`` and Noisy K-FAC preconditions with ``[A^gamma]^-1``,
``[S^gamma]^-1``. This module computes both from the running factors ``A``, ``S``:

* factored Tikhonov damping (``factored_damped``, ``factored_decomposition``): Cholesky factors of the damped
  pair, or, with a rank K, the top-K eigenpairs plus the mean of the rest of the spectrum (``damped_roots``),
  found by a warm-started subspace iteration (``top_eigenpairs``);
* the exact damping of ``A (x) S + gamma I`` (``eigen_decomposition``): one eigenbasis per factor.

Decompositions run in float64 (the damped input factor of an MLP is badly conditioned). Each side of the
sampled noise ``U (E * R) V`` is a ``FactorRoot``: the form in which the MVG layers store and apply it
(``models.bayesian_layers``), so the module sits in ``models/`` and ``optimizers/`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: how one side of the MVG noise is stored (``FactorRoot.kind``; the layers' ``*_kind`` buffers)
ROOT_KINDS = ("dense", "cholesky", "low_rank")


@dataclass
class FactorRoot:
    """One side ``U`` (left) or ``V`` (right) of the MVG noise ``U (E * R) V``, applied without forming it.

    * ``"dense"``: ``mat`` is the matrix itself.
    * ``"cholesky"``: ``mat`` is a lower-triangular ``L``; the side is ``L^-T`` on the left and
      ``L^-1`` on the right (two triangular solves), so that ``U U^T`` or ``V^T V`` is ``(L L^T)^-1``.
    * ``"low_rank"``: the symmetric ``iso I + mat diag(coef) mat^T`` (``mat``: n x K, orthonormal
      columns), applied in O(n K) per row.
    """

    kind: str
    mat: Tensor
    coef: Tensor | None = None
    iso: float | Tensor = 0.0

    def left(self, x: Tensor) -> Tensor:
        """``U x``."""
        if self.kind == "dense":
            return self.mat @ x
        if self.kind == "cholesky":  # as (x^T L^-1)^T: the right-side solve is the faster one for a wide x
            return torch.linalg.solve_triangular(self.mat, x.mT, upper=False, left=False).mT
        return torch.addmm(self.iso * x, self.mat, (self.mat.mT @ x).mul_(self.coef[:, None]))

    def right(self, x: Tensor) -> Tensor:
        """``x V``."""
        if self.kind == "dense":
            return x @ self.mat
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.mat, x, upper=False, left=False)
        return torch.addmm(self.iso * x, (x @ self.mat).mul_(self.coef), self.mat.mT)

    def dense(self, left: bool) -> Tensor:
        """The side as an explicit n x n matrix, ``U`` (``left``) or ``V`` (O(n^3) for ``cholesky``)."""
        eye = torch.eye(self.mat.shape[0], dtype=self.mat.dtype, device=self.mat.device)
        return self.left(eye) if left else self.right(eye)

    def logabsdet(self) -> Tensor:
        """``log |det|`` of the side (float64): ``-sum log |diag L|`` for ``cholesky`` (the side is ``L^-1``)."""
        mat = self.mat.double()
        if self.kind == "dense":
            return torch.linalg.slogdet(mat).logabsdet
        if self.kind == "cholesky":
            return -mat.diagonal().abs().log().sum()
        iso = torch.as_tensor(self.iso, dtype=torch.float64, device=mat.device).abs()
        return (mat.shape[0] - mat.shape[1]) * iso.log() + (iso + self.coef.double()).abs().log().sum()

    def explicit(self, max_n: int, left: bool = False) -> FactorRoot:
        """A ``cholesky`` side of size at most ``max_n`` as the same side in ``dense`` form; else itself."""
        if self.kind != "cholesky" or self.mat.shape[0] > max_n:
            return self
        return FactorRoot("dense", self.dense(left))


#: low-rank factors (``top_eigenpairs``): the relative residual at which the warm-started subspace iteration
#: stops, its most products before an exact ``eigh`` takes over, and its least number of extra columns
SUBSPACE_TOL = 1e-6
SUBSPACE_MAX_ITERS = 30
SUBSPACE_OVERSAMPLE = 8


def factored_pi(A: Tensor, S: Tensor, eps: float = 1e-12) -> Tensor:
    """``pi = sqrt((tr A / dim A) / (tr S / dim S))``, the factored-damping split (Martens & Grosse 2015)."""
    ta = A.diagonal().mean().clamp_min(eps)
    ts = S.diagonal().mean().clamp_min(eps)
    return (ta / ts).sqrt()


def factored_damped(A: Tensor, S: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """The factored-Tikhonov damped pair ``(A + pi sqrt(g) I, S + sqrt(g)/pi I)`` in float64."""
    A, S = A.double(), S.double()
    pi = factored_pi(A, S)
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eye_s = torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    return A + pi * gamma ** 0.5 * eye_a, S + gamma ** 0.5 / pi * eye_s


def _cholesky_all(F: Tensor, shifts: list[Tensor]) -> list[Tensor]:
    """Lower Cholesky factors of ``F + shift I`` for every shift, with one device sync for all of them.

    A factor that lost positive definiteness to rounding is symmetrised and retried with a jitter;
    a non-finite ``F`` (a diverged run) gives NaN factors, which the training loop reports.
    """
    out, infos = [], []
    for shift in shifts:
        shifted = F.clone()  # F + shift I without an n x n identity: two large temporaries fewer
        shifted.diagonal().add_(shift)
        L, info = torch.linalg.cholesky_ex(shifted)
        out.append(L)
        infos.append(info)
    if not bool(torch.stack(infos).any()):
        return out
    eye = torch.eye(F.shape[0], dtype=F.dtype, device=F.device)
    finite = bool(torch.isfinite(F).all())
    sym = 0.5 * (F + F.T)
    for i, (info, shift) in enumerate(zip(infos, shifts)):
        if int(info) == 0:
            continue
        if not finite:
            out[i] = torch.full_like(F, float("nan"))
            continue
        out[i] = torch.linalg.cholesky(sym + (shift + 1e-6 * sym.diagonal().mean().abs() + 1e-10) * eye)
    return out


def top_eigenpairs(F: Tensor, k: int, basis: Tensor | None = None,
                   max_iters: int = SUBSPACE_MAX_ITERS) -> tuple[Tensor, Tensor]:
    """``(Q, d)``: the top k eigenvectors (orthonormal columns) of the symmetric PSD ``F`` and their eigenvalues.

    Without ``basis``, an exact ``eigh``. With the previous refresh's ``basis`` (n x k): subspace iteration
    ``Q <- qr(F Q)`` on a block of ``basis`` and ``m - k`` fixed-seed Gaussian columns (``subspace_block``),
    with Rayleigh-Ritz (``eigh`` of the m x m ``Q^T F Q``) after every product, until each of the top k + 1
    Ritz pairs has the residual ``|F x - d x| <= SUBSPACE_TOL max(d)``: O(n^2 m) per product instead of
    ``eigh``'s O(n^3). Why the extra columns and the extra pair: an eigenvector that rose into the top k
    orthogonally to the old basis (which then spans an invariant subspace, with zero residual) is never found
    by iterating the basis alone; the random columns hold it, and the (k+1)-th pair converges only once it
    has risen above the rest of them and into the top k. The extra columns also speed up convergence to the
    rate ``lambda_{m+1} / lambda_k``. Not converged after ``max_iters`` products, or a block not much smaller
    than ``F``: an exact ``eigh``.
    """
    F = 0.5 * (F + F.mT)
    n, m = F.shape[0], subspace_block(k, F.shape[0])
    if basis is None or m is None:
        return _eigh_top(F, k)
    gen = torch.Generator(F.device).manual_seed(0)
    extra = torch.randn(n, m - k, generator=gen, dtype=F.dtype, device=F.device)
    Q = torch.linalg.qr(torch.cat([basis.to(F.dtype), extra], 1))[0]
    for it in range(max_iters):
        Y = F @ Q
        if it > 0:  # (the start's random columns are far from converged)
            d, U = torch.linalg.eigh(Q.mT @ Y)
            top, dk = U[:, -k - 1:], d[-k - 1:]
            X = Q @ top
            res = (Y @ top - X * dk).norm(dim=0).max()
            if not bool(res > SUBSPACE_TOL * d[-1].abs()):  # converged (or not finite: the loop reports those)
                return X[:, 1:], dk[1:].clamp_min(0)
        Q = torch.linalg.qr(Y)[0]
    return _eigh_top(F, k)


def subspace_block(k: int, n: int) -> int | None:
    """The columns ``m`` of ``top_eigenpairs``' block for the top k of an n x n factor,
    ``k + max(k, SUBSPACE_OVERSAMPLE)``; ``None`` (an exact ``eigh``) where ``8 m > n``: each product costs
    O(n^2 m) and convergence takes about ten of them, so a wider block costs about as much as the O(n^3) ``eigh``.
    """
    m = k + max(k, SUBSPACE_OVERSAMPLE)
    return None if 8 * m > n else m


def _eigh_top(F: Tensor, k: int) -> tuple[Tensor, Tensor]:
    d, Q = torch.linalg.eigh(F)
    return Q[:, -k:], d[-k:].clamp_min(0)


def damped_roots(F: Tensor, shift_in: Tensor, shift: Tensor | None, rank: int | None = None,
                 basis: Tensor | None = None, iters: int = SUBSPACE_MAX_ITERS) -> tuple[FactorRoot, FactorRoot]:
    """One factor's sampler root ``R`` (``R^T R = (F + shift_in I)^-1``) and preconditioner ``P = (F + shift I)^-1``.

    ``shift=None``: the same as ``shift_in``.

    Exact (``rank`` None or >= n): ``R = L^-1`` from the Cholesky factor ``L`` (kept as ``L``,
    applied by triangular solves) and the dense ``P``. Low rank (docs/MATH.md, "Noisy K-FAC", low-rank factors):
    ``F ~ F_K = Q diag(d) Q^T + r (I - Q Q^T)`` with the top-K eigenpairs ``(Q, d)`` and ``r`` the
    mean of the remaining eigenvalues, ``(tr F - sum d) / (n - K)`` (so ``tr F_K = tr F``); then
    ``(F_K + s I)^p = (r + s)^p I + Q diag((d + s)^p - (r + s)^p) Q^T`` for ``p = -1/2`` (the root)
    and ``p = -1`` (``P``): the sampled covariance is exactly the one ``P`` implies at ``shift_in``.
    When ``2 K >= n`` the two (symmetric) matrices are formed densely, which is cheaper to apply.
    """
    n = F.shape[0]
    if rank is None or rank >= n:
        Ls = _cholesky_all(F, [shift_in] if shift is None else [shift_in, shift])
        L_in, L = Ls[0], Ls[-1]
        return FactorRoot("cholesky", L_in), FactorRoot("dense", torch.cholesky_inverse(L))
    Q, d = top_eigenpairs(F, rank, basis, iters)
    r = ((F.diagonal().sum() - d.sum()) / (n - rank)).clamp_min(0)
    shift = shift_in if shift is None else shift
    root_iso = (r + shift_in).rsqrt()
    pre_iso = (r + shift).reciprocal()
    root = FactorRoot("low_rank", Q, (d + shift_in).rsqrt() - root_iso, root_iso)
    pre = FactorRoot("low_rank", Q, (d + shift).reciprocal() - pre_iso, pre_iso)
    if 2 * rank >= n:  # the same matrices, applied densely: n^2 per row is cheaper than 2 n K
        return FactorRoot("dense", root.dense(left=False)), FactorRoot("dense", pre.dense(left=False))
    return root, pre


def factored_decomposition(A: Tensor, S: Tensor, gamma_in: float, gamma: float, rank: int | None = None,
                           bases: tuple[Tensor | None, Tensor | None] = (None, None),
                           iters: int = SUBSPACE_MAX_ITERS) -> dict[str, FactorRoot]:
    """Factored Tikhonov damping of both factors (float64).

    Returns the sampler's roots ``in_root`` (``V``, ``V^T V = [A^gamma_in]^-1``) and ``out_root``
    (``U``, ``U U^T = [S^gamma_in]^-1``), so that ``U E V`` has covariance
    ``[A^gamma_in]^-1 (x) [S^gamma_in]^-1``, and the preconditioner's ``A_inv``, ``S_inv``
    (``[A^gamma]^-1``, ``[S^gamma]^-1``). ``rank``: low-rank factors (``damped_roots``),
    warm-started from ``bases`` (the previous ``(A, S)`` eigenbases).
    """
    A, S = A.double(), S.double()
    pi = factored_pi(A, S)
    a_in, s_in = pi * gamma_in ** 0.5, gamma_in ** 0.5 / pi
    a_pre, s_pre = (None, None) if gamma == gamma_in else (pi * gamma ** 0.5, gamma ** 0.5 / pi)
    in_root, A_inv = damped_roots(A, a_in, a_pre, rank, bases[0], iters)
    out_root, S_inv = damped_roots(S, s_in, s_pre, rank, bases[1], iters)
    return {"in_root": in_root, "out_root": out_root, "A_inv": A_inv, "S_inv": S_inv}


def eigen_decomposition(A: Tensor, S: Tensor) -> dict[str, Tensor]:
    """Eigenbases of the (undamped) factors for the exact damping ``(A (x) S + g I)``."""
    dA, QA = torch.linalg.eigh(0.5 * (A + A.T).double())
    dS, QS = torch.linalg.eigh(0.5 * (S + S.T).double())
    return {"QA": QA, "dA": dA.clamp_min(0), "QS": QS, "dS": dS.clamp_min(0)}

