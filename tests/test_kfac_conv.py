"""Noisy K-FAC on convolutions and bias-free layers, with one or several MC samples per step,
against a hand-written float64 step (docs/MATH.md, "Noisy K-FAC").

The reference never uses the library's matrix view of a layer: a convolution's matrix is
``weight.reshape(out, C_in kh kw)`` (row-major, the order of ``reference.conv_patches``) with the
bias as the last column; the forward pass at a sampled matrix reshapes it back the same way. The
gradient ``G``, the factors ``A = mean_i sum_t a_t a_t^T`` and ``S = mean_i (1/T) sum_t ds_t ds_t^T``
come from a loop over single examples and explicit patches; inverses from ``torch.linalg.inv`` and
``torch.kron``. With several samples per step, ``G`` and the factors are the means over the samples
and the prior term is taken at the mean of the samples' weights (``M + mean_s noise_s``).

The net: conv (3x2 kernel, stride (2, 1), padding (1, 0), dilation (1, 2), bias) - tanh - conv (2x2,
padding 1, dilation (2, 1), no bias) - tanh - flatten - linear (no bias) - tanh - linear (bias).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference import KFACPosteriorReference, conv_patches
from torch import nn

from models import BayesianConv2d, BayesianLinear
from optimizers import NoisyKFAC

RTOL, ATOL = 1e-8, 1e-12


def close(got, ref, msg=""):
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL, msg=msg)


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    conv1 = BayesianConv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=True, posterior="MVG")
    conv2 = BayesianConv2d(3, 2, 2, padding=1, dilation=(2, 1), bias=False, posterior="MVG")
    net = nn.Sequential(conv1, nn.Tanh(), conv2, nn.Tanh(), nn.Flatten(),  # 2x7x6 -> 3x4x4 -> 2x4x5
                        BayesianLinear(40, 4, bias=False, posterior="MVG"), nn.Tanh(),
                        BayesianLinear(4, 3, bias=True, posterior="MVG"))
    return net.double()


def data(b: int = 5):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, 2, 7, 6, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0][:b])


def layers_of(net: nn.Sequential) -> list[nn.Module]:
    return [net[0], net[2], net[5], net[7]]


def matrix(layer: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The reference's matrix view: row-major kernel (out, C_in kh kw), bias as the last column."""
    w = w.reshape(w.shape[0], -1)
    return torch.cat([w, b[:, None]], 1) if layer.bias is not None else w


def ref_forward(layers: list[nn.Module], Ws: list[torch.Tensor], x: torch.Tensor):
    """The net at weight matrices ``Ws``: logits, the layers' inputs and their pre-activations."""
    inputs, pre = [], []
    h = x
    for k, (layer, W) in enumerate(zip(layers, Ws)):
        bias = W[:, -1] if layer.bias is not None else None
        w = W[:, :-1] if layer.bias is not None else W
        inputs.append(h.detach())
        if isinstance(layer, nn.Conv2d):
            s = F.conv2d(h, w.reshape(layer.weight.shape), bias, layer.stride, layer.padding, layer.dilation)
        else:
            s = F.linear(h, w, bias)
        pre.append(s)
        h = torch.tanh(s) if k < len(layers) - 1 else s
        if k == 1:
            h = h.flatten(1)
    return h, inputs, pre


def batch_statistics(layers, Ws, x, y, grid=(1, 0)):
    """Per layer: ``G`` (gradient of the mean loss as a matrix), ``A``, ``S`` of this batch, by loops.

    ``grid = (s, j)``: a convolution's ``A`` sums only the output locations (r, c) with r = j // s and
    c = j % s (mod s), times s^2 (docs/MATH.md, "Noisy K-FAC", conv location grids)."""
    s, j = grid
    b = x.shape[0]
    Ws = [W.detach().requires_grad_() for W in Ws]  # so that the pre-activations have a graph
    G = [torch.zeros_like(W) for W in Ws]
    A = [torch.zeros(W.shape[1], W.shape[1]) for W in Ws]
    S = [torch.zeros(W.shape[0], W.shape[0]) for W in Ws]
    for i in range(b):
        logits, inputs, pre = ref_forward(layers, Ws, x[i:i + 1])
        ds_all = torch.autograd.grad(F.cross_entropy(logits, y[i:i + 1]), pre)
        for ell, (layer, inp, ds) in enumerate(zip(layers, inputs, ds_all)):
            if isinstance(layer, nn.Conv2d):
                a_t = [torch.tensor(p) for p in conv_patches(inp[0], layer)]
                ds_t = [ds[0, :, r, c] for r in range(ds.shape[2]) for c in range(ds.shape[3])]
                in_grid = [r % s == j // s and c % s == j % s for r in range(ds.shape[2]) for c in range(ds.shape[3])]
                weight = s * s
            else:
                a_t, ds_t, in_grid, weight = [inp[0]], [ds[0]], [True], 1
            assert len(a_t) == len(ds_t)
            if layer.bias is not None:
                a_t = [torch.cat([a, torch.ones(1)]) for a in a_t]
            T = len(a_t)
            for a, d, used in zip(a_t, ds_t, in_grid):
                G[ell] += torch.outer(d, a) / b
                if used:
                    A[ell] += weight * torch.outer(a, a) / b
                S[ell] += torch.outer(d, d) / (b * T)
    return G, A, S


class RefNoisyKFAC(KFACPosteriorReference):
    """MATH.md's Noisy K-FAC step (momentum, KL clip, t_stats, t_inv, both dampings), several samples."""

    def __init__(self, layers, lr, momentum, num_data, kl_weight, prior_var, damping, stat_decay, t_stats, t_inv,
                 damping_mode, kl_clip, init_precision, conv_stats_stride):
        self.layers = layers
        self.M = [matrix(m, m.weight.detach(), m.bias.detach() if m.bias is not None else None).clone()
                  for m in layers]
        self.lr, self.mom, self.damping, self.beta = lr, momentum, damping, stat_decay
        self.t_stats, self.t_inv, self.mode, self.kl_clip = t_stats, t_inv, damping_mode, kl_clip
        self.c2 = kl_weight / num_data
        self.gin = kl_weight / (num_data * prior_var)
        self.init_std = init_precision ** -0.5
        self.A = [None] * len(layers)
        self.S = [None] * len(layers)
        self.dec = None
        self.buf = [torch.zeros_like(m) for m in self.M]
        self.k = 0
        self.stride, self.stats_taken = conv_stats_stride, 0
        self.nus = []

    def step(self, x, y, noises):
        """``noises``: per MC sample, the list of per-layer noise matrices of that forward pass."""
        self.k += 1
        # warm-up (MATH.md): statistics every step while k <= t_inv, decompositions at k - 1 = 0, 1, 2, 4, ...
        use_stats = self.k <= self.t_inv or (self.k - 1) % self.t_stats == 0
        grid = (self.stride, self.stats_taken % self.stride**2)  # the grids in turn, one per statistics step
        self.stats_taken += use_stats
        per_sample = [batch_statistics(self.layers, [m + n for m, n in zip(self.M, noise)], x, y, grid)
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


COMMON = dict(lr=0.1, num_data=20, kl_weight=0.5, prior_var=2.0, stat_decay=0.8, init_precision=10.0)
#: conv_stats_stride 1: A from every conv location; 2: from one of the 4 location grids per statistics step
CONFIGS = {
    "factored": dict(damping_mode="factored", damping=0.01, momentum=0.9, kl_clip=None, t_stats=1, t_inv=1,
                     conv_stats_stride=1),
    "factored_clip_tstats2_tinv2": dict(damping_mode="factored", damping=0.05, momentum=0.5, kl_clip=1e-3,
                                        t_stats=2, t_inv=2, conv_stats_stride=2),
    "factored_tstats3_tinv3": dict(damping_mode="factored", damping=0.05, momentum=0.9, kl_clip=None,
                                   t_stats=3, t_inv=3, conv_stats_stride=2),
    "exact": dict(damping_mode="exact", damping=0.01, momentum=0.9, kl_clip=None, t_stats=1, t_inv=1,
                  conv_stats_stride=2),
    "exact_clip_tinv2": dict(damping_mode="exact", damping=0.0, momentum=0.0, kl_clip=1e-3, t_stats=1, t_inv=2,
                             conv_stats_stride=1),
}
#: MC samples (forward/backward passes) before each of the steps
SAMPLES = {"one_sample": (1, 1, 1, 1, 1, 1), "several_samples": (2, 1, 3, 1, 2, 1)}


def library_matrix(layer) -> torch.Tensor:
    return matrix(layer, layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None)


def std_matrix(layer) -> torch.Tensor:
    return matrix(layer, layer.weight_std(), layer.bias_std())


def expected_noise(opt, ref, ell, layer, eps):
    """The noise the reference expects for standard normal ``eps`` (exact damping: the library's
    eigenbasis, after checking that it is one of the reference's factors)."""
    expected = ref.noise(ell, eps)
    if expected is not None:
        return expected
    st = opt.state[layer.weight]
    A, S = ref.dec[ell]
    for Q, d, Fm in ((st["QA"], st["dA"], A), (st["QS"], st["dS"], S)):
        close(Q.T @ Q, torch.eye(Q.shape[0]))
        torch.testing.assert_close(Q @ torch.diag(d) @ Q.T, Fm, rtol=1e-8, atol=1e-10)
    mid = eps / (st["dS"][:, None] * st["dA"][None] + ref.gin).sqrt()
    return math.sqrt(ref.c2) * st["QS"] @ mid @ st["QA"].T


@pytest.mark.parametrize("samples", list(SAMPLES))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_noisy_kfac_conv_and_bias_free_layers_match_reference(float64, config, samples):
    kw = {**COMMON, **CONFIGS[config]}
    net = make_net()
    layers = layers_of(net)
    x, y = data()
    opt = NoisyKFAC(net, **kw)
    ref = RefNoisyKFAC(layers, **kw)
    for ell, layer in enumerate(layers):
        close(std_matrix(layer), ref.std(ell), f"initial std {ell}")
    seed = 300
    for k, n_samples in enumerate(SAMPLES[samples], 1):
        opt.zero_grad()
        noises = []
        for _ in range(n_samples):
            seed += 1
            torch.manual_seed(seed)
            F.cross_entropy(net(x), y).backward()
            noise = [matrix(m, *m.last_noise) for m in layers]
            torch.manual_seed(seed)  # the layers draw E ~ N(0, I) of their matrix shape, in forward order
            eps = [torch.randn(m.shape) for m in ref.M]
            for ell, layer in enumerate(layers):
                close(noise[ell], expected_noise(opt, ref, ell, layer, eps[ell]), f"noise {ell} step {k}")
            noises.append(noise)
        opt.step()
        ref.step(x, y, noises)
        for ell, layer in enumerate(layers):
            st = opt.state[layer.weight]
            close(library_matrix(layer), ref.M[ell], f"mean {ell} step {k}")
            close(st["A"], ref.A[ell], f"A {ell} step {k}")
            close(st["S"], ref.S[ell], f"S {ell} step {k}")
            close(std_matrix(layer), ref.std(ell), f"std {ell} step {k}")
    if kw["kl_clip"] is not None:
        assert min(ref.nus) < 1.0, "the KL clip never engaged: the test would not see it"
    # the steps moved every layer by more than the tolerance (the comparison above means something)
    init = [library_matrix(m) for m in layers_of(make_net())]
    assert all((m - i).abs().max() > 1e-4 for m, i in zip(ref.M, init))

