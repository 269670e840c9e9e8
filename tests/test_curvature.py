"""The shared curvature hooks (``optimizers.sum_grad_squared`` / ``kronecker_factors``) against
naive per-example loops in float64 (``tests/reference.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_kronecker_factors_match_loop,
    assert_stats_close,
    assert_sum_grad_squared_matches_loop,
)
from reference import conv_patches, per_example_grads
from torch import nn

import models
import optimizers

RTOL = 1e-6
ATOL = 1e-14


pytestmark = pytest.mark.usefixtures("float64")


def conv_net(bias: bool) -> nn.Module:
    """Conv (stride 2, padding 1, dilation 2) -> pooling/ReLU/flatten/dropout -> Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2, bias=bias),  # 11x9 -> 5x4
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),                                 # -> 3x2
        nn.Conv2d(3, 4, 2, padding=1, bias=bias),                        # -> 4x3
        nn.AvgPool2d((2, 1)),                                            # -> 2x3
        nn.Tanh(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 2 * 3, 5, bias=bias),
    ).eval()


def conv_data(b: int = 6):
    torch.manual_seed(1)
    return torch.randn(b, 2, 11, 9), torch.randint(0, 5, (b,))


# ---------------------------------------------------------------------------- sum_grad_squared
@pytest.mark.parametrize("bias", [True, False])
def test_sum_grad_squared_linear(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.ReLU(), nn.Linear(4, 3, bias=bias))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    assert_sum_grad_squared_matches_loop(model, x, y)


@pytest.mark.parametrize("bias", [True, False])
def test_sum_grad_squared_conv_pool_plain_nn(bias):
    model = conv_net(bias)
    x, y = conv_data()
    assert_sum_grad_squared_matches_loop(model, x, y)


@pytest.mark.parametrize("bias", [True, False])
def test_sum_grad_squared_bayesian_layers_eval(bias):
    """Our Bayesian layers in eval mode (mean weights), non-zero posterior std ignored."""
    model = models.bayesianize(conv_net(bias), "FFG").eval()
    for _, layer in models.bayesian_layers(model):
        layer.set_ffg_posterior(torch.full_like(layer.weight, 0.3),
                                torch.full_like(layer.bias, 0.3) if layer.bias is not None else None)
    x, y = conv_data()
    assert_sum_grad_squared_matches_loop(model, x, y)


def test_sum_grad_squared_covnet_ffg():
    torch.manual_seed(0)
    model = models.build_model("covnet", "FFG", 1, 28, 10).eval()
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([1, 7, 3])
    assert_sum_grad_squared_matches_loop(model, x, y)


def test_conv_bias_statistic_is_square_of_sum():
    """Bias stat = mean_i (sum_t ds_t)^2, NOT mean_i sum_t ds_t^2 (both built here by hand)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2)
    model = nn.Sequential(conv, nn.Flatten())  # logits = every output location
    x = torch.randn(4, 2, 7, 7)
    with torch.no_grad():
        n_out = model(x).shape[1]
    y = torch.randint(0, n_out, (4,))
    square_of_sum, sum_of_squares = torch.zeros(3), torch.zeros(3)
    for i in range(4):
        out = conv(x[i:i + 1])
        (ds,) = torch.autograd.grad(F.cross_entropy(out.flatten(1), y[i:i + 1]), [out])
        square_of_sum += ds[0].sum((1, 2)).square() / 4
        sum_of_squares += ds[0].square().sum((1, 2)) / 4
    got = optimizers.sum_grad_squared(model, x, y)["0.bias"]
    torch.testing.assert_close(got, square_of_sum, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(got, sum_of_squares, rtol=1e-2)


def test_sum_grad_squared_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
    assert_sum_grad_squared_matches_loop(model, x, y)


def test_sum_grad_squared_custom_loss_fn():
    """A loss_fn other than cross entropy, still the mean of per-example losses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    got = optimizers.sum_grad_squared(model, x, y, loss_fn=lambda o, t: ((o - t) ** 2).sum(1).mean())
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(6):
        grads = torch.autograd.grad(((model(x[i]) - y[i]) ** 2).sum(), list(model.parameters()))
        for n, g in zip(ref, grads):
            ref[n] += g.square() / 6
    assert_stats_close(got, ref)


# --------------------------------------------------------------------------- kronecker_factors
@pytest.mark.parametrize("bias", [True, False])
def test_kronecker_factors_linear(bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    got = assert_kronecker_factors_match_loop(model, x, y)
    assert list(got) == ["0", "2"]
    extra = 1 if bias else 0
    assert got["0"][0].shape == (5 + extra, 5 + extra) and got["0"][1].shape == (4, 4)


def test_kronecker_factors_linear_bias_coordinate_is_last():
    """A's last row/column is E[a] and its corner is 1 (the homogeneous coordinate)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(5, 3) + 2.0, torch.randint(0, 2, (5,))
    A, _ = optimizers.kronecker_factors(model, x, y)["0"]
    torch.testing.assert_close(A[-1, :-1], x.mean(0))
    torch.testing.assert_close(A[-1, -1], torch.tensor(1.0))
    torch.testing.assert_close(A[:-1, :-1], x.T @ x / 5)


@pytest.mark.parametrize("bias", [True, False])
def test_kronecker_factors_conv(bias):
    model = conv_net(bias)
    x, y = conv_data(4)
    assert list(assert_kronecker_factors_match_loop(model, x, y)) == ["0", "3", "8"]


def test_kronecker_factors_bayesian_mvg_eval():
    model = models.bayesianize(conv_net(True), "MVG").eval()
    x, y = conv_data(3)
    assert_kronecker_factors_match_loop(model, x, y)


def test_reference_patches_match_conv():
    """Sanity of the reference itself: patches . weight + bias == the conv output."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1))
    img = torch.randn(2, 7, 5)
    out = conv(img[None])[0]
    p = torch.tensor(conv_patches(img, conv))
    torch.testing.assert_close(p @ conv.weight.view(3, -1).T + conv.bias, out.flatten(1).T)


def test_reference_per_example_grads_sum_to_batch_grad():
    torch.manual_seed(0)
    model = conv_net(True)
    x, y = conv_data(3)
    grads = per_example_grads(model, x, y)
    batch = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for (n, _), g in zip(model.named_parameters(), batch):
        torch.testing.assert_close(sum(gi[n] for gi in grads) / 3, g)


# ------------------------------------------------------------------------------ unsupported
@pytest.mark.parametrize("fn", [optimizers.sum_grad_squared, optimizers.kronecker_factors])
def test_layer_without_rule_raises(fn):
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'1'.*PReLU"):
        fn(model, torch.randn(5, 3), torch.randint(0, 2, (5,)))


@pytest.mark.parametrize("fn", [optimizers.sum_grad_squared, optimizers.kronecker_factors])
def test_grouped_conv_raises(fn):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten())
    with pytest.raises(ValueError, match=r"'1'"):
        fn(model, torch.randn(2, 2, 3, 3), torch.randint(0, 4, (2,)))


def test_parameter_free_batchnorm_is_fine():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    model.eval()
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    assert_sum_grad_squared_matches_loop(model, x, y)


@pytest.mark.parametrize("fisher", ["example", "true"])
def test_capture_lets_go_of_layer_inputs_after_their_backward_pass(fisher):
    """A layer's input is held until its statistic is taken, not for as long as the graph lives.

    Held with the graph, every layer's input outlived the step, which cost ResNet-20 a page-faulting
    reallocation of its activations at each step (``CurvatureCapture``'s docstring).
    """
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    from optimizers.curvature import CurvatureCapture

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    capture = CurvatureCapture(model, "diag", fisher=fisher)
    seen = []
    model[2].register_forward_hook(lambda m, inputs, out: seen.append(StorageWeakRef(inputs[0].untyped_storage())))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    if fisher == "true":
        capture.sampled_label_backward(logits, list(model.parameters()))
    loss.backward()
    gc.collect()
    assert seen[0].expired()  # while the graph (``logits``, ``loss``) is still alive
    assert capture.pop(model[2]) is not None and capture.pop(model[0]) is not None
