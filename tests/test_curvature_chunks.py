"""The per-example statistics when the batch is split into several chunks, and convolutions whose
stride differs from their dilation, on fixed inputs against the naive float64 loops of ``reference``.

The chunk bounds of ``optimizers.chunking`` are made small (one example per chunk, and chunks of
2-3 with a shorter last one), so the accumulation over chunks is exercised without a large batch,
for the per-example squares and for the Kronecker factor A.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_factors_close, assert_kronecker_factors_match_loop, assert_sum_grad_squared_matches_loop
from reference import naive_kronecker_factors
from torch import nn

import optimizers
from optimizers import chunking, curvature, curvature_rules

RTOL, ATOL = 1e-6, 1e-14


pytestmark = pytest.mark.usefixtures("float64")


def conv_net(bias: bool) -> nn.Module:
    """conv (stride (2, 1), dilation (1, 2), padding (1, 0)) - relu - conv (stride 2, dilation 1) - linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=bias),  # 9x8 -> 5x6
        nn.ReLU(),
        nn.Conv2d(3, 4, 2, stride=2, dilation=1, padding=1, bias=bias),  # -> 3x4
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 4, 5, bias=bias),
    )


def wide_conv_net(bias: bool) -> nn.Module:
    """Convolutions on small maps with many channels (kw C_in > 8 W_out: the NHWC patch layout), then one without."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(12, 4, 3, stride=(1, 2), padding=(2, 1), dilation=(2, 1), bias=bias),  # 7x6 -> 7x3, NHWC
        nn.ReLU(),
        nn.Conv2d(4, 3, 2, bias=bias),  # -> 6x2, kw C_in = 8 < 8 W_out: NCHW
        nn.Flatten(),
        nn.Linear(3 * 6 * 2, 5, bias=bias),
    )


def sequence_net(bias: bool) -> nn.Module:
    """A linear layer on (B, T, in) inputs (T = 4 patches per example), then a linear classifier."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 5, bias=bias))


def data(shape):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(7, *shape, generator=gen), torch.randint(0, 5, (7,), generator=gen)


CHUNKS = {"one_example_per_chunk": 1, "chunks_of_3": 3, "one_chunk": None}
#: conv net name -> (builder, input shape C x H x W, output locations T of its first conv)
CONV_NETS = {"conv_net": (conv_net, (2, 9, 8), 30), "wide_conv_net": (wide_conv_net, (12, 7, 6), 21)}


def conv_case(monkeypatch, net: str, bias: bool, chunks: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``net`` with its data, the chunk bounds set so its first conv takes ``CHUNKS[chunks]`` examples at a time."""
    build, x_shape, t = CONV_NETS[net]
    model = build(bias)
    set_chunks(monkeypatch, model, CHUNKS[chunks], t)
    return (model, *data(x_shape))


def set_chunks(monkeypatch, model: nn.Module, per_chunk: int | None, t: int = 1) -> None:
    """Bound the chunks so that the first layer (with ``t`` output locations) takes ``per_chunk`` examples at a time."""
    if per_chunk is None:
        return
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    n_in = first.weight[0].numel()
    monkeypatch.setattr(chunking, "_CHUNK_ELEMENTS", per_chunk * first.weight.shape[0] * n_in)
    monkeypatch.setattr(chunking, "_GRAD_CHUNK_ELEMENTS", per_chunk * first.weight.shape[0] * n_in)
    monkeypatch.setattr(chunking, "_PATCH_CHUNK_ELEMENTS", per_chunk * n_in * t)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("net", list(CONV_NETS))
def test_sum_grad_squared_conv_in_chunks(monkeypatch, chunks, bias, net):
    assert_sum_grad_squared_matches_loop(*conv_case(monkeypatch, net, bias, chunks))


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("bias", [True, False])
def test_sum_grad_squared_linear_patches_in_chunks(monkeypatch, chunks, bias):
    model = sequence_net(bias)
    x, y = data((4, 3))
    set_chunks(monkeypatch, model, CHUNKS[chunks])
    assert_sum_grad_squared_matches_loop(model, x, y)


@pytest.mark.parametrize("chunks", list(CHUNKS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("net", list(CONV_NETS))
def test_kronecker_factors_conv_in_chunks(monkeypatch, chunks, bias, net):
    """A of a convolution summed over chunks of the batch (stride != dilation, padding), against the float64 loop."""
    got = assert_kronecker_factors_match_loop(*conv_case(monkeypatch, net, bias, chunks))
    assert list(got) == (["0", "2", "5"] if net == "conv_net" else ["0", "2", "4"])


def naive_sequence_factors(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
    """K-FAC factors of ``sequence_net``'s first layer (T = 4 positions per example) by explicit loops:
    ``A = (1/B) sum_i sum_t a_t a_t^T`` (1 appended with a bias), ``S = (1/B) sum_i (1/T) sum_t ds_t ds_t^T``."""
    layer = model[0]
    b, t = x.shape[0], x.shape[1]
    n_a = x.shape[2] + (layer.bias is not None)
    A, S = torch.zeros(n_a, n_a), torch.zeros(layer.out_features, layer.out_features)
    for i in range(b):
        s = layer(x[i:i + 1])
        loss = torch.nn.functional.cross_entropy(model[1:](s), y[i:i + 1])
        (ds,) = torch.autograd.grad(loss, [s])
        for pos in range(t):
            a = x[i, pos]
            if layer.bias is not None:
                a = torch.cat([a, torch.ones(1)])
            A += torch.outer(a, a) / b
            S += torch.outer(ds[0, pos], ds[0, pos]) / (b * t)
    return {"0": (A, S)}


@pytest.mark.parametrize("bias", [True, False])
def test_kronecker_factors_linear_on_sequences(bias):
    model = sequence_net(bias)
    x, y = data((4, 3))
    assert_factors_close({"0": optimizers.kronecker_factors(model, x, y)["0"]}, naive_sequence_factors(model, x, y))


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("chunks", ["chunks_of_3", "one_chunk"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("net", list(CONV_NETS))
def test_kronecker_factors_conv_location_grids(monkeypatch, stride, chunks, bias, net):
    """A from one grid of every s-th conv output location, weighted s^2: the s^2 grids average to the float64
    loop's A (so the sub-sample is unbiased), while S and the Linear layer take every location as before."""
    model, x, y = conv_case(monkeypatch, net, bias, chunks)
    ref = naive_kronecker_factors(model, x, y)
    grids = []
    for j in range(stride * stride):
        capture = curvature.CurvatureCapture(model, "kfac")
        capture.locations = (stride, j)
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grids.append({name: capture.pop(m) for name, m in capture.layers})
        capture.remove()
    for name, (A, S) in ref.items():
        is_conv = isinstance(dict(model.named_modules())[name], nn.Conv2d)
        mean_a = sum(g[name][0] for g in grids) / stride**2
        torch.testing.assert_close(mean_a, A, rtol=RTOL, atol=ATOL, msg=f"{name} mean A over the grids")
        for j, g in enumerate(grids):
            torch.testing.assert_close(g[name][1], S, rtol=RTOL, atol=ATOL, msg=f"{name} S, grid {j}")
            assert torch.allclose(g[name][0], A) != is_conv, f"{name} grid {j}: a conv's grid is a sub-sample"


#: ResNet-20's first-stage convolution on a batch of 128 CIFAR-10 images: (B, out, C_in kh kw, H_out W_out)
RESNET_STAGE1 = (128, 16, 16 * 9, 32 * 32)


def test_chunk_limits_per_device():
    """Cache-sized chunks on the CPU; on CUDA bounded by a share of the device's memory, so the whole batch."""
    cpu = chunking.chunk_limits(torch.device("cpu"))
    assert cpu == (chunking._CHUNK_ELEMENTS, chunking._PATCH_CHUNK_ELEMENTS, chunking._GRAD_CHUNK_ELEMENTS,
                   chunking._NORM_CHUNK_ELEMENTS)
    b, out, n_in, t = RESNET_STAGE1
    assert curvature_rules.conv_grad_chunk(cpu, *RESNET_STAGE1) == 7  # 19 chunks of the batch
    for gigabytes, element_size, chunk in ((80, 4, b), (16, 4, b), (16, 8, 105)):
        total = gigabytes * 10**9
        cuda = chunking.chunk_limits(torch.device("cuda", 0), element_size, total_memory=total)
        assert all(v * element_size <= total / 100 for v in cuda)  # memory-bounded: 1/128 of it per buffer
        # float32: one chunk; float64 on a 16 GB card: 125 MB of patches, 105 examples of 144 x 1024 x 8 bytes
        assert curvature_rules.conv_grad_chunk(cuda, *RESNET_STAGE1) == chunk
    tiny = chunking.chunk_limits(torch.device("cuda"), 4, total_memory=2**20)  # 8 KB per buffer
    assert curvature_rules.conv_grad_chunk(tiny, *RESNET_STAGE1) == 1
    assert curvature_rules.conv_grad_chunk(tiny._replace(grads=3 * out * n_in, patches=10**9), *RESNET_STAGE1) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resnet_stage1_conv_is_one_chunk_on_cuda(monkeypatch):
    """On the GPU the first-stage convolution's batch is one chunk, with the CPU's float64 statistics."""
    chunks = []
    padded_chunks = curvature_rules._padded_chunks

    def spy(module, a, chunk, *args, **kwargs):
        chunks.append(chunk)
        return padded_chunks(module, a, chunk, *args, **kwargs)

    monkeypatch.setattr(curvature_rules, "_padded_chunks", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).float()
    x, y = torch.randn(128, 16, 32, 32, dtype=torch.float32), torch.randint(0, 10, (128,))
    ref = optimizers.sum_grad_squared(model.double(), x.double(), y)
    ref_kfac = optimizers.kronecker_factors(model, x.double(), y)
    chunks.clear()
    model = model.float().cuda()
    got = optimizers.sum_grad_squared(model, x.cuda(), y.cuda())
    got_kfac = optimizers.kronecker_factors(model, x.cuda(), y.cuda())
    assert chunks == [128, 128]  # per-example squares, then the Kronecker factor A
    for name in ref:
        torch.testing.assert_close(got[name].cpu().double(), ref[name], rtol=1e-4, atol=1e-7, msg=name)
    for name in ref_kfac:
        for g, r in zip(got_kfac[name], ref_kfac[name]):
            torch.testing.assert_close(g.cpu().double(), r, rtol=1e-4, atol=1e-7, msg=name)
