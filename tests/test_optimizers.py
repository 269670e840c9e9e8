"""Noisy Adam, VOGN and Noisy K-FAC against hand-written implementations of MATH.md's updates.

The references below are written from MATH.md only: per-example gradients by a loop over
single examples, Kronecker factors by explicit outer-product sums, inverses with
``torch.linalg.inv`` / ``torch.kron``. The library and the reference see the same noise:
the test reseeds the RNG before the forward and re-draws ``eps`` itself.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_noisy_kfac_follows_reference
from nets import gaussian_batch, tanh_mlp
from reference import NoisyKFACReference, weight_matrix
from torch import nn

from models import BayesianLinear
from optimizers import VOGN, NoisyAdam, NoisyKFAC, noisy_kfac

RTOL, ATOL = 1e-8, 1e-12


def close(got, ref, msg=""):
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL, msg=msg)


def tiny_data():
    x, _ = gaussian_batch(5, 4, scale=1.5, dtype=torch.float64)
    return x, torch.tensor([0, 1, 1, 0, 1])


def per_example(params, x, y):
    """For each example i at weights ``params = [(W1, b1), (W2, b2)]``: the gradients of its own
    loss ``[gW1, gb1, gW2, gb2]``, the layer inputs with the homogeneous 1 ``[a1, a2]`` and the
    pre-activation gradients ``[ds1, ds2]``."""
    out = []
    for i in range(x.shape[0]):
        leaves = [t.detach().clone().requires_grad_() for pair in params for t in pair]
        W1, b1, W2, b2 = leaves
        s1 = x[i] @ W1.T + b1
        h = torch.tanh(s1)
        s2 = h @ W2.T + b2
        loss = -torch.log_softmax(s2, -1)[y[i]]
        grads = torch.autograd.grad(loss, leaves + [s1, s2])
        one = torch.ones(1)
        out.append((list(grads[:4]), [torch.cat([x[i], one]), torch.cat([h.detach(), one])], list(grads[4:])))
    return out


def mean(ts):
    return sum(ts) / len(ts)


# ===================================================================== FFG: Noisy Adam, VOGN
class RefDiagonal:
    """MATH.md's FFG update (Noisy Adam; VOGN = prior term at the mean)."""

    def __init__(self, params, lr, beta1, beta2, num_data, kl_weight, prior_var, damping, init_precision,
                 prior_at_sample, fisher, warm_start=False):
        self.mu = [p.detach().clone() for p in params]
        self.lr, self.b1, self.b2, self.damping = lr, beta1, beta2, damping
        self.c2 = kl_weight / num_data
        self.gin = kl_weight / (num_data * prior_var)
        f0 = 0.0 if init_precision is None else max(0.0, init_precision * kl_weight / num_data - self.gin)
        self.m = [torch.zeros_like(p) for p in self.mu]
        self.f = [torch.full_like(p, f0) for p in self.mu]
        self.prior_at_sample, self.fisher, self.k = prior_at_sample, fisher, 0
        self.warm_start, self.history = warm_start, []  # warm start: f is the mean of every s so far, until
        # the running average's window 1 / (1 - beta2) is full

    def sigma(self):
        return [(self.c2 / (f + self.gin)).sqrt() for f in self.f]

    def step(self, x, y, noises):
        """``noises``: one list [nW1, nb1, nW2, nb2] per MC sample (forward/backward pass)."""
        self.k += 1
        gs, ss = [], []
        for noise in noises:
            w = [m + n for m, n in zip(self.mu, noise)]
            per = per_example([(w[0], w[1]), (w[2], w[3])], x, y)
            g = [mean([p[0][j] for p in per]) for j in range(4)]
            gs.append(g)
            ss.append([mean([p[0][j].square() for p in per]) for j in range(4)])
        g = [mean([gk[j] for gk in gs]) for j in range(4)]
        if self.fisher == "example":
            s = [mean([sk[j] for sk in ss]) for j in range(4)]
        elif self.fisher == "batch":
            s = [t.square() for t in g]
        else:  # reparameterisation estimate: mean over samples of g_k (w_k - mu) / sigma**2
            var = [t.square() for t in self.sigma()]
            s = [mean([gk[j] * noise[j] / var[j] for gk, noise in zip(gs, noises)]) for j in range(4)]
        self.history.append(s)
        for j in range(4):  # the prior term at the mean of the samples' weights (Noisy Adam), or at mu (VOGN)
            w_prior = self.mu[j] + mean([n[j] for n in noises]) if self.prior_at_sample else self.mu[j]
            v = g[j] + self.gin * w_prior
            self.m[j] = self.b1 * self.m[j] + (1 - self.b1) * v
            new_f = self.b2 * self.f[j] + (1 - self.b2) * s[j]
            if self.warm_start and self.k <= 1 / (1 - self.b2):
                new_f = mean([h[j] for h in self.history])
            if self.fisher == "hessian":  # IVON's second-order term keeps f + gamma_in positive
                new_f = new_f + 0.5 * (1 - self.b2) ** 2 * (self.f[j] - s[j]) ** 2 / (self.f[j] + self.gin)
            self.f[j] = new_f
            m_hat = self.m[j] / (1 - self.b1 ** self.k)
            self.mu[j] = self.mu[j] - self.lr * m_hat / (self.f[j] + self.gin + self.damping)


DIAG_CONFIGS = {
    "noisy_adam_example": (NoisyAdam, dict(lr=0.05, betas=(0.9, 0.99), num_data=20, kl_weight=0.5, prior_var=2.0,
                                           damping=0.01, init_precision=10.0, fisher="example"), True),
    "noisy_adam_batch": (NoisyAdam, dict(lr=0.05, betas=(0.8, 0.9), num_data=20, kl_weight=0.5, prior_var=2.0,
                                         damping=0.0, init_precision=10.0, fisher="batch"), True),
    "noisy_adam_hessian": (NoisyAdam, dict(lr=0.05, betas=(0.9, 0.5), num_data=20, kl_weight=0.5, prior_var=2.0,
                                           damping=0.01, init_precision=10.0, fisher="hessian"), True),
    "vogn_hessian": (VOGN, dict(lr=0.05, momentum=0.9, beta2=0.6, num_data=20, kl_weight=0.8, prior_var=0.5,
                                damping=0.0, init_precision=50.0, fisher="hessian"), False),
    "vogn_momentum0": (VOGN, dict(lr=0.05, momentum=0.0, beta2=0.9, num_data=20, kl_weight=1.0, prior_var=0.5,
                                  damping=0.01, init_precision=50.0), False),
    "vogn_momentum0.9": (VOGN, dict(lr=0.05, momentum=0.9, beta2=0.9, num_data=20, kl_weight=0.8, prior_var=0.5,
                                    damping=0.0, init_precision=50.0), False),
    "vogn_prior_init": (VOGN, dict(lr=0.05, momentum=0.9, beta2=0.9, num_data=20, kl_weight=1.0, prior_var=0.5,
                                   init_precision=None), False),
    # window 1 / (1 - 0.6) = 2.5 steps: steps 1 and 2 average, step 3 is the running average's
    "noisy_adam_warm_start": (NoisyAdam, dict(lr=0.05, betas=(0.9, 0.6), num_data=20, kl_weight=0.5, prior_var=2.0,
                                              damping=0.01, init_precision=10.0, warm_start=True), True),
    "vogn_warm_start_batch": (VOGN, dict(lr=0.05, momentum=0.9, beta2=0.6, num_data=20, kl_weight=0.8, prior_var=0.5,
                                         damping=0.0, init_precision=50.0, fisher="batch", warm_start=True), False),
}


def make_ref_diag(params, cls, kw, prior_at_sample):
    if cls is NoisyAdam:
        b1, b2 = kw["betas"]
    else:
        b1, b2 = kw["momentum"], kw["beta2"]
    return RefDiagonal(params, kw["lr"], b1, b2, kw["num_data"], kw["kl_weight"], kw["prior_var"],
                       kw.get("damping", 0.0), kw["init_precision"], prior_at_sample, kw.get("fisher", "example"),
                       kw.get("warm_start", False))


def ffg_stds(layers):
    return [t for layer in layers for t in (layer.weight_std(), layer.bias_std())]


def ffg_forward_backward(model, x, y, seed, ref):
    """Reseeded forward/backward; returns the noise the layers used, checked against sigma * eps."""
    layers = [model[0], model[2]]
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    noise = [t.clone() for layer in layers for t in layer.last_noise]
    torch.manual_seed(seed)
    eps = [torch.randn(p.shape) for p in model.parameters()]  # weight, bias per layer, forward order
    for n, s, e in zip(noise, ref.sigma(), eps):
        close(n, s * e, "sampled noise != sigma * eps")
    return noise


#: the seeds of the forward/backward passes (MC samples) before each step
DIAG_SAMPLES = {"one_sample": ((101,), (102,)), "several_samples": ((11, 12), (13,), (14, 15, 16))}


@pytest.mark.parametrize("samples", list(DIAG_SAMPLES))
@pytest.mark.parametrize("config", list(DIAG_CONFIGS))
def test_diagonal_steps_match_reference(float64, config, samples):
    """Each step against the reference; several forward/backward passes before one step = one step on the averaged
    gradient and statistic, with the prior term (Noisy Adam) at the mean of the samples' weights."""
    cls, kw, prior_at_sample = DIAG_CONFIGS[config]
    model = tanh_mlp("FFG")
    x, y = tiny_data()
    params = list(model.parameters())
    opt = cls(model, **kw)
    ref = make_ref_diag(params, cls, kw, prior_at_sample)
    layers = [model[0], model[2]]
    for s, r in zip(ffg_stds(layers), ref.sigma()):
        close(s, r, "initial posterior std")
    for k, seeds in enumerate(DIAG_SAMPLES[samples], 1):
        opt.zero_grad()
        noises = [ffg_forward_backward(model, x, y, seed, ref) for seed in seeds]
        opt.step()
        ref.step(x, y, noises)
        for j, p in enumerate(params):
            close(p.detach(), ref.mu[j], f"mean {j} step {k}")
            close(opt.state[p]["exp_avg"], ref.m[j], f"m {j} step {k}")
            close(opt.state[p]["fisher"], ref.f[j], f"f {j} step {k}")
            assert opt.state[p]["step"].item() == k
        for s, r in zip(ffg_stds(layers), ref.sigma()):
            close(s, r, f"posterior std step {k}")


# ============================================================================ MVG: Noisy K-FAC
KFAC_COMMON = dict(lr=0.1, num_data=20, kl_weight=0.5, prior_var=2.0, stat_decay=0.8, init_precision=10.0)
KFAC_CONFIGS = {
    "factored": dict(damping_mode="factored", damping=0.01, momentum=0.9, kl_clip=None, t_stats=1, t_inv=1),
    "factored_nodamp_clip_tinv2": dict(damping_mode="factored", damping=0.0, momentum=0.5, kl_clip=1e-3, t_stats=1,
                                       t_inv=2),
    "factored_clip_tstats2": dict(damping_mode="factored", damping=0.05, momentum=0.9, kl_clip=1e-3, t_stats=2,
                                  t_inv=1),
    "factored_tinv3_tstats2": dict(damping_mode="factored", damping=0.05, momentum=0.9, kl_clip=None, t_stats=2,
                                   t_inv=3),
    "exact": dict(damping_mode="exact", damping=0.01, momentum=0.9, kl_clip=None, t_stats=1, t_inv=1),
    "exact_clip_tinv3_tstats2": dict(damping_mode="exact", damping=0.01, momentum=0.0, kl_clip=1e-3, t_stats=2,
                                     t_inv=3),
    "exact_nodamp": dict(damping_mode="exact", damping=0.0, momentum=0.9, kl_clip=None, t_stats=1, t_inv=1),
}
#: factored damping samples through the Cholesky factors (a solve, DENSE_ROOT_MAX = 0) or their explicit inverses
KFAC_CASES = [(c, n) for c, kw in KFAC_CONFIGS.items()
              for n in ((0,) if kw["damping_mode"] == "factored" else ()) + (noisy_kfac.DENSE_ROOT_MAX,)]


@pytest.mark.parametrize("config,dense_root_max", KFAC_CASES, ids=[f"{c}-{n}" for c, n in KFAC_CASES])
def test_noisy_kfac_first_steps_match_reference(float64, config, dense_root_max, monkeypatch):
    monkeypatch.setattr(noisy_kfac, "DENSE_ROOT_MAX", dense_root_max)
    kw = {**KFAC_COMMON, **KFAC_CONFIGS[config]}
    model = tanh_mlp("MVG")
    layers = [model[0], model[2]]
    opt = NoisyKFAC(model, **kw)
    assert_noisy_kfac_follows_reference(model, layers, opt, NoisyKFACReference(layers, **kw), *tiny_data(),
                                        (1,) * 5, seed=200)  # covers the warm-up (t_inv = 3: k <= 3) and after
    assert opt.kronecker_factors().keys() == {"0", "2"}


def test_noisy_kfac_true_fisher(float64):
    kw = {**KFAC_COMMON, **KFAC_CONFIGS["factored"]}
    x, y = tiny_data()
    model_t, model_e = tanh_mlp("MVG"), tanh_mlp("MVG")
    opt_t = NoisyKFAC(model_t, fisher="true", **kw)
    opt_e = NoisyKFAC(model_e, fisher="example", **kw)
    opt_t.zero_grad()
    opt_e.zero_grad()
    torch.manual_seed(7)
    logits = model_t(x)
    noise = [weight_matrix(m, *m.last_noise) for m in (model_t[0], model_t[2])]
    sampled = [weight_matrix(m, m.weight.detach(), m.bias.detach()) + n
               for m, n in zip((model_t[0], model_t[2]), noise)]
    rng = torch.get_rng_state()
    opt_t.true_fisher_backward(logits)
    assert all(p.grad is None for p in model_t.parameters())
    F.cross_entropy(logits, y).backward()
    torch.manual_seed(7)
    logits_e = model_e(x)
    opt_e.true_fisher_backward(logits_e)  # a no-op with the empirical Fisher
    F.cross_entropy(logits_e, y).backward()
    for p_t, p_e in zip(model_t.parameters(), model_e.parameters()):
        assert torch.equal(p_t.grad, p_e.grad)
    # the labels the library drew from the predictive
    torch.set_rng_state(rng)
    y_s = torch.multinomial(F.softmax(logits.detach().float(), dim=-1), 1).squeeze(-1)
    assert not torch.equal(y_s, y)
    opt_t.step()
    opt_e.step()
    per = per_example([(w[:, :-1], w[:, -1]) for w in sampled], x, y_s)
    for ell, (m_t, m_e) in enumerate(zip((model_t[0], model_t[2]), (model_e[0], model_e[2]))):
        A_t, S_t = opt_t.state[m_t.weight]["A"], opt_t.state[m_t.weight]["S"]
        A_e, S_e = opt_e.state[m_e.weight]["A"], opt_e.state[m_e.weight]["S"]
        close(A_t, A_e)
        if ell == 1:  # the last layer always sees the label change
            assert not torch.allclose(S_t, S_e, rtol=1e-3)
        close(S_t, mean([torch.outer(p[2][ell], p[2][ell]) for p in per]), f"S_true layer {ell}")


def test_bad_combinations_raise():
    with pytest.raises(ValueError, match="NoisyKFAC.*'0'"):
        NoisyKFAC(tanh_mlp("FFG"))
    with pytest.raises(ValueError, match="NoisyAdam.*'0'"):
        NoisyAdam(tanh_mlp("MVG"))
    with pytest.raises(ValueError, match="VOGN.*'0'"):
        VOGN(tanh_mlp("MVG"))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="'1'.*Linear"):
        NoisyAdam(plain)
    mixed = nn.Sequential(BayesianLinear(2, 3, posterior="FFG"), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="VOGN.*'2'.*Linear"):
        VOGN(mixed)
    with pytest.raises(ValueError, match="no Bayesian layers"):
        NoisyAdam(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="'1'.*Embedding"):
        NoisyAdam(nn.Sequential(BayesianLinear(2, 3), nn.Embedding(3, 3)))


@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_singular_factors_stay_finite(mode):
    """Input feature 0 always 0 and hidden unit 1 dead: A and S are singular, damping saves them."""
    torch.manual_seed(0)
    model = nn.Sequential(BayesianLinear(5, 4, posterior="MVG"), nn.ReLU(), BayesianLinear(4, 3, posterior="MVG"))
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1] = -5.0
    opt = NoisyKFAC(model, lr=0.05, num_data=60000, damping=0.0, damping_mode=mode, t_inv=1)
    gen = torch.Generator().manual_seed(1)
    for k in range(6):
        x = torch.randn(16, 5, generator=gen)
        x[:, 0] = 0.0
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if k == 0:
            A0, S0 = opt.state[model[0].weight]["A"], opt.state[model[0].weight]["S"]
            A2 = opt.state[model[2].weight]["A"]
            assert A0[0].abs().max() == 0 and S0[1].abs().max() == 0 and A2[1].abs().max() == 0
            assert torch.linalg.eigvalsh(A0.double()).min() < 1e-12
        for layer in (model[0], model[2]):
            w, b = layer.sample_weight()
            assert torch.isfinite(w).all() and torch.isfinite(b).all()
            assert torch.isfinite(layer.weight_std()).all() and torch.isfinite(layer.bias_std()).all()
            assert torch.isfinite(layer.weight).all() and torch.isfinite(layer.bias).all()
            layer.last_noise = None


@pytest.mark.parametrize("t_stats,t_inv", [(10, 100), (3, 7), (1, 1), (4, 1)])
def test_conv_statistics_cycle_through_every_location_grid(t_stats, t_inv):
    """Any s^2 consecutive statistics steps (warm-up and after) use every grid of conv locations once."""
    steps = [k for k in range(1, 400) if noisy_kfac.takes_stats(k, t_stats, t_inv)]
    for s in (2, 3):
        grids = [noisy_kfac.stats_grid(k, t_stats, t_inv, s) for k in steps]
        assert all(g[0] == s for g in grids)
        assert [g[1] for g in grids] == [i % (s * s) for i in range(len(steps))]
    assert noisy_kfac.stats_grid(5, t_stats, t_inv, 1) is None


def test_noisy_kfac_loads_a_state_dict_saved_before_conv_stats_stride_existed():
    """An older checkpoint's param groups lack the option: loading gives them the default, and stepping works."""
    model = tanh_mlp("MVG")
    x, y = tiny_data()
    opt = NoisyKFAC(model)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["conv_stats_stride"]
    fresh = NoisyKFAC(model)
    fresh.load_state_dict(saved)
    default = inspect.signature(NoisyKFAC).parameters["conv_stats_stride"].default
    assert all(g["conv_stats_stride"] == default for g in fresh.param_groups)
    fresh.zero_grad()
    F.cross_entropy(model(x), y).backward()
    fresh.step()
