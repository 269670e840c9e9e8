"""Bayesian layers: sampling distribution (FFG and MVG), train/eval behaviour, gradients,
the seeds' architectures (the MC predictive: test_evaluation.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nets import mvg_mlp_after_one_step
from reference import factored_damping, kronecker_covariance
from torch import nn

import models
from models import BayesianConv2d, BayesianLayer, BayesianLinear
from models.kronecker import factored_decomposition
from optimizers import NoisyAdam, NoisyKFAC


def draw(layer: BayesianLayer, n: int, batch: int = 10_000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` independent ``layer.sample_weight()`` draws, vectorised with vmap (different noise each)."""
    ws, bs = [], []
    with torch.no_grad():
        for _ in range(n // batch):
            w, b = torch.vmap(lambda _: layer.sample_weight(), randomness="different")(torch.zeros(batch))
            ws.append(w)
            bs.append(b)
    layer.last_noise = None
    return torch.cat(ws), (torch.cat(bs) if bs[0] is not None else None)


def as_matrix(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """[weight.view(out, -1) | bias] for a batch of draws (n, out, ...)."""
    m = w.reshape(w.shape[0], w.shape[1], -1)
    return torch.cat([m, b[..., None]], dim=-1) if b is not None else m


def random_spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, n + 2, generator=gen)
    return x @ x.T / (n + 2) + 0.05 * torch.eye(n)


def assert_std_matches(layer: BayesianLayer, n: int = 20_000, rel: float = 0.03) -> None:
    w, b = draw(layer, n)
    torch.testing.assert_close(w.std(0), layer.weight_std(), rtol=rel, atol=0)
    if layer.bias is not None:
        torch.testing.assert_close(b.std(0), layer.bias_std(), rtol=rel, atol=0)
    torch.testing.assert_close(w.mean(0), layer.weight.detach(), rtol=0, atol=5 * layer.weight_std().max() / n**0.5)


def make_layer(kind: str, posterior: str) -> BayesianLayer:
    if kind == "linear":
        return BayesianLinear(4, 3, bias=True, posterior=posterior)
    return BayesianConv2d(2, 3, (3, 2), bias=True, posterior=posterior)


# ------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_ffg_sample_std(kind):
    torch.manual_seed(0)
    layer = make_layer(kind, "FFG")
    layer.set_ffg_posterior(0.1 + torch.rand_like(layer.weight), 0.1 + torch.rand_like(layer.bias))
    torch.testing.assert_close(layer.weight_std(), layer.weight_sigma)
    assert_std_matches(layer)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mvg_sample_std_from_random_cholesky_factors(kind):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    layer = make_layer(kind, "MVG")
    out, n_in = layer.matrix_shape
    A, S = random_spd(n_in, gen), random_spd(out, gen)
    dec = factored_decomposition(A, S, 0.1, 0.1)
    layer.set_mvg_posterior(dec["out_root"], dec["in_root"], 0.7)
    assert layer.factor_roots()[1].kind == "cholesky"
    assert not torch.allclose(layer.weight_std(), layer.weight_std().flatten()[0].expand_as(layer.weight))
    assert_std_matches(layer)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mvg_sample_std_generic_scales(kind):
    """Any U, V, R: Var[W_ij] = sum_kl U_ik^2 R_kl^2 V_lj^2 (the docstring's closed form)."""
    torch.manual_seed(2)
    layer = make_layer(kind, "MVG")
    out, n_in = layer.matrix_shape
    U, V, R = torch.randn(out, out), torch.randn(n_in, n_in) / n_in**0.5, 0.2 + torch.rand(out, n_in)
    layer.set_mvg_posterior(U, V, R)
    var = torch.einsum("ik,kl,lj->ij", U**2, R**2, V**2)
    ref = var.sqrt()
    torch.testing.assert_close(layer.weight_std(), ref[:, :-1].reshape_as(layer.weight))
    torch.testing.assert_close(layer.bias_std(), ref[:, -1])
    assert_std_matches(layer)


def kfac_model(posterior: str = "MVG") -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(BayesianConv2d(2, 3, 3, padding=1, posterior=posterior), nn.ReLU(), nn.Flatten(),
                         BayesianLinear(3 * 4 * 4, 3, posterior=posterior))


@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_mvg_sample_std_after_noisy_kfac_step(mode):
    model = kfac_model()
    opt = NoisyKFAC(model, lr=0.01, num_data=2000, kl_weight=1.0, prior_var=1.0, damping_mode=mode)
    x, y = torch.randn(64, 2, 4, 4), torch.randint(0, 3, (64,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for _, layer in models.bayesian_layers(model):
        std = layer.weight_std()
        assert std.max() / std.min() > 1.2  # a genuinely non-isotropic posterior
        assert_std_matches(layer)


# --------------------------------------------------------- MVG covariance vs the Kronecker form
@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_mvg_covariance_matches_kronecker_inverse(float64, mode):
    model, opt = mvg_mlp_after_one_step(mode)
    layer = model[0]
    A, S = opt.state[layer.weight]["A"].clone(), opt.state[layer.weight]["S"].clone()
    assert A.shape == (3, 3) and S.shape == (3, 3)
    c2, gamma_in = 0.5 / 10, 0.5 / (10 * 1.0)
    ref = kronecker_covariance(A, S, mode, c2, gamma_in)
    n = 200_000
    w, b = draw(layer, n, batch=50_000)
    noise = as_matrix(w, b) - torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
    vec = noise.transpose(1, 2).reshape(n, -1)  # column-major vec(W)
    cov = vec.T @ vec / n
    err = (cov - ref).abs().max()
    assert err < 0.05 * ref.abs().max(), (err, ref.abs().max())
    # the check is sharp enough to see the off-diagonal (Kronecker) structure
    assert ref.abs().max() * 0.05 < (ref - torch.diag(ref.diagonal())).abs().max()
    # marginal std == sqrt(diag) of the same reference
    std = ref.diagonal().sqrt().reshape(3, 3).T
    torch.testing.assert_close(layer.weight_std(), std[:, :-1], rtol=1e-10, atol=0)
    torch.testing.assert_close(layer.bias_std(), std[:, -1], rtol=1e-10, atol=0)


def test_mvg_weight_std_factored_closed_form(float64):
    model, opt = mvg_mlp_after_one_step("factored", kl_weight=0.3, num_data=7, prior_var=2.0)
    c2, gamma_in = 0.3 / 7, 0.3 / (7 * 2.0)
    for layer in (model[0], model[2]):
        Ag, Sg = factored_damping(opt.state[layer.weight]["A"], opt.state[layer.weight]["S"], gamma_in)
        std = (c2 * torch.linalg.inv(Sg).diagonal()[:, None] * torch.linalg.inv(Ag).diagonal()[None, :]).sqrt()
        torch.testing.assert_close(layer.weight_std(), std[:, :-1], rtol=1e-10, atol=0)
        torch.testing.assert_close(layer.bias_std(), std[:, -1], rtol=1e-10, atol=0)


# ----------------------------------------------------------------------- train / eval / grad
@pytest.mark.parametrize("posterior", ["FFG", "MVG"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_train_samples_eval_uses_mean(kind, posterior):
    torch.manual_seed(5)
    layer = make_layer(kind, posterior)
    if posterior == "FFG":
        layer.set_ffg_posterior(torch.full_like(layer.weight, 0.3), torch.full_like(layer.bias, 0.3))
    else:
        layer.set_mvg_posterior(torch.eye(3), torch.eye(layer.matrix_shape[1]), 0.3)
    x = torch.randn(5, 4) if kind == "linear" else torch.randn(5, 2, 6, 5)
    mean_out = F.linear(x, layer.weight, layer.bias) if kind == "linear" else F.conv2d(x, layer.weight, layer.bias)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)
    assert not torch.allclose(y1, mean_out)
    layer.eval()
    e1, e2 = layer(x), layer(x)
    assert torch.equal(e1, e2)
    torch.testing.assert_close(e1, mean_out, rtol=0, atol=0)
    with models.sampling(layer):
        assert not torch.allclose(layer(x), mean_out)
    assert torch.equal(layer(x), e1)


def test_linear_gradient_lands_on_mean_at_sampled_weights(float64):
    torch.manual_seed(6)
    layer = BayesianLinear(4, 3, posterior="FFG")
    layer.set_ffg_posterior(torch.full_like(layer.weight, 0.5), torch.full_like(layer.bias, 0.5))
    x = torch.randn(5, 4)
    out = layer(x)
    (0.5 * out.square().sum()).backward()
    wn, bn = layer.last_noise
    assert not wn.requires_grad and wn.abs().min() > 0
    W, b = layer.weight.detach() + wn, layer.bias.detach() + bn
    y = x @ W.T + b  # forward by hand at the sampled weights
    torch.testing.assert_close(out.detach(), y)
    torch.testing.assert_close(layer.weight.grad, y.T @ x)  # d/dW 0.5 |x W^T + b|^2
    torch.testing.assert_close(layer.bias.grad, y.sum(0))
    # the mean's gradient is NOT the gradient at the mean
    y_mean = x @ layer.weight.detach().T + layer.bias.detach()
    assert not torch.allclose(layer.weight.grad, y_mean.T @ x)


@pytest.mark.parametrize("posterior", ["FFG", "MVG"])
def test_conv_gradient_lands_on_mean_at_sampled_weights(float64, posterior):
    torch.manual_seed(7)
    layer = BayesianConv2d(2, 3, 3, stride=2, padding=1, posterior=posterior)
    if posterior == "FFG":
        layer.set_ffg_posterior(torch.full_like(layer.weight, 0.5), torch.full_like(layer.bias, 0.5))
    else:
        layer.set_mvg_posterior(torch.randn(3, 3), torch.randn(19, 19) / 4, 0.5)
    x = torch.randn(2, 2, 5, 5)
    out = layer(x)
    (out.sin().sum()).backward()
    wn, bn = layer.last_noise
    W = (layer.weight.detach() + wn).requires_grad_()
    b = (layer.bias.detach() + bn).requires_grad_()
    ref = F.conv2d(x, W, b, stride=2, padding=1)
    torch.testing.assert_close(out.detach(), ref.detach())
    gW, gb = torch.autograd.grad(ref.sin().sum(), [W, b])
    torch.testing.assert_close(layer.weight.grad, gW)
    torch.testing.assert_close(layer.bias.grad, gb)


# -------------------------------------------------------------------------- architectures
EXPECTED = {
    # arch: [(type, in, out)] for (in_channels, image_size): conv5 -> pool2 -> conv5 -> pool2
    "mlp": lambda c, s: [("lin", c * s * s, 100), ("lin", 100, 10)],
    "covnet": lambda c, s: [("conv", c, 6), ("conv", 6, 16), ("lin", 16 * (((s - 4) // 2 - 4) // 2) ** 2, 10)],
    "lenet5": lambda c, s: [("conv", c, 6), ("conv", 6, 16), ("lin", 16 * (((s - 4) // 2 - 4) // 2) ** 2, 120),
                            ("lin", 120, 84), ("lin", 84, 10)],
}


@pytest.mark.parametrize("posterior", ["MAP", "FFG", "MVG"])
@pytest.mark.parametrize("arch", ["mlp", "covnet", "lenet5"])
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)], ids=["mnist", "cifar"])
def test_build_model(arch, posterior, shape):
    c, s = shape
    torch.manual_seed(0)
    model = models.build_model(arch, posterior, c, s, 10)
    x = torch.randn(2, c, s, s)
    assert model(x).shape == (2, 10)
    model.eval()
    assert model(x).shape == (2, 10)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    expected = EXPECTED[arch](c, s)
    assert len(layers) == len(expected)
    for m, (kind, n_in, n_out) in zip(layers, expected):
        if kind == "lin":
            assert isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (n_in, n_out)
        else:
            assert isinstance(m, nn.Conv2d) and (m.in_channels, m.out_channels) == (n_in, n_out)
            assert m.kernel_size == (5, 5) and m.stride == (1, 1) and m.padding == (0, 0)
        if posterior == "MAP":
            assert not isinstance(m, BayesianLayer)
        else:
            assert isinstance(m, BayesianLinear if kind == "lin" else BayesianConv2d)
            assert m.posterior == posterior
    if arch != "mlp":
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2


@pytest.mark.parametrize("posterior", ["MAP", "FFG", "MVG"])
@pytest.mark.parametrize("shape", [(1, 28), (3, 32)], ids=["mnist", "cifar"])
def test_build_resnet20(posterior, shape):
    """He et al. 2016's ResNet-20: 19 3x3 convs + fc (= 20 layers), 2 projection shortcuts, BN after each conv."""
    c, s = shape
    torch.manual_seed(0)
    model = models.build_model("resnet20", posterior, c, s, 10)
    x = torch.randn(2, c, s, s)
    assert model(x).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size for m in convs].count((3, 3)) == 19 and [m.kernel_size for m in convs].count((1, 1)) == 2
    assert sorted({m.out_channels for m in convs}) == [16, 32, 64] and convs[0].in_channels == c
    assert all(m.bias is None for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(convs)
    assert sum(m.stride == (2, 2) for m in convs) == 4  # 1st conv + shortcut of stages 2 and 3
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fc] == [(64, 10)]
    kinds = {type(m) for m in [*convs, *fc]}
    assert kinds == ({nn.Conv2d, nn.Linear} if posterior == "MAP" else {BayesianConv2d, BayesianLinear})
    # the residual path is real: zeroing a block's second BN leaves the block x -> relu(shortcut(x))
    block = model.layer1[0]
    nn.init.zeros_(block.bn2.weight), nn.init.zeros_(block.bn2.bias)
    h = torch.rand(2, 16, 5, 5)
    torch.testing.assert_close(block(h), h)


def test_build_model_mlp_hidden_and_errors():
    model = models.build_model("mlp", "FFG", 1, 8, 4, hidden=(7, 5))
    sizes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert sizes == [(64, 7), (7, 5), (5, 4)]
    with pytest.raises(ValueError):
        models.build_model("resnet", "FFG", 1, 28, 10)
    with pytest.raises(ValueError):
        models.build_model("mlp", "Laplace", 1, 28, 10)
    with pytest.raises(ValueError):
        models.build_model("covnet", "FFG", 1, 12, 10)


def test_mean_noise_averages_the_samples_since_the_last_step():
    """The prior term of Noisy Adam / Noisy K-FAC uses the mean noise of all MC samples of a step."""
    layer = models.BayesianLinear(3, 2, posterior="FFG", init_std=0.5)
    layer.train()
    seen = []
    for _ in range(3):
        layer(torch.randn(4, 3)).sum().backward()
        seen.append(layer.last_noise[0].clone())
    torch.testing.assert_close(layer.mean_noise[0], torch.stack(seen).mean(0))
    with torch.no_grad():  # evaluation-time samples do not count
        layer(torch.randn(4, 3))
    torch.testing.assert_close(layer.mean_noise[0], torch.stack(seen).mean(0))


def test_noisy_adam_samples_are_exactly_the_posterior_gaussian(float64):
    """After real Noisy Adam steps, w = mu + sigma eps with sigma = sqrt((lambda/N) / (f + gamma_in)) (MATH.md):
    the standardised draws are N(0, 1) (KS test, moments) and independent across entries."""
    torch.manual_seed(11)
    model = models.build_model("mlp", "FFG", 1, 4, 3, hidden=(5,))
    opt = NoisyAdam(model, lr=1e-2, betas=(0.9, 0.5), num_data=50, kl_weight=0.8, prior_var=2.0, damping=1e-3,
                    init_precision=None)
    for _ in range(3):
        x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    layer = models.bayesian_layers(model)[0][1]
    f = opt.state[layer.weight]["fisher"]
    sigma_ref = ((0.8 / 50) / (f + 0.8 / (50 * 2.0))).sqrt()  # independent of the layer's buffers
    assert sigma_ref.max() / sigma_ref.min() > 1.5  # genuinely per-parameter
    n = 10_000
    w, _ = draw(layer, n)
    z = (w - layer.weight.detach()) / sigma_ref
    flat = z.reshape(n, -1)
    torch.testing.assert_close(flat.mean(0), torch.zeros(flat.shape[1]), rtol=0, atol=5 / n**0.5)
    torch.testing.assert_close(flat.var(0), torch.ones(flat.shape[1]), rtol=0, atol=6 * (2 / n) ** 0.5)
    kurt = (flat**4).mean(0) / flat.var(0) ** 2
    assert (kurt - 3).abs().max() < 8 * (24 / n) ** 0.5
    pooled = flat[:, :8].reshape(-1).sort().values  # KS against N(0, 1)
    cdf = torch.special.ndtr(pooled)
    m = pooled.numel()
    ks = torch.maximum(torch.arange(1, m + 1) / m - cdf, cdf - torch.arange(m) / m).max()
    assert ks < 1.95 / m**0.5, ks  # 0.1% level
    corr = torch.corrcoef(flat[:, :6].T)
    assert (corr - torch.eye(6)).abs().max() < 5 / n**0.5


@pytest.mark.parametrize("posterior", ["FFG", "MVG"])
def test_sampled_training_step_sets_no_module_attribute(monkeypatch, posterior):
    """A sampled forward/backward and the optimizer's step keep the per-step noise in ``layer.step_noise`` (a plain
    object), so that none of it goes through ``nn.Module.__setattr__`` (whose checks dominate a small net's
    bookkeeping); the state it keeps is the one the prior term reads."""
    torch.manual_seed(0)
    model = models.build_model("mlp", posterior, 1, 4, 3, hidden=(5,))
    opt = NoisyAdam(model, lr=1e-2, num_data=50) if posterior == "FFG" else NoisyKFAC(model, lr=1e-2, num_data=50)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    for _ in range(3):  # the optimizer's state; Noisy K-FAC's step 4 refreshes no posterior (``refreshes``)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    set_attrs = []
    setattr_ = nn.Module.__setattr__

    def spy(self, name, value):
        set_attrs.append((type(self).__name__, name))
        setattr_(self, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", spy)
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
    layer = models.bayesian_layers(model)[0][1]
    wn = layer.last_noise[0]
    assert layer.step_noise.count == 2 and layer.mean_noise is layer.step_noise.mean
    opt.step()
    opt.zero_grad()
    assert set_attrs == []
    assert layer.step_noise.mean is None and layer.last_noise[0] is wn
