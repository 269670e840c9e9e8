"""Curvature rules: per layer type, what the forward hook keeps and the statistics of the backward pass.

The hooks (``optimizers.curvature.CurvatureCapture``) hand a rule the layer's input ``a`` and
``G = dL/ds``, the gradient of the (mean-reduced) mini-batch loss w.r.t. the pre-activations
(docs/MATH.md, "Curvature capture"). With ``B`` examples, example i's own loss has pre-activation
gradient ``ds_i = B G_i``. Every layer is seen as per-example "patches": ``a_i`` is (T x in) and
``ds_i`` (T x out), with T = 1 for a Linear layer on flat inputs and T = the number of output
locations for a convolution (``a_i`` = its unfolded input, Grosse & Martens 2016).

* Diagonal Fisher (Noisy Adam, VOGN): ``g_i = ds_i^T a_i``, statistic ``mean_i g_i**2``.
  For T = 1 this is ``(1/B) (ds**2)^T (a**2)``: one weight-gradient-sized product, no
  B x out x in tensor. For T > 1 the per-example gradients are formed in chunks of the batch
  (``optimizers.chunking``). The bias gradient is ``sum_t ds_{i,t}``, so its statistic is
  ``mean_i (sum_t ds_{i,t})**2``.
* Kronecker factors (Noisy K-FAC): ``A = mean_i sum_t a_t a_t^T`` (with the homogeneous 1
  appended as the last coordinate when the layer has a bias) and
  ``S = mean_i (1/T) sum_t ds_t ds_t^T``. This is the KFC normalisation; other libraries
  put the 1/T on A instead, which changes both factors by T and leaves A (x) S unchanged.
* Normalisation layers (BatchNorm1d/2d/3d, LayerNorm, GroupNorm; docs/MATH.md, "Normalisation
  layers"): ``y = gamma * x_hat + beta`` elementwise, so the forward hook keeps the normalised input
  ``x_hat`` (BatchNorm: the input with the per-channel mean and 1/std the forward pass used, held
  constant, so no second normalisation pass) and example i's gradients are
  ``sum_t ds_{i,t} x_hat_{i,t}`` and ``sum_t ds_{i,t}`` over the positions t that share one affine
  entry. They always take this diagonal statistic, also inside an MVG model (``kind="kfac"``), as
  in torchsso.

Which rule a layer takes is looked up by module type in ``RULES`` (BackPACK style), so that a new layer
type is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimizers.chunking import ChunkLimits, limits_of, scratch


# -- Linear and Conv2d -----------------------------------------------------------------------------------
def conv_patches(module: nn.Conv2d, x: Tensor, padded: bool = False) -> Tensor:
    """The input patches of a convolution as a strided *view* (B, C_in, kh, kw, H_out, W_out).

    ``conv_patches(m, x).reshape(B, C_in kh kw, H_out W_out)`` equals ``F.unfold(x, ...)``
    exactly; the view lets the caller choose the memory layout of its one copy, which on the CPU beats
    aten's ``im2col`` (``bench/per_example.py``).
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

    The padded chunks share one reused buffer (``optimizers.chunking.scratch``), so a chunk is valid until the
    next one;
    an unpadded NCHW chunk is ``a``'s own slice.
    """
    b, c_in, h, w = a.shape
    left, right, top, bottom = module._reversed_padding_repeated_twice
    if not (nhwc or left or right or top or bottom):
        yield from ((i, a[i:i + chunk]) for i in range(0, b, chunk))
        return
    hp, wp = top + h + bottom, left + w + right
    padded = scratch.get("padded", (chunk, hp, wp, c_in) if nhwc else (chunk, c_in, hp, wp), a)
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
    chunk = max(1, limits_of(a).linear // (out * n_in))
    sq_w = a.new_zeros(out, n_in)
    for i in range(0, b, chunk):
        per_example = torch.bmm(g[i:i + chunk].transpose(1, 2), a[i:i + chunk])
        sq_w += per_example.square().sum(0)
    c = scale * scale / b
    sq_b = c * g.sum(1).square().sum(0) if module.bias is not None else None
    return sq_w.mul_(c).view_as(module.weight), sq_b


def conv_grad_chunk(limits: ChunkLimits, b: int, out: int, n_in: int, t: int) -> int:
    """Examples per chunk of ``_conv_grad_squared``: its per-example gradients (chunk x out x n_in) and patches
    (chunk x n_in x T) within ``limits``, at least 1, at most the batch."""
    return max(1, min(limits.grads // (out * n_in), limits.patches // (t * n_in), b))


def _conv_grad_squared(module: nn.Conv2d, a: Tensor, g: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """``grad_squared`` of a convolution, unfolding the batch chunk by chunk.

    Each chunk is zero-padded, its patches copied from a strided view and its per-example gradients
    formed, all in reused buffers bounded by ``optimizers.chunking.chunk_limits`` (on the CPU, so that they
    stay in cache): faster and far less memory than unfolding the whole batch at once. The patch copy runs along
    contiguous rows of W_out elements from an NCHW chunk, or of kw x C_in from an NHWC copy of it; the NHWC layout is
    taken where its rows are many times longer (small feature maps, many channels), where the copy
    would otherwise cost as much as the product.
    """
    b, c_in, n_in = a.shape[0], a.shape[1], module.weight[0].numel()
    ho, wo = g.shape[2], g.shape[3]
    g = g.reshape(b, g.shape[1], -1)  # (B, out, T)
    out, t = g.shape[1], g.shape[2]
    chunk = conv_grad_chunk(limits_of(a), b, out, n_in, t)
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    nhwc = dw == 1 and kw * c_in > 8 * wo
    patches = scratch.get("patches", (chunk, t, n_in) if nhwc else (chunk, n_in, t), a)
    per_example = scratch.get("per_example", (chunk, out, n_in), a)
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
    into one reused (in [+1]) x (chunk T) matrix (bounded by ``optimizers.chunking.chunk_limits``: on the CPU,
    so that it stays in cache).

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
    chunk = max(1, min(limits_of(a).patches // ((n_in + bias) * t_grid), b))
    cols = scratch.get("kfac_cols", (n_in + bias, chunk * t_grid), a)
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


# -- normalisation layers ---------------------------------------------------------------------------------
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
    chunk = max(1, min(limits_of(g).norm // g[0].numel(), b))
    prod = scratch.get("norm_product", (chunk, c, g.shape[2]), g)
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


# -- the table -------------------------------------------------------------------------------------------
def _check_conv(name: str, module: nn.Conv2d) -> None:
    if module.groups != 1 or module.padding_mode != "zeros":
        raise ValueError(f"layer {name!r}: only Conv2d with groups=1 and zero padding has a curvature rule")


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


NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with a (diagonal) curvature rule."""
    return isinstance(module, NORM_LAYERS) and not isinstance(module, nn.SyncBatchNorm)


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
