"""Normalisation layers, residual graphs and shared layers under the curvature hooks and the three optimizers.

Per-example squares are checked against the float64 loop of ``tests/reference.py`` (one forward and
backward per example); Noisy K-FAC's diagonal step for norm layers against a step written out here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_stats_close, assert_sum_grad_squared_matches_loop
from reference import naive_sum_grad_squared
from torch import nn

import models
import optimizers
from models import BayesianGroupNorm, BayesianLayerNorm, BayesianLinear
from optimizers import VOGN, NoisyAdam, NoisyKFAC, curvature_rules


def randomise_norms(model: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that every term of the rule matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
                m.weight.normal_()
                if m.bias is not None:
                    m.bias.normal_()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def norm_net() -> nn.Module:
    """Conv -> BatchNorm2d -> GroupNorm -> Linear -> BatchNorm1d -> LayerNorm -> Linear."""
    torch.manual_seed(0)
    return randomise_norms(nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3),
    ))


# ------------------------------------------------------------------ per-example squares vs a loop
@pytest.mark.parametrize("bayesian", [False, True], ids=["plain", "bayesian"])
def test_sum_grad_squared_norm_layers_eval(float64, bayesian):
    """BatchNorm in eval mode (examples independent), GroupNorm, LayerNorm: exact per-example squares."""
    model = norm_net()
    if bayesian:
        model = models.bayesianize(model, "FFG")
        for _, layer in models.bayesian_layers(model):  # ignored in eval mode
            layer.set_ffg_posterior(torch.full_like(layer.weight, 0.3), torch.full_like(layer.bias, 0.3))
        assert isinstance(model[1], models.BayesianBatchNorm2d) and isinstance(model[8], BayesianLayerNorm)
    model.eval()
    torch.manual_seed(1)
    x, y = torch.randn(5, 2, 5, 5), torch.randint(0, 3, (5,))
    assert_sum_grad_squared_matches_loop(model, x, y)


def test_sum_grad_squared_layernorm_sequence_no_bias(float64):
    """LayerNorm over the last two dims of a (B, T, 3, 4) input, without bias: sums over T per example."""
    torch.manual_seed(2)
    model = randomise_norms(nn.Sequential(nn.LayerNorm((3, 4), bias=False), nn.Flatten(), nn.Linear(2 * 12, 3)))
    x, y = torch.randn(4, 2, 3, 4), torch.randint(0, 3, (4,))
    got = optimizers.sum_grad_squared(model, x, y)
    assert "0.bias" not in got and got["0.weight"].shape == (3, 4)
    assert_stats_close(got, naive_sum_grad_squared(model, x, y))


def test_batchnorm_train_mode_holds_batch_statistics_constant(float64):
    """Training mode: the rule equals per-example gradients with the batch's mean/variance frozen.

    Reference: the same net in eval mode with running statistics set to the batch's (biased) statistics,
    which is BatchNorm with the statistics held constant, looped over examples.
    """
    torch.manual_seed(3)
    model = randomise_norms(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                          nn.Linear(3 * 3 * 3, 4)))
    x, y = torch.randn(6, 2, 5, 5), torch.randint(0, 4, (6,))
    got = optimizers.sum_grad_squared(model.train(), x, y)
    with torch.no_grad():
        h = model[0](x)
        model[1].running_mean.copy_(h.mean((0, 2, 3)))
        model[1].running_var.copy_(h.var((0, 2, 3), unbiased=False))
    ref = naive_sum_grad_squared(model.eval(), x, y)
    assert_stats_close({k: got[k] for k in ("1.weight", "1.bias", "4.weight", "4.bias")},
                       {k: ref[k] for k in ("1.weight", "1.bias", "4.weight", "4.bias")})


class _CloneBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm whose output is not the batch-norm node's (so the rule computes the batch statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clone()


def test_batchnorm_statistics_without_the_autograd_node(float64):
    """Training mode: where the output's node does not hold the batch statistics, they are computed: same squares."""
    def net(bn: type) -> nn.Module:
        torch.manual_seed(3)
        return randomise_norms(nn.Sequential(nn.Conv2d(2, 3, 3), bn(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)))

    torch.manual_seed(5)
    x, y = torch.randn(6, 2, 5, 5) * 2 + 1, torch.randint(0, 4, (6,))
    got = optimizers.sum_grad_squared(net(_CloneBatchNorm2d).train(), x, y)
    assert_stats_close(got, optimizers.sum_grad_squared(net(nn.BatchNorm2d).train(), x, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn_node", "native_node"])
def test_batchnorm_statistics_from_the_cuda_node(monkeypatch, cudnn):
    """On CUDA the batch's mean and 1/std are read from the forward's node (cuDNN's, or the native kernel's), not
    recomputed: the same squares as the float64 CPU rule; and the fallback gives them too."""
    def net(bn: type) -> nn.Module:
        torch.manual_seed(3)
        return randomise_norms(nn.Sequential(nn.Conv2d(2, 3, 3), bn(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)))

    torch.manual_seed(5)
    x, y = torch.randn(6, 2, 5, 5) * 2 + 1, torch.randint(0, 4, (6,))
    ref = optimizers.sum_grad_squared(net(nn.BatchNorm2d).double().train(), x.double(), y)
    xc, yc = x.float().cuda(), y.cuda()
    with torch.backends.cudnn.flags(enabled=cudnn):
        model = net(nn.BatchNorm2d).float().cuda().train()
        h = model[0](xc)
        out = model[1](h)
        node = out.grad_fn
        _, mean, invstd = curvature_rules.batch_norm_input(model[1], h, out)
        saved = (node._saved_result1.data_ptr(), node._saved_result2.data_ptr())
        assert (mean.data_ptr(), invstd.data_ptr()) == saved, type(node).__name__
        h64 = h.detach().double()
        torch.testing.assert_close(mean.double(), h64.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(invstd.double(), (h64.var((0, 2, 3), unbiased=False) + 1e-5).rsqrt(), rtol=1e-5,
                                   atol=0)

        def no_second_pass(*args, **kwargs):
            raise AssertionError("the batch statistics were recomputed instead of read from the node")

        with monkeypatch.context() as m:
            m.setattr(torch, "var_mean", no_second_pass)
            got = optimizers.sum_grad_squared(model, xc, yc)
        fallback = optimizers.sum_grad_squared(net(_CloneBatchNorm2d).float().cuda().train(), xc, yc)
    for stats in (got, fallback):
        assert list(stats) == list(ref)
        for name in ref:
            torch.testing.assert_close(stats[name].cpu().double(), ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_sum_grad_squared_residual_block(float64):
    """Hooks on a residual graph (skip + 1x1 projection, modules outside nn.Sequential) stay exact."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                          models.architectures.BasicBlock(nn.Conv2d, nn.BatchNorm2d, 4, 6, stride=2),
                          models.architectures.BasicBlock(nn.Conv2d, nn.BatchNorm2d, 6, 6),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    model = randomise_norms(model).eval()
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    got = optimizers.sum_grad_squared(model, x, y)
    assert "2.shortcut.conv.weight" in got and "3.conv2.weight" in got
    assert_stats_close(got, naive_sum_grad_squared(model, x, y))


@pytest.mark.parametrize("plain", [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4)],
                         ids=["bn1d", "bn2d", "ln", "gn"])
def test_bayesian_norm_layers_sample_and_match_plain(float64, plain):
    """Training mode: the output is the plain layer's at weight = mean + noise (noise ~ sigma); running
    statistics move as the plain layer's; eval mode: the plain layer's output."""
    torch.manual_seed(0)
    plain = randomise_norms(plain.double())
    layer = models.bayesian_norm(plain)
    x = torch.randn(6, 4, 3, 4) if not isinstance(plain, nn.BatchNorm1d) else torch.randn(6, 4)
    if isinstance(plain, nn.LayerNorm):
        x = x.transpose(1, -1)
    layer.set_ffg_posterior(torch.full_like(layer.weight, 0.5), torch.full_like(layer.bias, 0.5))
    out = layer.train()(x)
    wn, bn = layer.last_noise
    assert 0.2 < float(wn.std()) < 1.0  # the noise has the posterior's scale
    with torch.no_grad():
        plain.weight.add_(wn)
        plain.bias.add_(bn)
    torch.testing.assert_close(out, plain.train()(x))
    for name, buf in plain.named_buffers():
        torch.testing.assert_close(getattr(layer, name), buf, msg=name)
    with torch.no_grad():
        plain.weight.sub_(wn)
        plain.bias.sub_(bn)
    torch.testing.assert_close(layer.eval()(x), plain.eval()(x))


# ------------------------------------------------------------------------ errors: one line, named
def shared_net() -> nn.Module:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = BayesianLinear(3, 4)
            self.tied = BayesianLinear(4, 4)
            self.out = BayesianLinear(4, 2)

        def forward(self, x):
            return self.out(self.tied(torch.tanh(self.tied(self.inp(x)))))

    torch.manual_seed(0)
    return Shared()


def test_shared_layer_raises_one_line_naming_it():
    model = shared_net()
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match=r"layer 'tied' \(BayesianLinear\) is called more than once") as e:
        optimizers.sum_grad_squared(model, x, y)
    assert "\n" not in str(e.value)
    opt = NoisyAdam(model, num_data=5)
    with pytest.raises(ValueError, match="'tied'"):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="'tied'"):  # the check resets after the error: raised again
        model(x)
    del opt


def test_repeated_forwards_of_the_model_are_not_sharing():
    """Two MC samples (two forwards of the whole model before one step) are fine."""
    torch.manual_seed(0)
    model = models.build_model("resnet20", "FFG", 1, 8, 3)
    opt = VOGN(model, num_data=8)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    opt.zero_grad()
    losses = [F.cross_entropy(model(x), y) for _ in range(2)]
    sum(losses).backward()
    opt.step()
    with torch.no_grad():  # and a forward without autograd in between
        model(x)


@pytest.mark.parametrize(("posterior", "make"), [
    ("FFG", NoisyAdam), ("FFG", VOGN), ("MVG", NoisyKFAC),
    ("FFG", lambda m: optimizers.sum_grad_squared(m, torch.tensor([[1, 2]]), torch.tensor([0]))),
], ids=["noisy_adam", "vogn", "noisy_kfac", "sum_grad_squared"])
def test_embedding_raises_one_line_naming_it(posterior, make):
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(5, 3))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", BayesianLinear(6, 2, posterior=posterior))
    with pytest.raises(ValueError, match=r"layer 'emb' \(Embedding\) has parameters but no curvature rule") as e:
        make(model)
    assert "\n" not in str(e.value)


def test_gaussian_norm_posterior_needs_bayesian_norm_layers():
    model = nn.Sequential(BayesianLinear(3, 4), nn.LayerNorm(4), BayesianLinear(4, 2))
    NoisyAdam(model, norm_posterior="point")  # a plain LayerNorm is fine as a point estimate
    with pytest.raises(ValueError, match="layer '1' is a plain LayerNorm"):
        NoisyAdam(model, norm_posterior="gaussian")
    with pytest.raises(ValueError, match="norm_posterior must be one of"):
        VOGN(model, norm_posterior="laplace")


# ---------------------------------------------------------------- residual networks train
def fit(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("norm_posterior", ["point", "gaussian"])
@pytest.mark.parametrize("name", ["noisy_adam", "vogn", "noisy_kfac"])
def test_resnet20_trains(name, norm_posterior):
    """A few steps on one small batch: the training loss falls, everything stays finite."""
    torch.manual_seed(0)
    posterior = "MVG" if name == "noisy_kfac" else "FFG"
    model = models.build_model("resnet20", posterior, 1, 8, 3)
    kw = dict(num_data=100_000, init_precision=1e4, norm_posterior=norm_posterior)  # little noise: it must fit
    opt = {"noisy_adam": lambda: NoisyAdam(model, lr=1e-2, **kw), "vogn": lambda: VOGN(model, lr=1e-2, **kw),
           "noisy_kfac": lambda: NoisyKFAC(model, lr=3e-2, kl_clip=1e-2, **kw)}[name]()
    torch.manual_seed(1)
    y = torch.arange(16) % 3
    x = torch.randn(16, 1, 8, 8) + 2 * torch.randn(3, 1, 8, 8)[y]  # a learnable task
    losses = fit(model, opt, x, y, 25)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    bn = model.layer1[0].bn1
    assert (bn.weight_sigma > 0).all() if norm_posterior == "gaussian" else (bn.weight_sigma == 0).all()
    assert bn.num_batches_tracked == 25 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


@pytest.mark.parametrize("posterior", ["FFG", pytest.param("MVG", marks=pytest.mark.slow)])  # MVG: 4608-wide factors
def test_bayesianize_torchvision_resnet18(posterior):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain(x)
    model = models.bayesianize(plain, posterior).eval()
    kinds = {type(m) for m in model.modules() if any(True for _ in m.parameters(recurse=False))}
    assert kinds == {models.BayesianConv2d, models.BayesianBatchNorm2d, models.BayesianLinear}
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)  # means (and running statistics) copied
    opt = (NoisyKFAC(model, lr=1e-3, num_data=8, norm_posterior="gaussian") if posterior == "MVG"
           else VOGN(model, lr=1e-3, num_data=8, norm_posterior="gaussian"))
    model.train()
    before = model.fc.weight.detach().clone()
    # one step for MVG: it decomposes forty 4608-wide factors in float64 (about 15 s on two cores)
    fit(model, opt, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), 1 if posterior == "MVG" else 2)
    assert not torch.equal(model.fc.weight, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------- Noisy K-FAC's diagonal step, written out by hand
def norm_only_net(posterior: str = "gaussian") -> nn.Module:
    torch.manual_seed(5)
    return randomise_norms(nn.Sequential(BayesianLayerNorm(6), BayesianGroupNorm(2, 6)))


def reference_forward(x, params):
    """The net of ``norm_only_net`` as a function of its four affine tensors."""
    w1, b1, w2, b2 = params
    return F.group_norm(F.layer_norm(x, (6,), w1, b1, 1e-5), 2, w2, b2, 1e-5)


@pytest.mark.parametrize("norm_posterior", ["gaussian", "point"])
def test_noisy_kfac_norm_layers_match_hand_written_steps(float64, norm_posterior):
    """Two steps: f running average of per-example squares (f = s first), D = V / (f + gamma),
    trust region nu over the layers, momentum, sigma = sqrt(lambda/N) / sqrt(f + gamma_in)."""
    n, lam, eta, damping, beta, mom, lr, kl_clip = 50, 0.7, 2.0, 1e-3, 0.8, 0.9, 0.1, 1e-4
    model = norm_only_net()
    opt = NoisyKFAC(model, lr=lr, momentum=mom, num_data=n, kl_weight=lam, prior_var=eta, damping=damping,
                    stat_decay=beta, kl_clip=kl_clip, init_precision=400.0, norm_posterior=norm_posterior)
    layers = [model[0], model[1]]
    mu = [t.detach().clone() for m in layers for t in (m.weight, m.bias)]
    gamma_in = lam / (n * eta)
    sigma0 = 400.0 ** -0.5 if norm_posterior == "gaussian" else 0.0
    for m in layers:
        torch.testing.assert_close(m.weight_sigma, torch.full_like(m.weight, sigma0))
    f, buf = None, [torch.zeros(12), torch.zeros(12)]
    torch.manual_seed(6)
    for step in range(2):
        x, y = torch.randn(7, 6), torch.randint(0, 6, (7,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        noise = [t for m in layers for t in m.last_noise]
        if norm_posterior == "point":
            assert all(torch.equal(e, torch.zeros_like(e)) for e in noise)
        w = [m_ + e for m_, e in zip(mu, noise)]
        # per-example gradients at the sampled weights, one example at a time
        per = []
        for i in range(7):
            params = [t.clone().requires_grad_() for t in w]
            per.append(torch.autograd.grad(F.cross_entropy(reference_forward(x[i:i + 1], params), y[i:i + 1]),
                                           params))
        G = [sum(p[k] for p in per) / 7 for k in range(4)]
        s = [sum(p[k].square() for p in per) / 7 for k in range(4)]
        vec = lambda ts: [torch.cat([ts[0], ts[1]]), torch.cat([ts[2], ts[3]])]  # noqa: E731
        G, s, w_v = vec(G), vec(s), vec(w)
        f = s if f is None else [beta * a + (1 - beta) * b for a, b in zip(f, s)]
        V = [g + gamma_in * wv for g, wv in zip(G, w_v)]
        D = [v / (fl + gamma_in + damping) for v, fl in zip(V, f)]
        nu = min(1.0, (kl_clip / sum(lr ** 2 * float((d * v).sum()) for d, v in zip(D, V))) ** 0.5)
        assert nu < 1.0  # the trust region is active in this test
        buf = [mom * b + nu * d for b, d in zip(buf, D)]
        mu_v = [m_v - lr * b for m_v, b in zip(vec(mu), buf)]
        mu = [mu_v[0][:6], mu_v[0][6:], mu_v[1][:6], mu_v[1][6:]]
        opt.step()
        for k, (m, t) in enumerate([(layers[0], "weight"), (layers[0], "bias"), (layers[1], "weight"),
                                    (layers[1], "bias")]):
            torch.testing.assert_close(getattr(m, t), mu[k], msg=f"step {step} {t}")
        for m, fl in zip(layers, f):
            sigma = (lam / n) ** 0.5 / (fl + gamma_in).sqrt() if norm_posterior == "gaussian" else 0 * fl
            torch.testing.assert_close(m.weight_sigma, sigma[:6])
            torch.testing.assert_close(m.bias_sigma, sigma[6:])
