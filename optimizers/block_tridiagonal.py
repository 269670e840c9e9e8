"""Block-tridiagonal Noisy K-FAC: the links between adjacent layers of a chain.

docs/MATH.md, "Block-tridiagonal Noisy K-FAC" (Martens & Grosse 2015, section 4.3 and appendix B). For
layer i of a chain and the next layer n, given the *damped* diagonal factors ``A, S`` (layer i),
``A_n, S_n`` (layer n) and the undamped cross factors ``A_c = E[a_i a_n^T]``, ``G_c = E[g_i g_n^T]``::

    link_in  = A_c A_n^-1,  link_out = G_c S_n^-1                (Psi = link_in (x) link_out)
    Y_in  = L_A^-1 A_c L_An^-T = U_in  diag(sqrt(s1)) ...        (thin; A = L_A L_A^T, ...)
    Y_out = L_S^-1 G_c L_Sn^-T = U_out diag(sqrt(s2)) ...
    gap   = max(1 - s2 s1^T, GAP_FLOOR)                          (r_out x r_in)

so that, with ``Z = L_S^-1 X L_A^-T``, ``Sigma_{i|n}^-1 vec(X)`` is
``vec(L_S^-T [Z + U_out ((U_out^T Z U_in) * (1/gap - 1)) U_in^T] L_A^-1)`` and a draw with covariance
``Sigma_{i|n}^-1`` is ``L_S^-T [E + U_out ((U_out^T E U_in) * (1/sqrt(gap) - 1)) U_in^T] L_A^-1``. The
singular vectors come from the small eigenproblem of ``Y^T Y = B^T A^-1 B`` (``B = A_c L_An^-T``, r x r
with r = min(in_i', in_n')) in place of appendix B's n x n ones (the directions outside them have
s = 0); the sampler reuses the layer's Cholesky factors, the preconditioner its damped inverses, so
a refresh factorises no large matrix beyond what the block-diagonal refresh already does.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: floor on ``1 - s1 s2`` (the conditional covariance must stay positive definite; counted when it acts)
GAP_FLOOR = 1e-2


#: eigenvalues of ``B^T A^-1 B`` below this fraction of the largest count as zero (their directions get no correction)
REL_TINY = 1e-12


def _thin_eigen(B: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """``(X Z s^-1/2, s)`` from the eigenpairs ``(s, Z)`` of the symmetric PSD ``B^T X`` (top ``min(B.shape)``).

    With ``X = L^-1 B`` (and ``B`` replaced by ``X``) the columns are the orthonormal left singular
    vectors of ``L^-1 B``; with ``X = (L L^T)^-1 B`` they are ``L^-T`` times those. Columns of
    (numerically) zero eigenvalues are set to zero: their gain ``1/gap - 1`` is zero anyway.
    """
    M = B.mT @ X
    s, Z = torch.linalg.eigh(0.5 * (M + M.mT))
    k = min(B.shape)
    s, Z = s[-k:].clamp_min(0), Z[:, -k:]
    keep = s > REL_TINY * s.max()
    scale = torch.where(keep, s.clamp_min(torch.finfo(s.dtype).tiny).rsqrt(), torch.zeros_like(s))
    return (X @ Z) * scale, s


def _next_roots(A_next: Tensor, S_next: Tensor, A_cross: Tensor, G_cross: Tensor) -> dict[str, Tensor]:
    """``B = A_c L_An^-T``, ``G_c L_Sn^-T`` and the links ``A_c A_n^-1``, ``G_c S_n^-1`` (damped next-layer factors)."""
    La_n, Ls_n = torch.linalg.cholesky(A_next), torch.linalg.cholesky(S_next)
    return {"B_in": torch.linalg.solve_triangular(La_n, A_cross.mT, upper=False).mT,
            "B_out": torch.linalg.solve_triangular(Ls_n, G_cross.mT, upper=False).mT,
            "link_in": torch.cholesky_solve(A_cross.mT, La_n).mT,
            "link_out": torch.cholesky_solve(G_cross.mT, Ls_n).mT}


def _gap(s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """``max(1 - s2 s1^T, GAP_FLOOR)`` and how many entries the floor changed."""
    gap = 1 - s2[:, None] * s1[None, :]
    return gap.clamp_min(GAP_FLOOR), (gap < GAP_FLOOR).sum()


def posterior_link(L_A: Tensor, L_S: Tensor, A_next: Tensor, S_next: Tensor, A_cross: Tensor,
                   G_cross: Tensor) -> dict[str, Tensor]:
    """The sampler's link (module docstring) from layer i's Cholesky factors ``L_A``, ``L_S`` (float64).

    Returns ``link_in``, ``link_out``, the orthonormal ``U_in``, ``U_out``, ``gap`` and ``guarded``.
    """
    out = _next_roots(A_next, S_next, A_cross, G_cross)
    Y_in = torch.linalg.solve_triangular(L_A, out.pop("B_in"), upper=False)
    Y_out = torch.linalg.solve_triangular(L_S, out.pop("B_out"), upper=False)
    out["U_in"], s1 = _thin_eigen(Y_in, Y_in)
    out["U_out"], s2 = _thin_eigen(Y_out, Y_out)
    out["gap"], out["guarded"] = _gap(s1, s2)
    return out


def preconditioner_link(A_inv: Tensor, S_inv: Tensor, A_next: Tensor, S_next: Tensor, A_cross: Tensor,
                        G_cross: Tensor) -> dict[str, Tensor]:
    """The update's link from layer i's damped inverses ``A_inv``, ``S_inv`` (float64).

    Returns ``link_in``, ``link_out``, ``P_in = L_A^-T U_in``, ``P_out = L_S^-T U_out``, ``gap``, ``guarded``
    (``L_A^-T U_in = A^-1 B Z s^-1/2`` needs no factorisation of the large A).
    """
    out = _next_roots(A_next, S_next, A_cross, G_cross)
    B_in, B_out = out.pop("B_in"), out.pop("B_out")
    out["P_in"], s1 = _thin_eigen(B_in, A_inv @ B_in)
    out["P_out"], s2 = _thin_eigen(B_out, S_inv @ B_out)
    out["gap"], out["guarded"] = _gap(s1, s2)
    return out


def precondition_chain(Vs: list[Tensor], inverses: list[tuple[Tensor, Tensor]], links: list[dict]) -> list[Tensor]:
    """``Xi^T Lambda Xi`` applied to the chain's gradients ``Vs`` (each out_i x in_i').

    ``inverses[i] = (S_inv, A_inv)`` of layer i's damped factors; ``links[i]`` holds ``link_out``,
    ``link_in``, ``P_out``, ``P_in``, ``gain = 1/gap - 1`` of the link i -> i+1.
    """
    n = len(Vs)
    ys = []
    for i in range(n):
        x = Vs[i]
        S_inv, A_inv = inverses[i]
        if i < n - 1:  # (Xi v)_i = v_i - Psi_i v_{i+1}
            lk = links[i]
            x = x - lk["link_out"] @ Vs[i + 1] @ lk["link_in"].T
            y = S_inv @ x @ A_inv + lk["P_out"] @ ((lk["P_out"].T @ x @ lk["P_in"]) * lk["gain"]) @ lk["P_in"].T
        else:
            y = S_inv @ x @ A_inv
        ys.append(y)
    Ds = [ys[0]]
    for i in range(1, n):  # (Xi^T y)_{i} = y_i - Psi_{i-1}^T y_{i-1}
        lk = links[i - 1]
        Ds.append(ys[i] - lk["link_out"].T @ ys[i - 1] @ lk["link_in"])
    return Ds
