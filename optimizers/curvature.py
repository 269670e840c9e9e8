"""Curvature capture with hooks: per-example squared gradients and Kronecker factors.

Written once and used by every optimizer (second seed, section 3). A forward hook on each
``nn.Linear`` / ``nn.Conv2d`` keeps the layer's input ``a``; a tensor hook on its output
receives ``G = dL/ds``, the gradient of the (mean-reduced) mini-batch loss w.r.t. the
pre-activations. With ``B`` examples, example i's own loss has pre-activation gradient
``ds_i = B G_i``. Every layer is seen as per-example "patches": ``a_i`` is (T x in) and
``ds_i`` (T x out), with T = 1 for a Linear layer on flat inputs and T = the number of output
locations for a convolution (``a_i`` = its unfolded input, Grosse & Martens 2016).

* Diagonal Fisher (Noisy Adam, VOGN): ``g_i = ds_i^T a_i``, statistic ``mean_i g_i**2``.
  For T = 1 this is ``(1/B) (ds**2)^T (a**2)``: one weight-gradient-sized product, no
  B x out x in tensor. For T > 1 the per-example gradients are formed in chunks of the batch.
  The bias gradient is ``sum_t ds_{i,t}``, so its statistic is ``mean_i (sum_t ds_{i,t})**2``.
* Kronecker factors (Noisy K-FAC): ``A = mean_i sum_t a_t a_t^T`` (with the homogeneous 1
  appended as the last coordinate when the layer has a bias) and
  ``S = mean_i (1/T) sum_t ds_t ds_t^T``. This is the KFC normalisation; other libraries
  put the 1/T on A instead, which changes both factors by T and leaves A (x) S unchanged.

* Normalisation layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm; MATH.md, "Normalisation
  layers"): ``y = gamma * x_hat + beta`` elementwise, so the forward hook keeps the normalised input
  ``x_hat`` (BatchNorm: the input with the per-channel mean and 1/std the forward pass used, held
  constant, so no second normalisation pass) and example i's gradients are
  ``sum_t ds_{i,t} x_hat_{i,t}`` and ``sum_t ds_{i,t}`` over the positions t that share one affine
  entry. They always take this diagonal statistic, also inside an MVG model (``kind="kfac"``), as
  in torchsso.

Which rule a layer takes is looked up by module type in ``RULES`` (BackPACK style). The hooks sit
on the modules themselves, so any graph works (residual blocks, skips, modules outside
``nn.Sequential``); a module called twice in one forward pass (weight sharing) would get one
statistic per call instead of the statistic of the summed gradient, so it stops with a
``ValueError`` naming it. Parameter-free layers in between (ReLU, pooling, flatten, dropout)
need nothing: the hooks see whatever gradient flows through them.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: bound on the per-example gradient tensor formed for one chunk of a Linear layer on sequences (elements)
_CHUNK_ELEMENTS = 2**23
#: bounds on one chunk of a conv batch (elements): its unfolded input patches (4 MB) and its per-example
#: gradients (2 MB), near the fastest of a scan of chunk sizes on ResNet-20's convolutions (1 thread)
_PATCH_CHUNK_ELEMENTS = 2**20
_GRAD_CHUNK_ELEMENTS = 2**19
#: bound on one chunk of a BatchNorm layer's elementwise products (elements; 1 MB, in cache with its inputs)
_NORM_CHUNK_ELEMENTS = 2**18
#: on a GPU the bounds above would cut a batch into many small chunks, each a few kernel launches, for no cache
#: to gain: there each chunk buffer may take this share of the device's memory instead (on an 80 GB card 625 MB,
#: so ResNet-20's first convolution on a batch of 128 CIFAR images, 75 MB of patches, is one chunk, not 19)
_CUDA_BUFFER_SHARE = 1 / 128


class ChunkLimits(NamedTuple):
    """Element bounds on the chunked rules' buffers (``chunk_limits``)."""

    linear: int  # per-example gradients of a Linear layer on sequences
    patches: int  # a convolution chunk's unfolded input patches
    grads: int  # a convolution chunk's per-example gradients
    norm: int  # a BatchNorm chunk's elementwise products


def chunk_limits(device: torch.device, element_size: int = 4, total_memory: int | None = None) -> ChunkLimits:
    """The chunk bounds for tensors on ``device``: cache-sized on the CPU (and other devices), memory-sized on CUDA.

    ``total_memory``: the CUDA device's memory in bytes (default: what the device reports).
    """
    if device.type != "cuda":
        return ChunkLimits(_CHUNK_ELEMENTS, _PATCH_CHUNK_ELEMENTS, _GRAD_CHUNK_ELEMENTS, _NORM_CHUNK_ELEMENTS)
    if total_memory is None:
        total_memory = _cuda_memory(device)
    n = max(1, int(total_memory * _CUDA_BUFFER_SHARE) // element_size)
    return ChunkLimits(n, n, n, n)


@functools.cache
def _cuda_memory(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def _limits(x: Tensor) -> ChunkLimits:
    return chunk_limits(x.device, x.element_size())


def conv_grad_chunk(limits: ChunkLimits, b: int, out: int, n_in: int, t: int) -> int:
    """Examples per chunk of ``_conv_grad_squared``: its per-example gradients (chunk x out x n_in) and patches
    (chunk x n_in x T) within ``limits``, at least 1, at most the batch."""
    return max(1, min(limits.grads // (out * n_in), limits.patches // (t * n_in), b))

LossFn = Callable[[Tensor, Tensor], Tensor]


class _Scratch(threading.local):
    """Flat buffers reused by the chunked rules from one backward pass to the next.

    Fresh multi-megabyte temporaries are handed back to the OS when freed and page-faulted in again at
    every use: on the benchmark machine a 6 MB product cost 2.3 ms in a ResNet-20 step against 0.4 ms
    in a loop that reuses its memory. The rules' chunk bounds keep each buffer at a few MB; one set
    per thread, dtype and device.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` (``like``'s dtype and device) in the buffer ``name``."""
        n = 1
        for d in shape:
            n *= d
        key = (name, like.dtype, like.device)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = like.new_empty(n)
        return buf[:n].view(shape)


_scratch = _Scratch()


def release_scratch() -> None:
    """Free this thread's reused buffers (they are re-created on the next use), e.g. before measuring memory."""
    _scratch.buffers.clear()


NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with a (diagonal) curvature rule."""
    return isinstance(module, NORM_LAYERS) and not isinstance(module, nn.SyncBatchNorm)


def _check_conv(name: str, module: nn.Conv2d) -> None:
    if module.groups != 1 or module.padding_mode != "zeros":
        raise ValueError(f"layer {name!r}: only Conv2d with groups=1 and zero padding has a curvature rule")


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers with a curvature rule; raise ``ValueError`` naming any other layer with parameters."""
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        rule = rule_for(module)
        if rule is not None and (own or not is_norm_layer(module)):
            if rule.check is not None:
                rule.check(name, module)
            layers.append((name, module))
        elif own:
            raise ValueError(f"layer {name!r} ({type(module).__name__}) has parameters but no curvature rule; "
                             f"supported: {SUPPORTED}")
    return layers


def conv_patches(module: nn.Conv2d, x: Tensor, padded: bool = False) -> Tensor:
    """The input patches of a convolution as a strided *view* (B, C_in, kh, kw, H_out, W_out).

    ``conv_patches(m, x).reshape(B, C_in kh kw, H_out W_out)`` equals ``F.unfold(x, ...)``
    exactly; the view lets the caller choose the memory layout of its one copy, which is several
    times faster on CPU than aten's ``im2col`` (benchmarked in ``bench/per_example.py``).
    ``padded=True``: ``x`` already carries the layer's zero padding.
    """
    pad = module._reversed_padding_repeated_twice
    if any(pad) and not padded:
        x = F.pad(x, pad)
    b, c, h, w = x.shape
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = x.stride()
    return x.as_strided((b, c, kh, kw, ho, wo), (s[0], s[1], dh * s[2], dw * s[3], sh * s[2], sw * s[3]))


def _padded_chunks(module: nn.Conv2d, a: Tensor, chunk: int, nhwc: bool = False) -> Iterator[tuple[int, Tensor]]:
    """``(i, x)`` for the chunks ``a[i:i + chunk]``, each zero-padded as the layer pads (NCHW, or NHWC).

    The padded chunks share one reused buffer (``_Scratch``), so a chunk is valid until the next one;
    an unpadded NCHW chunk is ``a``'s own slice.
    """
    b, c_in, h, w = a.shape
    left, right, top, bottom = module._reversed_padding_repeated_twice
    if not (nhwc or left or right or top or bottom):
        yield from ((i, a[i:i + chunk]) for i in range(0, b, chunk))
        return
    hp, wp = top + h + bottom, left + w + right
    padded = _scratch.get("padded", (chunk, hp, wp, c_in) if nhwc else (chunk, c_in, hp, wp), a)
    padded.zero_()  # the border; the interior is overwritten chunk by chunk
    if nhwc:
        interior = padded[:, top:top + h, left:left + w].permute(0, 3, 1, 2)
    else:
        interior = padded[:, :, top:top + h, left:left + w]
    for i in range(0, b, chunk):
        n = min(chunk, b - i)
        interior[:n].copy_(a[i:i + n])
        yield i, padded[:n]


def layer_patches(module: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example patches ``(a, g)`` of shapes (B, T, in) and (B, T, out) for a layer."""
    b = a.shape[0]
    if isinstance(module, nn.Conv2d):
        a = conv_patches(module, a).reshape(b, module.weight[0].numel(), -1).transpose(1, 2)
        return a, g.reshape(b, g.shape[1], -1).transpose(1, 2)
    return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])


def homogeneous(a: Tensor) -> Tensor:
    """Append the constant 1 that carries the bias as a last input coordinate."""
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def grad_squared(module: nn.Module, a: Tensor, g: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """``mean_i g_i**2`` for weight and bias, where the per-example pre-activation gradient is ``scale * g``."""
    if isinstance(module, nn.Conv2d):
        return _conv_grad_squared(module, a, g, scale)
    b = a.shape[0]
    if a[0].numel() == a.shape[-1]:  # one location per example: (B, in) or (B, 1, in)
        # c folded into the small (B x out) factor, whose column sums are then the bias' squares
        g2 = g.reshape(b, -1).square().mul_(scale * scale / b)
        return g2.T @ a.reshape(b, -1).square(), (g2.sum(0) if module.bias is not None else None)
    a, g = layer_patches(module, a, g)
    out, n_in = g.shape[2], a.shape[2]
    chunk = max(1, _limits(a).linear // (out * n_in))
    sq_w = a.new_zeros(out, n_in)
    for i in range(0, b, chunk):
        per_example = torch.bmm(g[i:i + chunk].transpose(1, 2), a[i:i + chunk])
        sq_w += per_example.square().sum(0)
    c = scale * scale / b
    sq_b = c * g.sum(1).square().sum(0) if module.bias is not None else None
    return sq_w.mul_(c).view_as(module.weight), sq_b


def _conv_grad_squared(module: nn.Conv2d, a: Tensor, g: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """``grad_squared`` of a convolution, unfolding the batch chunk by chunk.

    Each chunk is zero-padded, its patches copied from a strided view and its per-example gradients
    formed, all in reused buffers (``_Scratch``) bounded by ``chunk_limits`` (on the CPU
    ``_PATCH_CHUNK_ELEMENTS`` and ``_GRAD_CHUNK_ELEMENTS``, so that they stay in cache): faster and far less
    memory than unfolding the whole batch at once (``bench/per_example.py``). The patch copy runs along
    contiguous rows of W_out elements from an NCHW chunk, or of kw x C_in from an NHWC copy of it; the NHWC layout is
    taken where its rows are many times longer (small feature maps, many channels), where the copy
    would otherwise cost as much as the product.
    """
    b, c_in, n_in = a.shape[0], a.shape[1], module.weight[0].numel()
    ho, wo = g.shape[2], g.shape[3]
    g = g.reshape(b, g.shape[1], -1)  # (B, out, T)
    out, t = g.shape[1], g.shape[2]
    chunk = conv_grad_chunk(_limits(a), b, out, n_in, t)
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    nhwc = dw == 1 and kw * c_in > 8 * wo
    patches = _scratch.get("patches", (chunk, t, n_in) if nhwc else (chunk, n_in, t), a)
    per_example = _scratch.get("per_example", (chunk, out, n_in), a)
    sq_w = a.new_zeros(out, n_in)
    for i, x in _padded_chunks(module, a, chunk, nhwc):
        n = x.shape[0]
        if nhwc:  # (n, H_out, W_out, kh, kw, C_in): T x in, "in" ordered (kh, kw, C_in)
            s = x.stride()
            view = x.as_strided((n, ho, wo, kh, kw, c_in), (s[0], sh * s[1], sw * s[2], dh * s[1], dw * s[2], s[3]))
            operand = patches[:n]
        else:
            view = conv_patches(module, x, padded=True)
            operand = patches[:n].transpose(1, 2)
        patches[:n].view(view.shape).copy_(view)
        torch.bmm(g[i:i + n], operand, out=per_example[:n])
        sq_w += per_example[:n].square_().sum(0)
    c = scale * scale / b
    sq_w *= c
    if nhwc:
        sq_w = sq_w.view(out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()
    sq_b = c * g.sum(2).square().sum(0) if module.bias is not None else None
    return sq_w.view_as(module.weight), sq_b


def kfac_factors(module: nn.Module, a: Tensor, g: Tensor, scale: float,
                 locations: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """K-FAC factors ``(A, S)`` of one batch: ``A = mean_i sum_t a a^T``, ``S = mean_i (1/T) sum_t ds ds^T``.

    ``locations = (s, j)``: a convolution's ``A`` from one grid of every s-th output location in each direction
    (``_conv_kfac_factors``); ignored by other layers.
    """
    if isinstance(module, nn.Conv2d):
        return _conv_kfac_factors(module, a, g, scale, locations)
    a, g = layer_patches(module, a, g)
    b, t, _ = a.shape
    if module.bias is not None:
        a = homogeneous(a)
    a = a.reshape(-1, a.shape[-1])
    g = g.reshape(-1, g.shape[-1])
    return (a.T @ a).div_(b), (g.T @ g).mul_(scale * scale / (b * t))


def _conv_kfac_factors(module: nn.Conv2d, a: Tensor, g: Tensor, scale: float,
                       locations: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """``kfac_factors`` of a convolution: A summed over chunks of the batch, each chunk's patches copied
    into one reused (in [+1]) x (chunk T) matrix (bounded by ``chunk_limits``: on the CPU ``_PATCH_CHUNK_ELEMENTS``,
    so it stays in cache).

    Same values as the generic path (unfold, transpose, append the 1, reshape), without its two
    strided copies of the whole B x T x in patch tensor.

    ``locations = (s, j)``: ``A`` from the output locations ``(r, c)`` with ``r = j // s``, ``c = j % s``
    (mod s) only, times ``s^2`` (docs/MATH.md, "Noisy K-FAC"): the mean over the ``s^2`` grids ``j`` is the
    full ``A``, at ``1/s^2`` of its cost.
    """
    b, n_in = a.shape[0], module.weight[0].numel()
    s, j = locations if locations is not None else (1, 0)
    t_grid = -(-g.shape[2] // s) * -(-g.shape[3] // s)  # the largest grid: ceil(H_out / s) ceil(W_out / s)
    g = g.reshape(b, g.shape[1], -1)  # (B, out, T)
    t, bias = g.shape[2], module.bias is not None
    chunk = max(1, min(_limits(a).patches // ((n_in + bias) * t_grid), b))
    cols = _scratch.get("kfac_cols", (n_in + bias, chunk * t_grid), a)
    if bias:
        cols[n_in] = 1
    big_a = a.new_zeros(n_in + bias, n_in + bias)
    for _, x in _padded_chunks(module, a, chunk):
        view = conv_patches(module, x, padded=True).permute(1, 2, 3, 0, 4, 5)  # (C_in, kh, kw, n, H_out, W_out)
        if s > 1:
            view = view[..., j // s::s, j % s::s]
        m = cols[:, :view[0, 0, 0].numel()]
        m[:n_in].view(view.shape).copy_(view)
        big_a.addmm_(m, m.T)
    g = g.transpose(1, 2).reshape(-1, g.shape[1])
    return big_a.mul_(s * s / b), (g.T @ g) * (scale * scale / (b * t))


def normalized_input(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    """``x_hat`` of a LayerNorm / GroupNorm: its output without the affine map, same statistics."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return F.group_norm(x, module.num_groups, None, None, module.eps)


def batch_norm_input(module: nn.Module, x: Tensor, output: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm's input with the per-channel ``(mean, 1/std)`` its forward pass normalised it by.

    Training mode (or no running statistics): the batch's, read from the forward's autograd node
    (``save_mean``, ``save_invstd``) instead of a second pass over ``x``, or computed where the node
    does not expose them. Eval mode: the running ones. ``x_hat`` itself is never formed.
    """
    if not (module.training or module.running_mean is None):
        return x, module.running_mean.clone(), (module.running_var + module.eps).rsqrt()
    node, c = output.grad_fn, x.shape[1]
    mean, invstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
    if not (isinstance(mean, Tensor) and isinstance(invstd, Tensor) and mean.shape == invstd.shape == (c,)):
        var, mean = torch.var_mean(x.transpose(0, 1).reshape(c, -1), dim=1, correction=0)
        invstd = (var + module.eps).rsqrt()
    return x, mean, invstd


def batch_norm_grad_squared(module: nn.Module, saved: tuple[Tensor, Tensor, Tensor], g: Tensor,
                            scale: float) -> tuple[Tensor, Tensor | None]:
    """``norm_grad_squared`` of a BatchNorm from ``batch_norm_input``: ``x_hat = (x - mean) * invstd`` per channel.

    Example i's gamma gradient ``invstd (sum_t ds_{i,t} x_{i,t} - mean sum_t ds_{i,t})``: one product pass over
    ``x``, the centring and scaling per channel after the sums.
    """
    x, mean, invstd = saved
    b, c = g.shape[0], g.shape[1]
    g, x = g.reshape(b, c, -1), x.reshape(b, c, -1)
    g_sum, gx_sum = g.new_empty(b, c), g.new_empty(b, c)
    chunk = max(1, min(_limits(g).norm // g[0].numel(), b))
    prod = _scratch.get("norm_product", (chunk, c, g.shape[2]), g)
    for i in range(0, b, chunk):  # both sums while the chunk of g is in cache
        n = min(chunk, b - i)
        torch.sum(g[i:i + n], 2, out=g_sum[i:i + n])
        torch.sum(torch.mul(g[i:i + n], x[i:i + n], out=prod[:n]), 2, out=gx_sum[i:i + n])
    k = scale * scale / b
    sq_w = k * ((gx_sum - mean * g_sum) * invstd).square().sum(0)
    sq_b = k * g_sum.square().sum(0) if module.bias is not None else None
    return sq_w, sq_b


def norm_grad_squared(module: nn.Module, x_hat: Tensor, g: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """``mean_i g_i**2`` of a normalisation layer's ``(weight, bias)`` from ``x_hat`` and ``G = dL/dy``.

    Example i's gradients are ``sum_t ds_{i,t} x_hat_{i,t}`` and ``sum_t ds_{i,t}`` with
    ``ds = scale * G``, summed over the positions t that share one affine entry: every dim but
    the batch and the channel (dim 1) for GroupNorm, the leading dims for LayerNorm.
    """
    b, shape = g.shape[0], module.weight.shape
    if isinstance(module, nn.LayerNorm):
        prod, g = (g * x_hat).reshape(b, -1, shape.numel()), g.reshape(b, -1, shape.numel())
    else:
        prod, g = (g * x_hat).reshape(b, shape[0], -1).transpose(1, 2), g.reshape(b, shape[0], -1).transpose(1, 2)
    c = scale * scale / b
    sq_w = c * prod.sum(1).square().sum(0)
    sq_b = c * g.sum(1).square().sum(0) if module.bias is not None else None
    return sq_w.view(shape), sq_b.view(shape) if sq_b is not None else None


class Rule(NamedTuple):
    """How one module type feeds the hooks: what the forward hook keeps, and the two statistics."""

    saved_input: Callable[[nn.Module, Tensor, Tensor], object]  # (module, input, output) -> what the rules get
    diag: Callable[[nn.Module, object, Tensor, float], tuple[Tensor, Tensor | None]]
    kfac: Callable[[nn.Module, object, Tensor, float], tuple[Tensor, Tensor | None]]
    check: Callable[[str, nn.Module], None] | None = None


def _identity(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    return x


_BATCH_NORM_RULE = Rule(batch_norm_input, batch_norm_grad_squared, batch_norm_grad_squared)
_NORM_RULE = Rule(normalized_input, norm_grad_squared, norm_grad_squared)
#: module type -> rule, looked up by ``isinstance`` in this order (subclasses such as the Bayesian layers match)
RULES: dict[type, Rule] = {
    nn.Linear: Rule(_identity, grad_squared, kfac_factors),
    nn.Conv2d: Rule(_identity, grad_squared, kfac_factors, _check_conv),
    nn.modules.batchnorm._BatchNorm: _BATCH_NORM_RULE,
    nn.LayerNorm: _NORM_RULE,
    nn.GroupNorm: _NORM_RULE,
}
SUPPORTED = "Linear, Conv2d, BatchNorm1d/2d/3d, LayerNorm, GroupNorm"


def rule_for(module: nn.Module) -> Rule | None:
    """The curvature rule of ``module``'s type (``None``: the type has none)."""
    if isinstance(module, nn.SyncBatchNorm):
        return None
    for kind, rule in RULES.items():
        if isinstance(module, kind):
            return rule
    return None
def kfac_cross_factors(module: nn.Module, a: Tensor, g: Tensor, nxt: nn.Module, a_next: Tensor, g_next: Tensor,
                       scale: float) -> tuple[Tensor, Tensor]:
    """Cross factors of two adjacent Linear layers (MATH.md, "Block-tridiagonal"), normalised as ``kfac_factors``.

    ``A_cross = mean_i sum_t a_t a_next_t^T`` (in' x in_next', each with its homogeneous 1) and
    ``G_cross = mean_i (1/T) sum_t ds_t ds_next_t^T`` (out x out_next).
    """
    a, g = layer_patches(module, a, g)
    a_next, g_next = layer_patches(nxt, a_next, g_next)
    b, t, _ = a.shape
    if module.bias is not None:
        a = homogeneous(a)
    if nxt.bias is not None:
        a_next = homogeneous(a_next)
    a, a_next = a.reshape(-1, a.shape[-1]), a_next.reshape(-1, a_next.shape[-1])
    g, g_next = g.reshape(-1, g.shape[-1]), g_next.reshape(-1, g_next.shape[-1])
    return (a.T @ a_next) / b, (g.T @ g_next) * (scale * scale / (b * t))


class CurvatureCapture:
    """Hooks that accumulate a curvature statistic on backward passes through a model.

    ``kind`` is ``"diag"`` (squared per-example gradients per parameter), ``"kfac"`` (``(A, S)``
    per layer) or ``"none"`` (only count). Every ordinary backward pass is counted in
    ``passes[module]``: several Monte-Carlo samples (forward/backward pairs) before one
    optimizer step are averaged by the consumer. Statistics are added to ``stats[module]``
    while ``active`` (K-FAC switches it off on steps that take no statistics); with
    ``fisher="true"`` they come only from the sampled-label pass (``sampled_label_backward``),
    with ``"example"`` (the empirical Fisher: the data's labels) from the ordinary passes. The loss
    is assumed to be the *mean* over the batch of per-example losses.

    A layer's input is held from its forward pass until the first ordinary backward pass through it
    (the sampled-label pass, which comes first, uses it too), not as long as the graph lives: held
    longer, every layer's input stayed allocated until the next step, and the allocator returned and
    page-faulted that memory at each step (ResNet-20, 1 thread: about 100 ms of a 630 ms step). A
    second ordinary backward through a retained graph is counted but adds no statistic.
    """

    def __init__(self, model: nn.Module, kind: str, fisher: str = "example") -> None:
        if kind not in ("diag", "kfac", "none"):
            raise ValueError(f"kind must be 'diag', 'kfac' or 'none', got {kind!r}")
        if fisher not in ("example", "true"):
            raise ValueError(f"fisher must be 'example' (the data's labels) or 'true' (sampled labels), got {fisher!r}")
        self.kind = kind
        self.fisher = fisher
        self.layers = supported_layers(model)
        self.active = kind != "none"
        #: ``(s, j)``: convolutions take their K-FAC ``A`` from output-location grid j of stride s (None: all)
        self.locations: tuple[int, int] | None = None
        self.in_sampled_pass = False
        self.stats: dict[nn.Module, list[Tensor | None]] = {}
        self.counts: dict[nn.Module, int] = {}
        self.passes: dict[nn.Module, int] = {}
        self.names = {m: n for n, m in self.layers}
        self.rules = {m: rule_for(m) for _, m in self.layers}
        self._called: set[nn.Module] | None = None  # modules run so far in the current forward of ``model``
        # cross factors of adjacent layers (K-FAC only): upstream -> downstream, and the
        # downstream layer's (a, g) kept until the upstream one's gradient arrives in the same pass
        self.cross_next: dict[nn.Module, nn.Module] = {}
        self.cross_stats: dict[nn.Module, list[Tensor]] = {}
        self.cross_counts: dict[nn.Module, int] = {}
        self._held: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._holds: set[nn.Module] = set()
        self._handles = [m.register_forward_hook(self._forward_hook) for _, m in self.layers]
        self._handles += [model.register_forward_pre_hook(self._start_pass),
                          model.register_forward_hook(self._end_pass, always_call=True)]

    def _start_pass(self, model: nn.Module, inputs: tuple) -> None:
        self._called = set()

    def _end_pass(self, model: nn.Module, inputs: tuple, output: object) -> None:
        self._called = None

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        if self._called is not None:
            if module in self._called:
                self._called = None
                raise ValueError(f"layer {self.names[module]!r} ({type(module).__name__}) is called more than "
                                 "once in one forward pass (shared weights); per-example curvature of a shared "
                                 "layer is not supported: give each use its own layer")
            self._called.add(module)
        saved = [None]  # emptied by the ordinary backward pass, so the graph does not keep the input alive
        if self.kind != "none" and self.active:
            saved[0] = self.rules[module].saved_input(module, inputs[0].detach(), output)
        output.register_hook(lambda g: self._on_grad(module, saved, g))

    @torch.no_grad()
    def _on_grad(self, module: nn.Module, saved: list, g: Tensor) -> None:
        a = saved[0]
        if not self.in_sampled_pass:
            self.passes[module] = self.passes.get(module, 0) + 1
            saved[0] = None
        if a is None or not self.active or self.in_sampled_pass != (self.fisher == "true"):
            return
        rule = self.rules[module]
        fn = rule.diag if self.kind == "diag" else rule.kfac
        if self.locations is not None and self.kind == "kfac" and isinstance(module, nn.Conv2d):
            new = fn(module, a, g.detach(), float(g.shape[0]), self.locations)
        else:
            new = fn(module, a, g.detach(), float(g.shape[0]))
        if self.cross_next:
            self._on_cross(module, a, g.detach())
        old = self.stats.get(module)
        if old is None:
            self.stats[module] = list(new)
            self.counts[module] = 1
        else:
            for acc, x in zip(old, new):
                if acc is not None:
                    acc += x
            self.counts[module] += 1

    def track_pairs(self, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
        """Also accumulate the cross factors (``kfac_cross_factors``) of these adjacent layer pairs."""
        if self.kind != "kfac":
            raise ValueError("cross factors need kind='kfac'")
        self.cross_next.update(dict(pairs))
        self._holds.update(n for _, n in pairs)

    def _on_cross(self, module: nn.Module, a: Tensor, g: Tensor) -> None:
        # the downstream layer's gradient arrives first (the upstream one's is computed from it)
        nxt = self.cross_next.get(module)
        held = self._held.pop(nxt, None) if nxt is not None else None
        if module in self._holds:
            self._held[module] = (a, g)
        if held is None:
            return
        new = kfac_cross_factors(module, a, g, nxt, *held, float(a.shape[0]))
        old = self.cross_stats.get(module)
        if old is None:
            self.cross_stats[module], self.cross_counts[module] = list(new), 1
        else:
            for acc, x in zip(old, new):
                acc += x
            self.cross_counts[module] += 1

    def pop_cross(self, module: nn.Module) -> list[Tensor] | None:
        """The mean cross factors ``(A_cross, G_cross)`` of ``module`` and its downstream layer since the last pop."""
        stat = self.cross_stats.pop(module, None)
        if stat is None:
            return None
        n = self.cross_counts.pop(module)
        return stat if n == 1 else [s / n for s in stat]

    def pop(self, module: nn.Module) -> list[Tensor | None] | None:
        """The mean statistic of ``module`` over the backward passes since the last pop."""
        stat = self.stats.pop(module, None)
        if stat is None:
            return None
        n = self.counts.pop(module)
        return stat if n == 1 else [s / n if s is not None else None for s in stat]

    def pop_passes(self, module: nn.Module) -> int:
        """How many ordinary backward passes reached ``module`` since the last call (at least 1)."""
        return max(1, self.passes.pop(module, 0))

    def sampled_label_backward(self, logits: Tensor, params: list[Tensor]) -> None:
        """Record the statistic from a backward at labels drawn from the model's predictive.

        The "true" Fisher (docs/MATH.md, "Curvature capture"): the parameter gradients of this pass are returned by
        ``autograd.grad`` and dropped, so ``.grad`` is untouched, and the graph is retained
        for the ordinary backward that follows.
        """
        with torch.no_grad():
            y = torch.multinomial(F.softmax(logits.detach().float(), dim=-1), 1).squeeze(-1)
        self.in_sampled_pass = True
        try:
            torch.autograd.grad(F.cross_entropy(logits, y), [p for p in params if p.requires_grad],
                                retain_graph=True, allow_unused=True)
        finally:
            self.in_sampled_pass = False

    def clear(self) -> None:
        self.stats.clear()
        self.counts.clear()
        self.passes.clear()
        self.cross_stats.clear()
        self.cross_counts.clear()
        self._held.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _capture_once(model: nn.Module, kind: str, inputs: Tensor, targets: Tensor,
                  loss_fn: LossFn) -> tuple[CurvatureCapture, dict]:
    capture = CurvatureCapture(model, kind)
    try:
        loss = loss_fn(model(inputs), targets)
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        return capture, {m: capture.pop(m) for _, m in capture.layers}
    finally:
        capture.remove()


def sum_grad_squared(model: nn.Module, inputs: Tensor, targets: Tensor,
                     loss_fn: LossFn = F.cross_entropy) -> dict[str, Tensor]:
    """For every parameter name, ``mean_i (dL_i/dtheta)**2`` over the batch (one forward + backward).

    ``loss_fn(outputs, targets)`` must be the mean of the per-example losses. ``.grad`` is not touched.
    """
    capture, stats = _capture_once(model, "diag", inputs, targets, loss_fn)
    out = {}
    for name, module in capture.layers:
        stat = stats[module]
        if stat is None:
            continue
        prefix = f"{name}." if name else ""
        out[prefix + "weight"] = stat[0]
        if stat[1] is not None:
            out[prefix + "bias"] = stat[1]
    return out


def kronecker_factors(model: nn.Module, inputs: Tensor, targets: Tensor,
                      loss_fn: LossFn = F.cross_entropy) -> dict[str, tuple[Tensor, Tensor]]:
    """For every Linear/Conv2d module name, the K-FAC factors ``(A, S)`` of one batch (empirical Fisher).

    Normalisation layers have no Kronecker factors (their diagonal statistic: ``sum_grad_squared``).
    """
    capture, stats = _capture_once(model, "kfac", inputs, targets, loss_fn)
    return {name: (stats[m][0], stats[m][1]) for name, m in capture.layers
            if stats[m] is not None and not is_norm_layer(m)}
