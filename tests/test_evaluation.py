"""The evaluation's predictive (``evaluation.predict``) and its S networks (``models.weight_samples``).

* Definition: the predictive of an FFG MLP equals an S-sample average written here, over networks drawn from
  ``sample_seed(seed, epoch, s)`` in the documented order (layers in order, weight then bias), at batch sizes
  1, 7 and 1000; ``--test_samples 0`` is the mean weights' softmax, whatever the seed.
* Batch size 1, 7 and 1000 give the same predictive, to float32 rounding, for FFG, MVG (after a Noisy K-FAC
  step), a block-tridiagonal chain and a BatchNorm network (eval mode: running statistics; Gaussian affine
  parameters); a test set and an OOD set scored apart see the same networks as scored together.
* Each of the S networks has exactly the posterior's distribution: FFG after Noisy Adam steps (the standardised
  noise of every entry, BatchNorm's included, is N(0, 1) by moments and a KS test, with sigma recomputed from the
  optimizer's curvature; samples uncorrelated with each other), MVG (covariance against the dense Kronecker
  inverse of the optimizer's factors) and the block-tridiagonal chain (against the dense F-hat inverse).
* 2 gloo ranks (37 images, batch 5) return the predictive and metrics of 1 process (batch 1000) on every rank.
* ``predict`` leaves the global RNG, the model's mode and its layers' noise as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import free_port, run_ranks
from nets import CHAIN_KW, chain_factors, linears, mvg_mlp_after_one_step, trained_chain
from reference import dense_fhat, kronecker_covariance, vec
from torch import nn

from evaluation import default_eval_batch_size, evaluate, predict, sample_seed
from models import BayesianBatchNorm2d, BayesianConv2d, BayesianLinear, bayesian_layers, build_model
from models.joint_posterior import attach_chains
from models.weight_samples import draw_noise, fixed_sample
from optimizers import NoisyAdam, NoisyKFAC
from util import distributed

SEED, EPOCH, S = 3, 2, 4


def ffg_mlp() -> nn.Module:
    """The 16-5-3 MLP with a broad posterior: a distinct std per entry, about as large as the weights."""
    torch.manual_seed(8)
    model = build_model("mlp", "FFG", 1, 4, 3, hidden=(5,))
    gen = torch.Generator().manual_seed(9)
    for _, m in bayesian_layers(model):
        m.set_ffg_posterior(0.2 + 0.6 * torch.rand(m.weight.shape, generator=gen),
                            0.2 + 0.6 * torch.rand(m.bias.shape, generator=gen))
    return model


def bn_net() -> nn.Module:
    """conv - BatchNorm (Gaussian affine posterior, non-trivial running statistics) - relu - linear, FFG."""
    torch.manual_seed(4)
    model = nn.Sequential(BayesianConv2d(1, 4, 3, posterior="FFG", init_std=0.3), BayesianBatchNorm2d(4, init_std=0.3),
                          nn.ReLU(), nn.Flatten(), BayesianLinear(4 * 2 * 2, 3, posterior="FFG", init_std=0.3))
    model.train()
    with torch.no_grad():
        for k in range(3):
            model(torch.randn(16, 1, 4, 4) * (1 + k) + k)
    return model


def mvg_net() -> nn.Module:
    """An MVG conv-linear net after one Noisy K-FAC step (non-isotropic matrix-variate posteriors)."""
    torch.manual_seed(5)
    model = nn.Sequential(BayesianConv2d(1, 3, 3, posterior="MVG"), nn.ReLU(), nn.Flatten(),
                          BayesianLinear(3 * 2 * 2, 3, posterior="MVG"))
    opt = NoisyKFAC(model, lr=0.01, num_data=50, kl_weight=1.0, prior_var=1.0)
    x, y = torch.randn(32, 1, 4, 4), torch.randint(0, 3, (32,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return model


def chain_net() -> nn.Module:
    """The 5-4-3-2 block-tridiagonal chain of test_block_tridiagonal after two steps, as float32."""
    return trained_chain()[0].float()


def images(model_name: str, n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (5,) if model_name == "chain" else (1, 4, 4)
    return torch.randn(n, *shape, generator=gen)


MODELS = {"ffg_mlp": ffg_mlp, "bn": bn_net, "mvg": mvg_net, "chain": chain_net}


# -- the definition ------------------------------------------------------------------------------
def test_predictive_is_the_s_sample_average_over_the_seeded_networks(float64) -> None:
    model = ffg_mlp().double()
    x = torch.randn(23, 1, 4, 4)
    params = [(m.weight.detach(), m.bias.detach(), m.weight_sigma, m.bias_sigma) for _, m in bayesian_layers(model)]

    def forward(ps):
        (w1, b1), (w2, b2) = ps
        return F.relu(x.flatten(1) @ w1.T + b1) @ w2.T + b2

    probs = []
    for s in range(S):
        gen = torch.Generator().manual_seed(sample_seed(SEED, EPOCH, s))
        sample = [(w + sw * torch.randn(w.shape, generator=gen), b + sb * torch.randn(b.shape, generator=gen))
                  for w, b, sw, sb in params]
        probs.append(F.softmax(forward(sample), -1))
    ref = torch.stack(probs).mean(0)
    mean = F.softmax(forward([(w, b) for w, b, _, _ in params]), -1)
    assert (ref - mean).abs().max() > 0.05  # the noise matters
    model.train()
    for batch in (1, 7, 1000):
        torch.testing.assert_close(predict(model, x, S, SEED, EPOCH, batch), ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(predict(model, x, 0, SEED, EPOCH, batch), mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(predict(model, x, 0, SEED + 1, EPOCH + 1), mean, rtol=1e-12, atol=1e-14)
    assert model.training  # mode restored
    # other seeds, epochs and sample counts are other networks
    for other in ((SEED + 1, EPOCH), (SEED, EPOCH + 1)):
        assert (predict(model, x, S, *other) - ref).abs().max() > 1e-3
    assert len({sample_seed(a, b, c) for a in range(4) for b in range(4) for c in range(4)}) == 64


@pytest.mark.parametrize("name", list(MODELS))
def test_predictive_does_not_depend_on_batch_size_or_split(name: str) -> None:
    model = MODELS[name]()
    x = images(name, 40)
    ref = predict(model, x, S, SEED, EPOCH, 1000)
    for batch in (1, 7):
        torch.testing.assert_close(predict(model, x, S, SEED, EPOCH, batch), ref)
    # a test set and an OOD set scored apart are scored under the same networks
    apart = [predict(model, part, S, SEED, EPOCH) for part in (x[:15], x[15:])]
    torch.testing.assert_close(torch.cat(apart), ref)
    mean = predict(model, x, 0, SEED, EPOCH)
    assert (ref - mean).abs().max() > 1e-3  # the networks are not the mean


def test_predict_leaves_rng_mode_and_layers_alone() -> None:
    for name, build in MODELS.items():
        model = build()
        model.eval()
        x = images(name, 9)
        rng = torch.get_rng_state()
        predict(model, x, 2, SEED, EPOCH, 4)
        assert torch.equal(torch.get_rng_state(), rng), f"{name}: the evaluation used the global RNG"
        assert not model.training
        assert all(m.fixed_noise is None and m.joint_noise is None and not m.sample_in_eval
                   for _, m in bayesian_layers(model)), name
        # one network in train mode too: every forward the same, no draw from the global RNG (chains included)
        model.train()
        with fixed_sample(draw_noise(model, torch.Generator().manual_seed(0))):
            with torch.no_grad():
                first, second = model(x), model(x)
        assert torch.equal(torch.get_rng_state(), rng), f"{name}: a forward under fixed_sample drew noise"
        assert torch.equal(first, second) or name == "bn", name  # BatchNorm: batch statistics, same batch


def test_mean_weights_of_a_batchnorm_net_use_running_statistics() -> None:
    model = bn_net()
    x = images("bn", 10)
    conv, bn, lin = model[0], model[1], model[4]
    h = F.conv2d(x, conv.weight, conv.bias)
    h = (h - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
    h = (h * bn.weight[:, None, None] + bn.bias[:, None, None]).relu().flatten(1)
    ref = F.softmax(h @ lin.weight.T + lin.bias, -1)
    for batch in (1, 7):
        torch.testing.assert_close(predict(model, x, 0, SEED, EPOCH, batch), ref.detach())


# -- each network has the posterior's distribution ----------------------------------------------------
def networks(model: nn.Module, n: int) -> list[dict]:
    """The noise of networks 0..n-1 of one evaluation (its S = n samples)."""
    return [draw_noise(model, torch.Generator().manual_seed(sample_seed(SEED, EPOCH, s))) for s in range(n)]


def test_ffg_networks_are_the_noisy_adam_posterior(float64) -> None:
    """sigma = sqrt((lambda/N) / (f + gamma_in)) from the optimizer's curvature f (MATH.md), BatchNorm included."""
    model = bn_net().double()
    lam, N, eta = 0.8, 50, 2.0
    opt = NoisyAdam(model, lr=1e-2, betas=(0.9, 0.5), num_data=N, kl_weight=lam, prior_var=eta, damping=1e-3,
                    init_precision=None, norm_posterior="gaussian")
    model.train()
    for _ in range(3):
        x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    layers = [m for _, m in bayesian_layers(model)]
    assert any(isinstance(m, BayesianBatchNorm2d) for m in layers)
    n = 4000
    draws = networks(model, n)
    z = []
    for m in layers:
        for p, i in ((m.weight, 0), (m.bias, 1)):
            sigma = ((lam / N) / (opt.state[p]["fisher"] + lam / (N * eta))).sqrt()
            z.append(torch.stack([d[m][i] for d in draws]).reshape(n, -1) / sigma.reshape(-1))
    flat = torch.cat(z, 1)
    tol = 5 / n**0.5
    torch.testing.assert_close(flat.mean(0), torch.zeros(flat.shape[1]), rtol=0, atol=tol)
    assert (flat.var(0) - 1).abs().max() < 6 * (2 / n) ** 0.5
    kurt = (flat**4).mean(0) / flat.var(0) ** 2
    assert (kurt - 3).abs().max() < 8 * (24 / n) ** 0.5
    pooled = flat[:, ::7].reshape(-1).sort().values  # KS against N(0, 1)
    cdf = torch.special.ndtr(pooled)
    m = pooled.numel()
    ks = torch.maximum(torch.arange(1, m + 1) / m - cdf, cdf - torch.arange(m) / m).max()
    assert ks < 1.95 / m**0.5, ks  # 0.1% level
    # entries independent within a network, networks independent of each other
    corr = torch.corrcoef(flat[:, :8].T)
    assert (corr - torch.eye(8)).abs().max() < tol
    lagged = (flat[1:] * flat[:-1]).mean(0)
    assert lagged.abs().max() < tol


@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_mvg_networks_have_the_kronecker_covariance(float64, mode: str) -> None:
    lam, N, eta = 0.5, 10, 1.0
    model, opt = mvg_mlp_after_one_step(mode, kl_weight=lam, num_data=N, prior_var=eta)
    layer = model[0]
    ref = kronecker_covariance(opt.state[layer.weight]["A"], opt.state[layer.weight]["S"], mode, lam / N,
                               lam / (N * eta))
    n = 20_000
    noise = torch.stack([torch.cat([d[layer][0], d[layer][1][:, None]], 1) for d in networks(model, n)])
    v = vec(noise)
    cov = v.T @ v / n
    assert (cov - ref).abs().max() < 0.05 * ref.abs().max()
    assert ref.abs().max() * 0.05 < (ref - torch.diag(ref.diagonal())).abs().max()  # off-diagonals matter


def test_chain_networks_have_the_block_tridiagonal_covariance(float64) -> None:
    """A network's chain noise is ``J eps``, ``eps`` the seed's standard normals (drawn here, layer by layer) and
    ``J`` linear: so it is N(0, J J^T) exactly, and J J^T is the dense (lambda/N) F-hat^-1."""
    model, opt = trained_chain()
    layers = linears(model)
    A, S_, Ac, Gc = chain_factors(opt, layers)
    Fh, offs = dense_fhat(A, S_, Ac, Gc, CHAIN_KW["kl_weight"] / (CHAIN_KW["num_data"] * CHAIN_KW["prior_var"]))
    ref = CHAIN_KW["kl_weight"] / CHAIN_KW["num_data"] * torch.linalg.inv(Fh)
    shapes = [m.matrix_shape for m in layers]
    total = sum(o * i for o, i in shapes)
    columns = []
    for k in range(total):  # J column by column: the network of the k-th unit vector of eps
        e = torch.zeros(total)
        e[k] = 1
        eps, off = [], 0
        for o, i in shapes:
            eps.append(e[off:off + o * i].reshape(i, o).T)  # vec order: column-major
            off += o * i
        columns.append(torch.cat([vec(w) for w in attach_chains(model)[0].noise_from(eps)]))
    J = torch.stack(columns, 1)
    torch.testing.assert_close(J @ J.T, ref, rtol=1e-7, atol=1e-9 * ref.abs().max())
    std = ref.diagonal().sqrt()
    assert (ref / std[:, None] / std[None])[offs[0]:offs[1], offs[1]:offs[2]].abs().max() > 0.05  # layers coupled
    for s, d in enumerate(networks(model, 5)):
        gen = torch.Generator().manual_seed(sample_seed(SEED, EPOCH, s))
        eps = torch.cat([vec(torch.randn(m.matrix_shape, generator=gen)) for m in layers])
        got = torch.cat([vec(torch.cat([d[m][0], d[m][1][:, None]], 1)) for m in layers])
        torch.testing.assert_close(got, J @ eps, rtol=1e-10, atol=1e-12)


# -- ranks -----------------------------------------------------------------------------------------
WORLD, N_IMAGES = 2, 37


def _scores(ctx: distributed.DistContext | None, batch: int) -> dict:
    out = {}
    for name, build in MODELS.items():
        model = build()
        x = images(name, N_IMAGES)
        labels = torch.arange(N_IMAGES) % 2
        out[name] = predict(model, x, S, SEED, EPOCH, batch, ctx)
        out[f"{name}_metrics"] = evaluate(model, x, labels, S, SEED, EPOCH, batch, ctx)[0]
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx, _ = distributed.setup("cpu")
    try:
        torch.save(_scores(ctx, 5), Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.cleanup(ctx)


@pytest.mark.slow  # two processes importing torch: about 15 s on a loaded 2-core machine
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_two_ranks_give_the_one_process_predictive(tmp_path: Path) -> None:
    run_ranks(_worker, free_port(), str(tmp_path), nprocs=WORLD)
    ref = _scores(None, 1000)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in ref.items():
            if isinstance(value, dict):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (rank, key)
            else:
                torch.testing.assert_close(got[key], value, msg=f"rank {rank}, {key}")


# -- the batch size's default ----------------------------------------------------------------------
def test_default_batch_size_per_device() -> None:
    cpu, cuda = default_eval_batch_size("cpu", 1), default_eval_batch_size(torch.device("cuda", 0))
    assert 16 <= cpu <= 256 < cuda  # cache-sized on a CPU, large on a GPU
    assert default_eval_batch_size(torch.zeros(1).device, 3) == 3 * cpu  # each thread its cache-sized share
    assert default_eval_batch_size("cpu") == torch.get_num_threads() * cpu


def test_eval_batch_size_option_defaults_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from option_parser import TrainOptions

    parse = lambda *argv: TrainOptions().parse(["--no_visdom", *argv])  # noqa: E731
    assert parse("--device", "cpu").eval_batch_size == default_eval_batch_size("cpu")
    assert parse("--device", "cpu", "--num_threads", "2").eval_batch_size == default_eval_batch_size("cpu", 2)
    assert parse("--device", "cpu", "--eval_batch_size", "7").eval_batch_size == 7
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse().eval_batch_size == default_eval_batch_size("cuda")
