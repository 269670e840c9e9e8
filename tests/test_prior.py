"""The learned prior variance and the ELBO against independent float64 references (docs/MATH.md, "Learning the
prior variance", "The ELBO").

References: the posterior's dense covariance, built either from the optimizer's Kronecker factors with
``torch.linalg.inv`` (factored damping) or by pushing unit vectors through the layer's own linear sampler
(every other representation: exact damping, low-rank factors, block-tridiagonal chains); KL divergences by
``torch.distributions``; the ELBO's maximiser in eta by a golden-section search; the expected log-likelihood
by a many-sample loop over the weights in float64; the per-layer update by a hand-written step.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nets import gaussian_batch, linears, tanh_mlp, train_steps
from torch.distributions import MultivariateNormal, kl_divergence

from data import InMemoryLoader
from optimizers import VOGN, NoisyAdam, NoisyKFAC, noisy_kfac
from optimizers.base import PRIOR_VAR_START
from training import StepRecords, objective_record, train_epoch

REPO = Path(__file__).resolve().parents[1]
N = 40  # num_data: a small N keeps the prior's share of the posterior visible


def data(n: int = 16, d: int = 4):
    return gaussian_batch(n, d, scale=1.5, dtype=torch.float64)


def train(model, optimizer, steps: int, x, y, batch: int = 8) -> None:
    """``steps`` steps on consecutive slices of ``batch`` examples of ``(x, y)``, wrapping around."""
    train_steps(model, optimizer, [(x[(k * batch) % len(x):][:batch], y[(k * batch) % len(x):][:batch])
                                   for k in range(steps)])


def mean_matrix(layer) -> torch.Tensor:
    return torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)


def sampler_columns(noise_of, shapes: list[tuple[int, int]]) -> torch.Tensor:
    """The matrix J (entries x entries) of a linear sampler: column k is the noise of the k-th unit vector."""
    sizes = [a * b for a, b in shapes]
    cols = []
    for k in range(sum(sizes)):
        e = torch.zeros(sum(sizes), dtype=torch.float64)
        e[k] = 1.0
        parts = list(torch.split(e, sizes))
        out = noise_of([p.view(s) for p, s in zip(parts, shapes)])
        cols.append(torch.cat([o.reshape(-1) for o in out]))
    return torch.stack(cols, 1)


def layer_sampler(layer):
    """``E -> U (E * R) V``: the MVG layer's noise matrix (row-major entries) from a standard normal E."""
    def noise(eps):
        out_root, in_root = layer.factor_roots()
        return [in_root.right(out_root.left(eps[0] * layer.mid_scale))]
    return noise


def dense_kl(mean: torch.Tensor, cov: torch.Tensor, etas: torch.Tensor) -> float:
    """KL(N(mean, cov) || N(0, diag(etas))) by torch.distributions (float64)."""
    q = MultivariateNormal(mean, covariance_matrix=0.5 * (cov + cov.T))
    p = MultivariateNormal(torch.zeros_like(mean), covariance_matrix=torch.diag(etas))
    return float(kl_divergence(q, p))


def golden_max(f, lo: float, hi: float, tol: float = 1e-11) -> float:
    """The maximiser of a unimodal f on [lo, hi] by golden-section search."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    while b - a > tol:
        if f(c) > f(d):
            b, d = d, c
            c = b - r * (b - a)
        else:
            a, c = c, d
            d = a + r * (b - a)
    return (a + b) / 2


def mvg_reference(opt: NoisyKFAC, model, etas: list[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (row-major vec of [weight | bias], dense covariance) from the optimizer's factors A, S:
    ``(lambda/N) [A^g]^-1 (x) [S^g]^-1`` with the factored damping of MATH.md written out (g = lambda/(N eta))."""
    out = []
    for layer, eta in zip(linears(model), etas):
        g = 1.0 / (N * eta)
        A, S = opt.state[layer.weight]["A"].double(), opt.state[layer.weight]["S"].double()
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(S) / S.shape[0]))
        Ag = A + pi * math.sqrt(g) * torch.eye(A.shape[0], dtype=torch.float64)
        Sg = S + math.sqrt(g) / pi * torch.eye(S.shape[0], dtype=torch.float64)
        cov = torch.kron(torch.linalg.inv(Sg), torch.linalg.inv(Ag)) / N  # row-major vec: S side outer
        out.append((mean_matrix(layer).reshape(-1), cov))
    return out


# ============================================================================ eta: the ELBO's maximiser
@pytest.mark.parametrize("posterior", ["FFG", "MVG"])
def test_closed_form_eta_maximises_the_numerically_optimised_elbo(posterior: str) -> None:
    """For the current posterior, the ELBO's eta-dependent part is -KL(q || N(0, eta I)); a golden-section search
    of the dense KL over log eta lands on ``estimate_prior_vars`` for every layer."""
    model = tanh_mlp(posterior)
    x, y = data()
    if posterior == "FFG":
        opt = NoisyAdam(model, lr=0.05, num_data=N, prior_var="auto", prior_every=2, init_precision=50.0,
                        betas=(0.9, 0.9))
        train(model, opt, 3, x, y)
        assert len(set(opt.prior_vars)) == 2 and PRIOR_VAR_START not in opt.prior_vars  # learned, per layer
        refs = [(torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]),
                 torch.diag(torch.cat([m.weight_sigma.reshape(-1), m.bias_sigma]).square())) for m in linears(model)]
    else:
        opt = NoisyKFAC(model, lr=0.05, num_data=N, prior_var=0.7, t_stats=1, t_inv=1, kl_clip=None,
                        damping=0.01)
        train(model, opt, 3, x, y)
        refs = mvg_reference(opt, model, [0.7, 0.7])
    estimates = opt.estimate_prior_vars()
    for (mean, cov), estimate in zip(refs, estimates):
        def elbo(log_eta: float, mean=mean, cov=cov) -> float:
            return -dense_kl(mean, cov, torch.full_like(mean, math.exp(log_eta)))
        best = math.exp(golden_max(elbo, math.log(1e-6), math.log(1e3)))
        assert estimate == pytest.approx(best, rel=1e-7)


# ============================================================================ the KL term
@pytest.mark.parametrize("case", ["ffg", "factored", "factored_cholesky", "exact", "low_rank", "chain"])
def test_kl_matches_the_dense_gaussian_kl(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``kl_divergence`` against torch's KL between dense Gaussians, with a different eta per layer."""
    x, y = data()
    etas = [0.3, 2.0]
    if case == "ffg":
        model = tanh_mlp("FFG")
        opt = VOGN(model, lr=0.05, num_data=N, prior_var="auto", prior_every=10**6, init_precision=50.0, beta2=0.9)
        opt.prior_vars = list(etas)
        train(model, opt, 3, x, y)
        parts = [(torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]),
                  torch.diag(torch.cat([m.weight_sigma.reshape(-1), m.bias_sigma]).square())) for m in linears(model)]
    else:
        if case == "factored_cholesky":  # keep the sampler as Cholesky factors (triangular solves)
            monkeypatch.setattr(noisy_kfac, "DENSE_ROOT_MAX", 0)
        model = tanh_mlp("MVG", sizes=(6, 5, 2))
        x, y = data(d=6)
        kw = dict(lr=0.05, num_data=N, prior_var="auto", prior_every=10**6, t_stats=1, t_inv=1, kl_clip=None,
                  damping=0.01)
        if case == "exact":
            kw["damping_mode"] = "exact"
        if case == "low_rank":
            kw["rank"] = 2
        if case == "chain":
            kw["structure"] = "block_tridiagonal"
        opt = NoisyKFAC(model, **kw)
        opt.prior_vars = list(etas)
        train(model, opt, 4, x, y)
        shapes = [layer.matrix_shape for layer in linears(model)]
        if case == "chain":
            chain = opt.chains[0]
            J = sampler_columns(lambda eps: chain.noise_from(eps), shapes)
            assert float(linears(model)[0].cond_gain.abs().max()) > 1e-3  # the layers are coupled
        else:
            J = torch.block_diag(*[sampler_columns(layer_sampler(m), [s]) for m, s in zip(linears(model), shapes)])
        cov = J @ J.T
        if case.startswith("factored"):  # and the sampler is the posterior of MATH.md
            ref = torch.block_diag(*[c for _, c in mvg_reference(opt, model, etas)])
            torch.testing.assert_close(cov, ref, rtol=1e-8, atol=1e-12)
        mean = torch.cat([mean_matrix(m).reshape(-1) for m in linears(model)])
        prior = torch.cat([torch.full((a * b,), eta, dtype=torch.float64) for (a, b), eta in zip(shapes, etas)])
        assert opt.kl_divergence() == pytest.approx(dense_kl(mean, cov, prior), rel=1e-9)
        return
    mean = torch.cat([m for m, _ in parts])
    cov = torch.block_diag(*[c for _, c in parts])
    prior = torch.cat([torch.full((len(m),), eta, dtype=torch.float64) for (m, _), eta in zip(parts, etas)])
    assert opt.kl_divergence() == pytest.approx(dense_kl(mean, cov, prior), rel=1e-9)


# ============================================================================ the ELBO estimate
def test_elbo_estimate_is_unbiased_against_a_many_sample_reference() -> None:
    """A frozen posterior (SGD with lr 0) trained for R epochs: the mean of the per-epoch ELBO estimates
    (``-N train_loss - KL``) agrees, within 4 standard errors, with ``E_q[log p(D|w)]`` from 20,000 weight draws
    of a float64 loop, minus the dense KL."""
    model = tanh_mlp("FFG")
    x, y = data(n=32)
    opt = NoisyAdam(model, num_data=len(x), prior_var=0.5, init_precision=20.0)
    gen = torch.Generator().manual_seed(3)
    for m in linears(model):  # a posterior wide enough for E_q[log p] to differ from log p at the mean
        m.set_ffg_posterior(0.1 + 0.6 * torch.rand(m.weight.shape, generator=gen, dtype=torch.float64),
                            0.1 + 0.6 * torch.rand(m.bias.shape, generator=gen, dtype=torch.float64))
    loader = InMemoryLoader(x, y, batch_size=8, shuffle=True, seed=0)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(5)
    estimates = torch.tensor([objective_record(opt, train_epoch(model, frozen, loader, e, None,
                                                                StepRecords(100, x.device))["loss"])["elbo"]
                              for e in range(1, 301)])

    fc1, fc2 = linears(model)
    S = 20000
    w1 = fc1.weight.detach() + fc1.weight_sigma * torch.randn(S, *fc1.weight.shape, dtype=torch.float64)
    b1 = fc1.bias.detach() + fc1.bias_sigma * torch.randn(S, *fc1.bias.shape, dtype=torch.float64)
    w2 = fc2.weight.detach() + fc2.weight_sigma * torch.randn(S, *fc2.weight.shape, dtype=torch.float64)
    b2 = fc2.bias.detach() + fc2.bias_sigma * torch.randn(S, *fc2.bias.shape, dtype=torch.float64)
    h = torch.tanh(torch.einsum("soi,ni->sno", w1, x) + b1[:, None])
    logp = torch.log_softmax(torch.einsum("soi,sni->sno", w2, h) + b2[:, None], -1)
    loglik = logp.gather(2, y.expand(S, -1)[..., None]).squeeze(-1).sum(1)  # log p(D | w_s)
    mean = torch.cat([p.detach().reshape(-1) for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)])
    var = torch.cat([s.reshape(-1).square() for s in (fc1.weight_sigma, fc1.bias_sigma, fc2.weight_sigma,
                                                        fc2.bias_sigma)])
    ref = float(loglik.mean()) - dense_kl(mean, torch.diag(var), torch.full_like(mean, 0.5))
    se = math.hypot(float(estimates.std()) / math.sqrt(len(estimates)), float(loglik.std()) / math.sqrt(S))
    assert abs(float(estimates.mean()) - ref) < 4 * se, (float(estimates.mean()), ref, se)
    # the plug-in at the mean weights differs from E_q by far more than the tolerance (the test can tell them apart)
    at_mean = -F.cross_entropy(model.eval()(x), y, reduction="sum").item()
    assert abs(at_mean - float(loglik.mean())) > 8 * se


# ============================================================================ the per-layer update
def test_diagonal_step_uses_each_layers_eta() -> None:
    """One Noisy Adam step with eta = (0.3, 2.0) by layer against the hand-written update of MATH.md."""
    model = tanh_mlp("FFG")
    x, y = data()
    lr, (b1, b2), damping, prec, etas = 0.1, (0.5, 0.9), 0.01, 30.0, [0.3, 2.0]
    opt = NoisyAdam(model, lr=lr, betas=(b1, b2), num_data=N, prior_var="auto", prior_every=10**6,
                    damping=damping, init_precision=prec, fisher="batch")
    opt.prior_vars = list(etas)
    mus = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears(model)]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    noises = [m.mean_noise for m in linears(model)]
    grads = [(m.weight.grad.clone(), m.bias.grad.clone()) for m in linears(model)]
    opt.step()
    for m, mu, noise, grad, eta in zip(linears(model), mus, noises, grads, etas):
        g_in = 1.0 / (N * eta)
        f0 = max(0.0, prec / N - g_in)
        for p, sigma, mu_p, n, g in zip((m.weight, m.bias), (m.weight_sigma, m.bias_sigma), mu, noise, grad):
            v = g + g_in * (mu_p + n)
            f = b2 * f0 + (1 - b2) * g * g
            expected = mu_p - lr * ((1 - b1) * v / (1 - b1)) / (f + g_in + damping)
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(sigma, ((1.0 / N) / (f + g_in)).sqrt(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_kfac_step_uses_each_layers_eta(mode: str) -> None:
    """A Noisy K-FAC step with eta = (0.3, 2.0) by layer moves each layer as the (reference-tested) fixed-eta
    optimizer with that layer's eta does: V, the decomposition and the preconditioner all take the layer's own
    gamma_in (the first step's forward is the same draw in every run; the trust region is off, as it couples
    the layers)."""
    x, y = data()
    etas = [0.3, 2.0]
    kw = dict(lr=0.05, num_data=N, t_stats=1, t_inv=1, kl_clip=None, damping=0.01, damping_mode=mode)

    def one_step(prior_var):
        model = tanh_mlp("MVG")
        opt = NoisyKFAC(model, prior_var=prior_var, prior_every=10**6, **kw)
        if prior_var == "auto":
            opt.prior_vars = list(etas)
        torch.manual_seed(7)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return linears(model)

    auto = one_step("auto")
    for i, eta in enumerate(etas):
        fixed = one_step(eta)[i]
        for key in ("weight", "bias", "mid_scale", "out_scale", "in_scale"):
            assert torch.equal(getattr(auto[i], key), getattr(fixed, key)), (i, key)
    other = one_step(etas[1])[0]  # eta matters here: layer 0 with the other eta moves differently
    assert not torch.equal(auto[0].weight, other.weight)
    assert not all(torch.equal(getattr(auto[0], k), getattr(other, k)) for k in ("in_scale", "mid_scale"))


def test_eta_follows_the_estimate_every_prior_every_steps() -> None:
    """eta stays at PRIOR_VAR_START for prior_every - 1 steps, then is the closed form of the posterior of
    that step (taken before sigma is refreshed with the new eta)."""
    model = tanh_mlp("FFG")
    x, y = data()
    opt = NoisyAdam(model, lr=0.05, num_data=N, prior_var="auto", prior_every=3, init_precision=50.0)
    train(model, opt, 2, x, y)
    assert opt.prior_vars == [PRIOR_VAR_START] * 2
    expected = []
    orig = opt._refresh_posteriors

    def spy():
        expected.append(opt.estimate_prior_vars())
        orig()
    opt._refresh_posteriors = spy
    train(model, opt, 1, x, y)
    assert opt.prior_vars == pytest.approx(expected[0], rel=1e-15) and opt.prior_vars != [PRIOR_VAR_START] * 2


def test_fixed_prior_optimizer_is_untouched_by_prior_every() -> None:
    """With a number, eta is that number throughout and the state has no learned values."""
    model = tanh_mlp("FFG")
    x, y = data()
    opt = NoisyAdam(model, num_data=N, prior_var=0.5, prior_every=1)
    train(model, opt, 3, x, y)
    assert opt.prior_variances() == {"0": 0.5, "2": 0.5} and not opt.learns_prior
    assert opt.prior_vars == [PRIOR_VAR_START] * 2


# ============================================================================ checkpoints and the CLI
def _script(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    import os
    env = {k: v for k, v in os.environ.items() if k != "DATA_ROOT"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--model", "MAP", "--prior_var", "auto"], "error: --prior_var is not an option of --optimizer adam"),
    (["--prior_var", "auto", "--prior_every", "0"], "error: --prior_every must be a positive integer"),
    (["--prior_every", "5"], "error: --prior_every sets how often --prior_var auto re-estimates eta"),
    (["--model", "MAP", "--prior_every", "5"], "error: --prior_every is not an option of --optimizer adam"),
    (["--prior_var", "often"], "invalid prior variance 'often'; use a positive number or auto"),
])
def test_bad_prior_flags_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                             needle: str) -> None:
    from option_parser import TrainOptions
    with pytest.raises(SystemExit) as exit_:
        TrainOptions().parse([*argv, "--ckpt_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_bad_prior_flag_through_the_script(tmp_path: Path) -> None:
    r = _script(str(REPO / "train.py"), "--model", "MAP", "--prior_var", "auto", "--ckpt_dir", str(tmp_path),
                cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.splitlines() == ["error: --prior_var is not an option of --optimizer adam; drop --prior_var, or "
                                     "use --optimizer noisy_adam or vogn (--model FFG) or noisy_kfac (--model MVG)"]
