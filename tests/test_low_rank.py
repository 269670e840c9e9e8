"""Low-rank Kronecker factors (``NoisyKFAC(rank=K)``): sampler and preconditioner against dense float64
references built from a full eigendecomposition, written out here (docs/MATH.md, "Noisy K-FAC", low-rank factors)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nets import gaussian_batch, tanh_mlp, train_steps
from reference import factored_damping
from torch import nn

from models import BayesianLinear
from models.kronecker import SUBSPACE_TOL, factored_decomposition, subspace_block, top_eigenpairs
from optimizers import NoisyKFAC


def random_spd(n: int, gen: torch.Generator, decay: float = 0.7) -> torch.Tensor:
    """A PSD matrix with a decaying spectrum, a gap at no particular place, float64."""
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    d = decay ** torch.arange(n, dtype=torch.float64) + 0.01 * torch.rand(n, generator=gen, dtype=torch.float64)
    return Q @ torch.diag(d) @ Q.T


def low_rank_reference(Fm: torch.Tensor, k: int) -> torch.Tensor:
    """``Q diag(d) Q^T + r (I - Q Q^T)``: top-k eigenpairs, ``r`` = mean of the other n - k eigenvalues."""
    d, Q = torch.linalg.eigh(Fm)
    Qk, dk = Q[:, -k:], d[-k:]
    r = d[:-k].mean()
    eye = torch.eye(Fm.shape[0], dtype=Fm.dtype)
    return Qk @ torch.diag(dk) @ Qk.T + r * (eye - Qk @ Qk.T)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_low_rank_roots_match_dense_reference(rank):
    gen = torch.Generator().manual_seed(0)
    A, S = random_spd(9, gen), random_spd(5, gen)
    gamma_in, gamma = 0.02, 0.07
    dec = factored_decomposition(A, S, gamma_in, gamma, rank=rank)
    A_k = low_rank_reference(A, rank)
    S_k = low_rank_reference(S, rank) if rank < 5 else S
    torch.testing.assert_close(torch.trace(A_k), torch.trace(A))  # the isotropic rest keeps the trace
    Ag_in, Sg_in = factored_damping(A_k, S_k, gamma_in)
    Ag, Sg = factored_damping(A_k, S_k, gamma)
    # low rank where 2K < n; formed densely where 2K >= n (same matrix); exact Cholesky where K >= n
    assert dec["in_root"].kind == ("low_rank" if 2 * rank < 9 else "dense")
    assert dec["out_root"].kind == {1: "low_rank", 3: "dense", 6: "cholesky"}[rank]
    V, U = dec["in_root"].dense(left=False), dec["out_root"].dense(left=True)
    torch.testing.assert_close(V.T @ V, torch.linalg.inv(Ag_in), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(U @ U.T, torch.linalg.inv(Sg_in), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dec["A_inv"].dense(left=False), torch.linalg.inv(Ag), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dec["S_inv"].dense(left=True), torch.linalg.inv(Sg), rtol=1e-9, atol=1e-9)
    # applied to a matrix without forming anything: same as the dense products
    X = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(dec["out_root"].left(X) @ V, U @ X @ V)
    torch.testing.assert_close(dec["in_root"].right(X), X @ V)
    # the approximation is not the factor itself (the test could tell them apart)
    assert (torch.linalg.inv(Ag_in) - torch.linalg.inv(factored_damping(A, S, gamma_in)[0])).abs().max() > 1e-3


def spectrum_spd(d: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q diag(d) Q^T, Q)`` with a random orthogonal Q, float64."""
    Q = torch.linalg.qr(torch.randn(len(d), len(d), generator=gen, dtype=torch.float64))[0]
    return Q @ torch.diag(d) @ Q.T, Q


def slow_spectrum(n: int) -> torch.Tensor:
    """Eigenvalues 1, 0.9, 0.81, ... to 0.05, then a flat tail: near k = 4 one warm-start iteration gains 10%."""
    return (0.9 ** torch.arange(n, dtype=torch.float64)).clamp_min(0.05)


def assert_top_pairs(Q: torch.Tensor, d: torch.Tensor, Q_ref: torch.Tensor, d_ref: torch.Tensor) -> None:
    """Eigenvalues to 1e-10 and each eigenvector to 1e-4 (up to sign), against the reference's top pairs."""
    k = Q.shape[1]
    torch.testing.assert_close(d, d_ref[-k:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((Q.T @ Q_ref[:, -k:]).abs(), torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-4)


def test_subspace_iteration_converges_to_top_eigenpairs():
    """From a random start, the warm-started path iterates until the residual is small: the exact top pairs."""
    gen = torch.Generator().manual_seed(1)
    d_true = slow_spectrum(120)
    A, _ = spectrum_spd(d_true, gen)
    d_ref, Q_ref = torch.linalg.eigh(A)
    assert subspace_block(4, 120) is not None  # the iterating path, not the eigh of a small factor
    Q0, d0 = top_eigenpairs(A, 4)
    torch.testing.assert_close(d0, d_ref[-4:])
    start = torch.linalg.qr(torch.randn(120, 4, generator=gen, dtype=torch.float64))[0]
    Q, d = top_eigenpairs(A, 4, start)
    assert_top_pairs(Q, d, Q_ref, d_ref)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4, dtype=torch.float64))
    # its own criterion, recomputed: every pair's residual within the tolerance
    assert (A @ Q - Q * d).norm(dim=0).max() <= SUBSPACE_TOL * d.max()
    # (two products of the warm start alone, the old rule, are not converged here)
    Q2 = torch.linalg.qr(A @ torch.linalg.qr(A @ start)[0])[0]
    assert torch.linalg.svdvals(Q2.T @ Q_ref[:, -4:]).min() < 0.99


def test_subspace_iteration_finds_an_eigenvector_the_warm_start_lacks():
    """A warm start spanning eigenvectors 1, 2, 4, 5 (an invariant subspace without the 3rd) still gives the top 4.

    Iterating that basis alone never leaves it (the subspace is invariant); the block's extra columns find
    the 3rd eigenvector."""
    gen = torch.Generator().manual_seed(2)
    d_true = torch.cat([torch.tensor([1.0, 0.8, 0.6, 0.5, 0.45], dtype=torch.float64),
                        torch.linspace(0.2, 0.01, 115, dtype=torch.float64)])
    A, Q_true = spectrum_spd(d_true, gen)
    basis = Q_true[:, [0, 1, 3, 4]]
    assert torch.linalg.svdvals(basis.T @ Q_true[:, :4]).min() < 1e-12  # the 3rd is missing
    Q, d = top_eigenpairs(A, 4, basis)
    d_ref, Q_ref = torch.linalg.eigh(A)
    assert_top_pairs(Q, d, Q_ref, d_ref)


def test_subspace_iteration_falls_back_to_eigh():
    """Not converged within ``max_iters`` products: the exact eigh's pairs (also for a factor too small to iterate)."""
    gen = torch.Generator().manual_seed(3)
    A, _ = spectrum_spd(slow_spectrum(120), gen)
    d_ref, Q_ref = torch.linalg.eigh(A)
    start = torch.linalg.qr(torch.randn(120, 4, generator=gen, dtype=torch.float64))[0]
    Q, d = top_eigenpairs(A, 4, start, max_iters=3)
    torch.testing.assert_close(d, d_ref[-4:], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(Q, Q_ref[:, -4:], rtol=1e-13, atol=1e-13)
    small, _ = spectrum_spd(slow_spectrum(40), gen)  # 8 (4 + 8) > 40: eigh straight away
    assert subspace_block(4, 40) is None
    d_small, Q_small = torch.linalg.eigh(small)
    Q, d = top_eigenpairs(small, 4, torch.linalg.qr(torch.randn(40, 4, generator=gen, dtype=torch.float64))[0])
    torch.testing.assert_close(d, d_small[-4:], rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(Q, Q_small[:, -4:], rtol=1e-13, atol=1e-13)


def mlp(seed: int = 0) -> nn.Module:
    return tanh_mlp("MVG", (7, 6, 3), seed)


def run_steps(model, opt, steps, seed=2):
    gen = torch.Generator().manual_seed(seed)
    train_steps(model, opt, [(torch.randn(16, 7, generator=gen, dtype=torch.float64),
                              torch.randint(0, 3, (16,), generator=gen)) for _ in range(steps)])


def test_noisy_kfac_rank_first_step_against_dense_reference(float64):
    """One step of rank-2 Noisy K-FAC: the update S_K^-1 V A_K^-1 and the new posterior's covariance."""
    kw = dict(lr=0.1, num_data=50, kl_weight=0.7, prior_var=2.0, damping=0.03, momentum=0.0, kl_clip=None,
              t_inv=1, init_precision=10.0)
    model = mlp()
    opt = NoisyKFAC(model, rank=2, **kw)
    layer = model[0]
    M0 = torch.cat([layer.weight, layer.bias[:, None]], 1).detach().clone()
    run_steps(model, opt, 1)
    noise = torch.cat([layer.mean_noise[0], layer.mean_noise[1][:, None]], 1) if layer.mean_noise else None
    assert noise is None
    st = opt.state[layer.weight]
    A, S = st["A"], st["S"]
    gamma_in = 0.7 / (50 * 2.0)
    A_k, S_k = low_rank_reference(A, 2), low_rank_reference(S, 2)
    # the posterior after the step: (lambda/N) [A_K^gamma_in]^-1 (x) [S_K^gamma_in]^-1
    Ag_in, Sg_in = factored_damping(A_k, S_k, gamma_in)
    U, V = (r.dense(left=i == 0) for i, r in enumerate(layer.factor_roots()))
    c2 = layer.mid_scale.flatten()[0] ** 2
    torch.testing.assert_close(c2, torch.tensor(0.7 / 50, dtype=torch.float64))
    torch.testing.assert_close(c2 * V.T @ V, 0.7 / 50 * torch.linalg.inv(Ag_in), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(c2 * U @ U.T, torch.linalg.inv(Sg_in) * 0.7 / 50, rtol=1e-8, atol=1e-10)
    std = (0.7 / 50 * torch.linalg.inv(Sg_in).diagonal()[:, None] * torch.linalg.inv(Ag_in).diagonal()[None]).sqrt()
    torch.testing.assert_close(layer.weight_std(), std[:, :-1], rtol=1e-8, atol=0)
    # the update: M1 = M0 - lr [S_K^gamma]^-1 (G + gamma_in W) [A_K^gamma]^-1, W the first (isotropic) sample
    Ag, Sg = factored_damping(A_k, S_k, gamma_in + 0.03)
    M1 = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
    V_grad = -(M1 - M0) / 0.1  # = D
    D_expected_dir = Sg @ V_grad @ Ag  # = G + gamma_in W, recovered through the reference's inverse
    G_plus = torch.linalg.inv(Sg) @ D_expected_dir @ torch.linalg.inv(Ag)
    torch.testing.assert_close(G_plus, V_grad)
    # and independently: recompute G + gamma_in W from the recorded sample and gradient
    model2 = mlp()
    opt2 = NoisyKFAC(model2, rank=2, **kw)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 7, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    opt2.zero_grad()
    F.cross_entropy(model2(x), y).backward()
    l2 = model2[0]
    W = torch.cat([l2.weight + l2.last_noise[0], (l2.bias + l2.last_noise[1])[:, None]], 1).detach()
    G = torch.cat([l2.weight.grad, l2.bias.grad[:, None]], 1)
    D_ref = torch.linalg.inv(Sg) @ (G + gamma_in * W) @ torch.linalg.inv(Ag)
    opt2.step()
    M1_2 = torch.cat([l2.weight, l2.bias[:, None]], 1).detach()
    torch.testing.assert_close(M1_2, M0 - 0.1 * D_ref, rtol=1e-8, atol=1e-10)


def test_rank_sampler_is_what_the_preconditioner_implies_after_warm_started_refreshes(float64):
    """After refreshes from warm-started (inexact) eigenbases, V^T V still is the preconditioner's matrix."""
    model = mlp()
    opt = NoisyKFAC(model, lr=0.05, num_data=100, damping=0.0, rank=2, t_inv=2, kl_clip=None)
    run_steps(model, opt, 7)
    for layer in (model[0], model[2]):
        st = opt.state[layer.weight]
        assert "A_inv_coef" in st and st["A_inv"].shape == (layer.matrix_shape[1], 2)
        U, V = (r.dense(left=i == 0) for i, r in enumerate(layer.factor_roots()))
        c2 = 1.0 / 100
        A_inv = opt._stored_root(st, "A_inv").dense(left=False)
        S_inv = opt._stored_root(st, "S_inv").dense(left=True)
        torch.testing.assert_close(V.T @ V, A_inv, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(U @ U.T, S_inv, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.mid_scale, torch.full_like(layer.mid_scale, c2 ** 0.5))
        # the low-rank-plus-isotropic matrix keeps the factor's trace (pi unchanged by the approximation)
        Q = st["A_inv"]
        torch.testing.assert_close(Q.T @ Q, torch.eye(2, dtype=torch.float64))


def test_rank_factors_stay_the_exact_truncation_over_many_refreshes(float64):
    """20 warm-started refreshes of a 100 x 100 input factor with a slowly decaying spectrum: after each, the
    sampler's and the preconditioner's matrices are those of the exact top-2 truncation of the factor."""
    model = tanh_mlp("MVG", (99, 6, 3), dtype=None)
    kw = dict(lr=0.05, num_data=100, kl_weight=0.5, damping=0.01, rank=2, t_stats=1, t_inv=2, kl_clip=None)
    opt = NoisyKFAC(model, **kw)
    layer = model[0]
    assert subspace_block(2, 100) is not None  # the warm-started iteration, not the eigh of a small factor
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(99, 99, generator=gen) * 0.93 ** torch.arange(99.0)[:, None]  # input spectrum ~ 0.86^i
    gamma_in = 0.5 / 100
    worst = 0.0
    for k in range(1, 41):
        x = torch.randn(32, 99, generator=gen) @ mix
        train_steps(model, opt, [(x, torch.randint(0, 3, (32,), generator=gen))])
        if (k - 1) % 2:
            continue
        st = opt.state[layer.weight]
        Ag_in, _ = factored_damping(low_rank_reference(st["A"], 2), st["S"], gamma_in)
        Ag, _ = factored_damping(low_rank_reference(st["A"], 2), st["S"], gamma_in + 0.01)
        V = layer.factor_roots()[1].dense(left=False)
        for got, ref in ((V.T @ V, torch.linalg.inv(Ag_in)), (opt._stored_root(st, "A_inv").dense(left=False),
                                                             torch.linalg.inv(Ag))):
            worst = max(worst, float((got - ref).norm() / ref.norm()))
    assert worst < 1e-6, worst


def test_rank_sampled_covariance_monte_carlo():
    """Draws of a rank-2 layer have the covariance (lambda/N) [A_K^g]^-1 (x) [S_K^g]^-1 (column-major vec)."""
    model = tanh_mlp("MVG", dtype=None)
    opt = NoisyKFAC(model, lr=0.05, num_data=10, kl_weight=0.5, damping=0.0, rank=2, t_inv=1, kl_clip=None)
    train_steps(model, opt, [gaussian_batch(12, 4, seed=1, scale=2.0)])
    layer = model[0]
    A, S = opt.state[layer.weight]["A"].double(), opt.state[layer.weight]["S"].double()
    Ag, Sg = factored_damping(low_rank_reference(A, 2), low_rank_reference(S, 2), 0.5 / 10)
    ref = 0.05 * torch.kron(torch.linalg.inv(Ag), torch.linalg.inv(Sg))
    n = 200_000
    with torch.no_grad():
        e = torch.vmap(lambda _: torch.cat([t if t.dim() == 2 else t[:, None] for t in layer.sample_noise()], 1),
                       randomness="different")(torch.zeros(n))
    vec = e.transpose(1, 2).reshape(n, -1).double()
    cov = vec.T @ vec / n
    assert (cov - ref).abs().max() < 0.03 * ref.abs().max()
    assert (ref - torch.diag(ref.diagonal())).abs().max() > 0.05 * ref.abs().max()


def test_rank_state_dict_round_trip_and_validation():
    model = mlp()
    opt = NoisyKFAC(model, lr=0.05, num_data=100, rank=2, t_inv=3)
    run_steps(model, opt, 4)
    fresh = mlp(seed=5)
    fresh.load_state_dict(model.state_dict())  # the n x K buffers resize on load
    for a, b in zip(model.modules(), fresh.modules()):
        if isinstance(a, BayesianLinear):
            torch.manual_seed(0)
            na = a.sample_noise()
            torch.manual_seed(0)
            nb = b.sample_noise()
            assert torch.equal(na[0], nb[0]) and b.factor_roots()[1].kind == "low_rank"
    with pytest.raises(ValueError, match="rank"):
        NoisyKFAC(mlp(), rank=2, damping_mode="exact")
    with pytest.raises(ValueError, match="rank"):
        NoisyKFAC(mlp(), rank=0)
