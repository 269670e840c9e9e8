"""Block-tridiagonal Noisy K-FAC against dense float64 references (docs/MATH.md, "Block-tridiagonal Noisy K-FAC").

The references are written from MATH.md's definitions only: per-example pre-activation gradients by a
loop over single examples, factors as sums of outer products, ``F-hat`` as the dense matrix that agrees
with the tridiagonal Kronecker blocks and whose inverse is block-tridiagonal (the Gaussian-chain completion
``F_{i,j} = F_{i,i+1} F_{i+1,i+1}^-1 F_{i+1,j}``, and the test checks that it has both properties), and
inverses with ``torch.linalg.inv`` on the assembled matrix. Weights are vectorised column by column
(``vec(W)``, W = [weight | bias]), so ``kron(A, S)`` is the block of ``A (x) S``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from nets import CHAIN_KW, chain_data, chain_factors, chain_net, linears, trained_chain
from reference import dense_fhat, unvec, vec
from torch import nn

import models
from models import BayesianLinear
from models.joint_posterior import attach_chains, find_chains
from optimizers import NoisyKFAC, curvature, noisy_kfac


def as_matrix(w, b):
    return torch.cat([w, b[..., None]], -1)


# ============================================================================ dense references
def per_example(Ws: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """For each example: the homogeneous inputs a_{i-1} and own-loss pre-activation gradients g_i of every layer."""
    out = []
    for n in range(x.shape[0]):
        h = x[n]
        inputs, pre = [], []
        for i, W in enumerate(Ws):
            a = torch.cat([h, h.new_ones(1)])
            s = W @ a
            s.retain_grad()
            inputs.append(a.detach())
            pre.append(s)
            h = torch.tanh(s) if i < len(Ws) - 1 else s
        loss = F.cross_entropy(h[None], y[n:n + 1])
        grads = torch.autograd.grad(loss, pre)
        out.append((inputs, [g.detach() for g in grads]))
    return out


def batch_factors(Ws, x, y):
    """Means over examples of a_i a_j^T and g_i g_j^T for |i - j| <= 1, and the mean weight gradients."""
    per = per_example([W.detach().requires_grad_(True) for W in Ws], x, y)
    L, b = len(Ws), len(per)
    A = [sum(torch.outer(p[0][i], p[0][i]) for p in per) / b for i in range(L)]
    S = [sum(torch.outer(p[1][i], p[1][i]) for p in per) / b for i in range(L)]
    Ac = [sum(torch.outer(p[0][i], p[0][i + 1]) for p in per) / b for i in range(L - 1)]
    Gc = [sum(torch.outer(p[1][i], p[1][i + 1]) for p in per) / b for i in range(L - 1)]
    grad = [sum(torch.outer(p[1][i], p[0][i]) for p in per) / b for i in range(L)]
    return A, S, Ac, Gc, grad


# ============================================================================ tests
def test_chains_found_by_shape_and_elementwise_rule():
    mlp = models.build_model("mlp", "MVG", 1, 28, 10, hidden=(100, 100))
    assert [[n for n, _ in c] for c in find_chains(mlp)] == [["fc1", "fc2", "fc3"]]
    lenet = models.build_model("lenet5", "MVG", 3, 32, 10)
    assert [[n for n, _ in c] for c in find_chains(lenet)] == [["fc1", "fc2", "fc3"]]
    assert find_chains(models.build_model("covnet", "MVG", 1, 28, 10)) == []
    lin = [BayesianLinear(4, 3, posterior="MVG"), BayesianLinear(3, 3, posterior="MVG"),
           BayesianLinear(2, 2, posterior="MVG"), BayesianLinear(2, 2, posterior="MVG")]
    broken = nn.Sequential(lin[0], nn.BatchNorm1d(3), lin[1], nn.ReLU(), lin[2], nn.Dropout(), lin[3])
    assert find_chains(broken) == []  # a norm layer, a shape mismatch, a non-elementwise module
    ffg = nn.Sequential(BayesianLinear(4, 3, posterior="FFG"), BayesianLinear(3, 2, posterior="FFG"))
    assert find_chains(ffg) == []


def test_cross_factors_match_per_example_reference(float64):
    model = chain_net()
    layers = linears(model)
    opt = NoisyKFAC(model, structure="block_tridiagonal", **CHAIN_KW)
    x, y = chain_data()
    opt.zero_grad()
    torch.manual_seed(5)
    refs = []
    for _ in range(2):  # two MC samples: the statistics are averaged over them
        F.cross_entropy(model(x), y).backward()
        noises = [as_matrix(*m.last_noise) for m in layers]
        Ws = [as_matrix(m.weight.detach(), m.bias.detach()) + n for m, n in zip(layers, noises)]
        refs.append(batch_factors(Ws, x, y))
    acc = [[(r0 + r1) / 2 for r0, r1 in zip(a, b)] for a, b in zip(*refs)]
    opt.step()
    got = opt.cross_factors()
    assert list(got) == [("0", "2"), ("2", "4")]
    for i, key in enumerate(got):
        torch.testing.assert_close(got[key][0], acc[2][i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[key][1], acc[3][i], rtol=1e-10, atol=1e-12)
    for i, m in enumerate(layers):
        torch.testing.assert_close(opt.state[m.weight]["A"], acc[0][i], rtol=1e-10, atol=1e-12)


def _implied_covariance(model):
    """The sampler's covariance: its noise is linear in the standard normals, so map a basis through it."""
    chain = attach_chains(model)[0]
    shapes = [m.matrix_shape for m in chain.layers]
    total = sum(o * i for o, i in shapes)
    eye = torch.eye(total)
    eps, off = [], 0
    for o, i in shapes:
        eps.append(unvec(eye[:, off:off + o * i], o, i))  # the basis vectors, in vec order
        off += o * i
    J = torch.cat([vec(w) for w in chain.noise_from(eps)], 1).T  # columns: noise of each basis vector
    return J @ J.T


def test_posterior_covariance_and_preconditioner_equal_dense_fhat_inverse(float64):
    model, opt = trained_chain()
    layers = linears(model)
    assert opt.guard_count() == 0
    A, S, Ac, Gc = chain_factors(opt, layers)
    c2 = CHAIN_KW["kl_weight"] / CHAIN_KW["num_data"]
    gamma_in = CHAIN_KW["kl_weight"] / (CHAIN_KW["num_data"] * CHAIN_KW["prior_var"])
    Fh, offs = dense_fhat(A, S, Ac, Gc, gamma_in)
    cov_ref = c2 * torch.linalg.inv(Fh)
    cov = _implied_covariance(model)
    torch.testing.assert_close(cov, cov_ref, rtol=1e-7, atol=1e-9 * cov_ref.abs().max())
    # the coupling is real: adjacent layers correlate, so the test would see independent layers
    std = cov_ref.diagonal().sqrt()
    corr = cov_ref / std[:, None] / std[None]
    assert corr[offs[0]:offs[1], offs[1]:offs[2]].abs().max() > 0.05
    # marginal std of every entry (what the dashboard shows) is the dense diagonal's square root
    for i, m in enumerate(layers):
        o, n_in = m.matrix_shape
        ref = unvec(cov_ref.diagonal()[offs[i]:offs[i + 1]].sqrt(), o, n_in)
        torch.testing.assert_close(as_matrix(m.weight_std(), m.bias_std()), ref, rtol=1e-7, atol=0)

    # preconditioner: F-hat of the gamma_in + gamma_ex damped factors, inverted densely
    P_ref = torch.linalg.inv(dense_fhat(A, S, Ac, Gc, gamma_in + CHAIN_KW["damping"])[0])
    from optimizers.block_tridiagonal import precondition_chain
    states = [opt.state[m.weight] for m in layers]
    total = Fh.shape[0]
    eye = torch.eye(total)
    Vs = [unvec(eye[:, offs[i]:offs[i + 1]], *m.matrix_shape) for i, m in enumerate(layers)]
    Ds = precondition_chain(Vs, [(s["S_inv"], s["A_inv"]) for s in states], states[:-1])
    P = torch.cat([vec(D) for D in Ds], 1).T
    torch.testing.assert_close(P, P_ref, rtol=1e-7, atol=1e-9 * P_ref.abs().max())


def test_200k_joint_samples_reproduce_the_covariance(float64):
    model, opt = trained_chain()
    layers = linears(model)
    A, S, Ac, Gc = chain_factors(opt, layers)
    gamma_in = CHAIN_KW["kl_weight"] / (CHAIN_KW["num_data"] * CHAIN_KW["prior_var"])
    Fh, offs = dense_fhat(A, S, Ac, Gc, gamma_in)
    cov_ref = CHAIN_KW["kl_weight"] / CHAIN_KW["num_data"] * torch.linalg.inv(Fh)
    torch.manual_seed(7)
    n = 200_000
    draws = attach_chains(model)[0].draw((n,))
    X = torch.cat([vec(as_matrix(w, b)) for w, b in draws], 1)
    cov = X.T @ X / n
    std = cov_ref.diagonal().sqrt()
    err = (cov - cov_ref) / std[:, None] / std[None]  # on the correlation scale: sd ~ 1/sqrt(n) = 0.0022
    assert err.abs().max() < 0.015, float(err.abs().max())
    # non-adjacent layers (0 and 2) uncorrelated, adjacent ones correlated as computed
    emp_corr = cov / cov.diagonal().sqrt()[:, None] / cov.diagonal().sqrt()[None]
    assert emp_corr[offs[0]:offs[1], offs[2]:offs[3]].abs().max() < 0.015
    ref_adj = (cov_ref / std[:, None] / std[None])[offs[0]:offs[1], offs[1]:offs[2]]
    assert ref_adj.abs().max() > 0.05
    torch.testing.assert_close(emp_corr[offs[0]:offs[1], offs[1]:offs[2]], ref_adj, rtol=0, atol=0.015)


def test_forward_and_sample_weights_use_one_joint_draw(float64):
    model, opt = trained_chain()
    layers = linears(model)
    x, _ = chain_data()
    torch.manual_seed(11)
    model(x)
    used = [as_matrix(*m.last_noise) for m in layers]
    torch.manual_seed(11)
    sample = opt.sample_weights()
    assert list(sample) == ["0", "2", "4"]
    for m, name, noise in zip(layers, ("0", "2", "4"), used):
        w, b = sample[name]
        torch.testing.assert_close(as_matrix(w, b) - as_matrix(m.weight.detach(), m.bias.detach()), noise,
                                   rtol=1e-12, atol=1e-14)
    assert all(m.joint_noise is None for m in layers)  # each part used exactly once
    model.eval()
    assert torch.equal(model(x), model(x))  # eval mode: the means, no joint draw left behind


def test_zero_cross_factors_is_exactly_block_diagonal(float64, monkeypatch):
    def zero_cross(module, a, g, nxt, a_next, g_next, scale):
        A, G = real(module, a, g, nxt, a_next, g_next, scale)
        return torch.zeros_like(A), torch.zeros_like(G)

    real = curvature.kfac_cross_factors
    monkeypatch.setattr(curvature, "kfac_cross_factors", zero_cross)
    # bit-exact comparison: both structures keep the sampler's Cholesky factors (block-diagonal layers
    # would otherwise apply small ones as explicit inverses, equal only to rounding)
    monkeypatch.setattr(noisy_kfac, "DENSE_ROOT_MAX", 0)
    x, y = chain_data()
    runs = {}
    for structure in ("block_diagonal", "block_tridiagonal"):
        model = chain_net()
        opt = NoisyKFAC(model, structure=structure, **{**CHAIN_KW, "t_inv": 2, "kl_clip": 1e-2})
        trace = []
        for k in range(5):
            torch.manual_seed(300 + k)
            opt.zero_grad()
            for _ in range(2):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            trace.append([t.clone() for m in linears(model)
                          for t in (*m.last_noise, m.weight, m.bias, m.weight_std(), m.bias_std())])
        runs[structure] = trace
    for k, (a, b) in enumerate(zip(runs["block_diagonal"], runs["block_tridiagonal"])):
        for j, (ta, tb) in enumerate(zip(a, b)):
            assert torch.equal(ta, tb), f"step {k} tensor {j}"


class RefTridiagonal:
    """A hand-written block-tridiagonal Noisy K-FAC step (dense F-hat), MATH.md with momentum and KL clip."""

    def __init__(self, layers, lr, momentum, num_data, kl_weight, prior_var, damping, stat_decay, kl_clip, **_):
        self.M = [as_matrix(m.weight.detach(), m.bias.detach()).clone() for m in layers]
        self.shapes = [m.matrix_shape for m in layers]
        self.lr, self.mom, self.beta, self.kl_clip = lr, momentum, stat_decay, kl_clip
        self.gin = kl_weight / (num_data * prior_var)
        self.gamma = self.gin + damping
        self.stats = None
        self.buf = [torch.zeros_like(m) for m in self.M]

    def step(self, x, y, noise):
        W = [m + n for m, n in zip(self.M, noise)]
        A, S, Ac, Gc, grad = batch_factors(W, x, y)
        new = [A, S, Ac, Gc]
        if self.stats is None:
            self.stats = new
        else:
            self.stats = [[self.beta * o + (1 - self.beta) * b for o, b in zip(old, bat)]
                          for old, bat in zip(self.stats, new)]
        Fh, offs = dense_fhat(*self.stats, self.gamma)
        Vs = [g + self.gin * w for g, w in zip(grad, W)]
        v = torch.cat([vec(V) for V in Vs])
        d = torch.linalg.solve(Fh, v)
        Ds = [unvec(d[offs[i]:offs[i + 1]], *s) for i, s in enumerate(self.shapes)]
        nu = 1.0
        if self.kl_clip is not None:
            nu = min(1.0, math.sqrt(self.kl_clip / (self.lr ** 2 * float(d @ v))))
        for i, D in enumerate(Ds):
            self.buf[i] = self.mom * self.buf[i] + nu * D
            self.M[i] = self.M[i] - self.lr * self.buf[i]
        return nu


@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_steps_match_hand_written_reference(float64, kl_clip):
    kw = {**CHAIN_KW, "kl_clip": kl_clip}
    model = chain_net()
    layers = linears(model)
    opt = NoisyKFAC(model, structure="block_tridiagonal", **kw)
    ref = RefTridiagonal(layers, **kw)
    x, y = chain_data()
    nus = []
    for k in range(3):
        torch.manual_seed(400 + k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        noise = [as_matrix(*m.last_noise) for m in layers]
        opt.step()
        nus.append(ref.step(x, y, noise))
        for i, m in enumerate(layers):
            torch.testing.assert_close(as_matrix(m.weight.detach(), m.bias.detach()), ref.M[i], rtol=1e-8, atol=1e-11,
                                       msg=f"mean {i} step {k}")
            torch.testing.assert_close(opt.state[m.weight]["momentum_buffer"], ref.buf[i], rtol=1e-8, atol=1e-11)
    assert opt.guard_count() == 0
    if kl_clip is not None:
        assert min(nus) < 1.0, "the KL clip never engaged"


def test_guard_floors_an_indefinite_chain_and_counts_it(float64):
    model, opt = trained_chain(steps=1)
    for st in (opt.state[m.weight] for m in linears(model)[:-1]):
        st["A_cross"].mul_(50.0)
        st["G_cross"].mul_(50.0)
    x, y = chain_data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.guard_count() > 0
    for m in linears(model):
        assert torch.isfinite(m.weight).all() and torch.isfinite(m.weight_std()).all()


def _guarded_chain(model: nn.Module) -> NoisyKFAC:
    """Two steps of ``model`` (a chain net), the second with cross factors large enough to be floored."""
    opt = NoisyKFAC(model, structure="block_tridiagonal", **CHAIN_KW)
    x, y = chain_data()
    x = x.to(model[0].weight)
    for k in range(2):
        if k:
            for st in (opt.state[m.weight] for m in linears(model)[:-1]):
                st["A_cross"].mul_(50.0)
                st["G_cross"].mul_(50.0)
        opt.zero_grad()
        F.cross_entropy(model(x), y.to(x.device)).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_guard_count_stays_an_int64_cpu_counter_through_load_state_dict(device):
    """``Optimizer.load_state_dict`` casts state to the parameters' dtype and device; the counter must not follow."""
    opt = _guarded_chain(chain_net().float().to(device))
    count = opt.guard_count()
    assert count > 0
    saved = opt.state_dict()
    model_b = chain_net(seed=1).float().to(device)
    opt_b = NoisyKFAC(model_b, structure="block_tridiagonal", **CHAIN_KW)
    opt_b.load_state_dict(saved)
    counters = [opt_b.state[m.weight]["guard_count"] for m in linears(model_b)[:-1]]
    assert all((c.dtype, c.device.type) == (torch.int64, "cpu") for c in counters)
    assert opt_b.guard_count() == count
    assert all(s["guard_count"].dtype == torch.int64 for s in saved["state"].values() if "guard_count" in s)


def test_block_tridiagonal_needs_factored_damping():
    with pytest.raises(ValueError, match="factored"):
        NoisyKFAC(chain_net(), structure="block_tridiagonal", damping_mode="exact")
    with pytest.raises(ValueError, match="rank=None"):
        NoisyKFAC(chain_net(), structure="block_tridiagonal", rank=2)
    with pytest.raises(ValueError, match="structure"):
        NoisyKFAC(chain_net(), structure="dense")


# ============================================================================ command line
@pytest.mark.parametrize("argv, expected", [
    (("--model", "FFG", "--kfac_structure", "block_tridiagonal"),
     "error: --kfac_structure is not an option of --optimizer noisy_adam; drop --kfac_structure, or use "
     "--optimizer noisy_kfac (--model MVG)"),
    (("--model", "MVG", "--kfac_structure", "block_tridiagonal", "--damping_mode", "exact"),
     "error: --kfac_structure block_tridiagonal needs --damping_mode factored and no --kfac_rank "
     "(--optimizer noisy_kfac)"),
    (("--model", "MVG", "--kfac_structure", "block_tridiagonal", "--kfac_rank", "5"),
     "error: --kfac_structure block_tridiagonal needs --damping_mode factored and no --kfac_rank "
     "(--optimizer noisy_kfac)"),
])
def test_bad_structure_flags_are_one_error_line(argv, expected, capsys):
    from option_parser import TrainOptions
    with pytest.raises(SystemExit) as e:
        TrainOptions().parse([*argv, "--device", "cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == expected


def test_a_chain_layer_without_gradient_falls_back_to_block_diagonal(float64):
    model, opt = trained_chain()
    layers = linears(model)
    x, y = chain_data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    layers[0].weight.grad = layers[0].bias.grad = None  # e.g. a frozen first layer
    before = layers[0].weight.detach().clone()
    gin = CHAIN_KW["kl_weight"] / (CHAIN_KW["num_data"] * CHAIN_KW["prior_var"])
    Vs = [as_matrix(m.weight.grad, m.bias.grad) + gin * (as_matrix(m.weight.detach(), m.bias.detach())
                                                         + as_matrix(*m.last_noise)) for m in layers[1:]]
    bufs = [opt.state[m.weight]["momentum_buffer"].clone() for m in layers[1:]]
    opt.step()
    assert torch.equal(layers[0].weight, before)
    for m, V, buf in zip(layers[1:], Vs, bufs):  # each remaining layer: its own block-diagonal step
        st = opt.state[m.weight]
        torch.testing.assert_close(st["momentum_buffer"], CHAIN_KW["momentum"] * buf + st["S_inv"] @ V @ st["A_inv"])
