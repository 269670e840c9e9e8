"""Bayesian ``Linear``, ``Conv2d`` and normalisation layers with a Gaussian posterior over their weights.

The posterior mean is the ordinary ``weight`` / ``bias`` parameter, so ``.to()``,
``state_dict``, DDP and hooks work unchanged. The posterior *scale* lives in buffers and is
written by the optimizer after every step (the "two-step update" of the first seed):

* ``FFG`` (fully factorised Gaussian): ``weight_sigma`` / ``bias_sigma``, one std per entry.
* ``MVG`` (matrix-variate Gaussian): the layer is viewed as one matrix
  ``W = [weight.view(out, -1) | bias]`` (out x in', the bias is the homogeneous last column)
  and its noise is drawn as ``U (E * R) V`` with ``E ~ N(0, I)``. ``U`` (out x out) and
  ``V`` (in' x in') are square roots of the two Kronecker factors' inverses and ``R`` (out x in')
  an elementwise scale. This one form covers the paper's factored damping
  (``U = L_S^-T, V = L_A^-1, R = c``), the exact eigenbasis damping
  (``U = Q_S, V = Q_A^T, R = c / sqrt(d_S d_A^T + gamma)``) and low-rank factors
  (``U``, ``V`` = ``iso I + Q diag(coef) Q^T``), and gives the marginal variances in closed
  form: ``Var[W_ij] = ((U*U) (R*R) (V*V))_ij``. ``U`` and ``V`` are stored as a ``FactorRoot``
  each (docs/MATH.md, "Noisy K-FAC"): a dense matrix, a Cholesky factor ``L`` applied by triangular
  solves (``U = L^-T``, ``V = L^-1``, never formed), or a low-rank-plus-isotropic matrix applied
  in O(n K).

In ``train()`` mode every forward pass draws a fresh weight sample ``w = mu + noise`` with the
noise detached, so the gradient w.r.t. the sample lands on the mean's ``.grad``; the noise is recorded in
the layer's ``step_noise`` (``StepNoise``) for the optimizer's prior term. In ``eval()``
mode the layer uses the mean, unless ``sample_in_eval`` is set (a fresh sample per forward). While
``fixed_noise`` is set, every forward uses that one sample (an evaluation's networks). With
``track_noise_grad`` set (the diagonal optimizers' ``fisher="hessian"``), a hook on each sample
also averages ``g * noise`` over the backward passes (``pop_noise_grad``), where ``g`` is that
pass's gradient w.r.t. the sample: the numerator of the reparameterisation Hessian estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.kronecker import ROOT_KINDS, FactorRoot

#: the posteriors a Bayesian layer holds (``models.POSTERIORS`` adds the point estimate MAP)
BAYESIAN_POSTERIORS = ("FFG", "MVG")

#: one sample's ``(weight_noise, bias_noise)``
LayerNoise = tuple[Tensor, Tensor | None]


def standard_normal(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``N(0, I)`` of ``shape`` with ``like``'s dtype and device, from the global RNG or from ``generator``.

    A generator's numbers are drawn on the generator's device and then moved, so a CPU generator gives the
    same draw whatever device the layer lives on.
    """
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


class StepNoise:
    """A layer's weight noise between two optimizer steps, in one plain object (``BayesianLayer.step_noise``).

    Written at every sampled forward, so its fields are slots of a plain object: a layer attribute would go
    through ``nn.Module.__setattr__``, whose checks cost more than the rest of the bookkeeping.

    * ``last``: the last sample's noise; ``mean``, ``count``: the mean noise of the samples since the optimizer
      last took it (``pop_mean``; its prior term ``gamma_in w`` at the sampled weights, docs/MATH.md) and their
      number.
    * ``joint``: noise handed over by a joint draw over several layers (``models.joint_posterior``), used by
      the next sample.
    * ``grad``, ``grad_count``: the mean of ``g * noise`` per parameter (weight, bias) over the backward passes
      (``fisher="hessian"``), where ``g`` is the pass's gradient w.r.t. the sample.
    """

    __slots__ = ("last", "mean", "count", "joint", "grad", "grad_count")

    def __init__(self) -> None:
        self.last: LayerNoise | None = None
        self.mean: LayerNoise | None = None
        self.count = 0
        self.joint: LayerNoise | None = None
        self.grad: list[Tensor | None] = [None, None]
        self.grad_count = [0, 0]

    def record(self, wn: Tensor, bn: Tensor | None) -> None:
        """Keep a new sample's noise as ``last`` and average it into ``mean``."""
        self.last = (wn, bn)
        if self.mean is None:
            self.mean, self.count = (wn, bn), 1
        else:
            self.count = n = self.count + 1
            self.mean = tuple(old + (new - old) / n if new is not None else None
                              for old, new in zip(self.mean, (wn, bn)))

    def pop_mean(self) -> LayerNoise | None:
        """``mean`` (None: no sample since the last call), then cleared."""
        out, self.mean = self.mean, None
        return out

    @torch.no_grad()
    def add_grad(self, i: int, g: Tensor, noise: Tensor) -> None:
        """Average ``g * noise`` of parameter ``i`` (0 weight, 1 bias) into ``grad``."""
        self.grad_count[i] += 1
        old, new = self.grad[i], g * noise
        self.grad[i] = new if old is None else old.add_(new.sub_(old), alpha=1 / self.grad_count[i])

    def pop_grad(self) -> tuple[Tensor | None, Tensor | None]:
        """``grad`` (weight, bias), then cleared."""
        out = tuple(self.grad)
        if any(self.grad_count):
            self.grad, self.grad_count = [None, None], [0, 0]
        return out


class BayesianLayer:
    """Mixin holding the posterior scale and the sampling logic shared by both layer types."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    posterior: str
    sample_in_eval: bool
    #: the noise of the samples since the last optimizer step
    step_noise: StepNoise
    #: the entrywise marginal variance (out x in') when the layer's noise is part of a joint draw
    joint_variance: Callable[[], Tensor] | None = None
    #: noise every forward uses while set, in any mode (one network of an evaluation, ``models.weight_samples``)
    fixed_noise: LayerNoise | None = None

    def _init_posterior(self, posterior: str, init_std: float) -> None:
        if posterior not in BAYESIAN_POSTERIORS:
            raise ValueError(f"posterior must be one of {BAYESIAN_POSTERIORS}, got {posterior!r}")
        self.posterior = posterior
        self.sample_in_eval = False
        self.step_noise = StepNoise()
        self.track_noise_grad = False
        w = self.weight
        out = w.shape[0]
        if posterior == "FFG":
            self.register_buffer("weight_sigma", torch.full_like(w, init_std))
            self.register_buffer(
                "bias_sigma", torch.full_like(self.bias, init_std) if self.bias is not None else None
            )
        else:
            n_in = self.matrix_shape[1]
            for side, n in (("out", out), ("in", n_in)):
                # ``{side}_scale`` is FactorRoot.mat (n x n, or n x K for low rank); the other three
                # complete the FactorRoot; ``_root_kinds`` mirrors ``{side}_kind`` without a device sync
                self.register_buffer(f"{side}_scale", torch.eye(n, dtype=w.dtype, device=w.device))
                self.register_buffer(f"{side}_coef", torch.zeros(0, dtype=w.dtype, device=w.device))
                self.register_buffer(f"{side}_iso", torch.zeros((), dtype=w.dtype, device=w.device))
                self.register_buffer(f"{side}_kind", torch.zeros((), dtype=torch.long, device=w.device))
            self._root_kinds = ["dense", "dense"]
            self.register_buffer("mid_scale", torch.full((out, n_in), init_std, dtype=w.dtype, device=w.device))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of the layer as one matrix: (out, in [+1 for the bias])."""
        w = self.weight
        return w.shape[0], w[0].numel() + (self.bias is not None)

    # -- posterior scale, written by the optimizers ---------------------------------------
    @torch.no_grad()
    def set_ffg_posterior(self, weight_std: Tensor, bias_std: Tensor | None = None) -> None:
        """Set the per-entry std of a fully factorised posterior."""
        self.weight_sigma.copy_(weight_std)
        if self.bias is not None and bias_std is not None:
            self.bias_sigma.copy_(bias_std)

    @torch.no_grad()
    def set_mvg_posterior(self, out_scale: Tensor | FactorRoot, in_scale: Tensor | FactorRoot,
                          mid_scale: Tensor | float) -> None:
        """Set the matrix-variate posterior: noise = out_scale (E * mid_scale) in_scale (a Tensor = dense side)."""
        for i, (side, root) in enumerate((("out", out_scale), ("in", in_scale))):
            if isinstance(root, Tensor):
                root = FactorRoot("dense", root)
            mat = getattr(self, f"{side}_scale")
            if mat.shape != root.mat.shape:
                mat = mat.new_empty(root.mat.shape)  # contiguous, as a loaded checkpoint's buffer is
                setattr(self, f"{side}_scale", mat)
            mat.copy_(root.mat)
            coef = root.coef if root.coef is not None else root.mat.new_zeros(0)
            setattr(self, f"{side}_coef", coef.to(dtype=mat.dtype, device=mat.device, copy=True))
            getattr(self, f"{side}_iso").fill_(root.iso)
            getattr(self, f"{side}_kind").fill_(ROOT_KINDS.index(root.kind))
            self._root_kinds[i] = root.kind
        if isinstance(mid_scale, Tensor):
            self.mid_scale.copy_(mid_scale)
        else:
            self.mid_scale.fill_(mid_scale)

    def factor_roots(self) -> tuple[FactorRoot, FactorRoot]:
        """The MVG noise's ``(U, V)``."""
        return tuple(FactorRoot(kind, getattr(self, f"{side}_scale"), getattr(self, f"{side}_coef"),
                                getattr(self, f"{side}_iso"))
                     for side, kind in zip(("out", "in"), self._root_kinds))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.posterior == "MVG":
            for side in ("out", "in"):
                # the stored form decides the shapes (n x K for low rank); older checkpoints hold dense sides
                state_dict.setdefault(prefix + f"{side}_kind", torch.zeros((), dtype=torch.long))
                state_dict.setdefault(prefix + f"{side}_iso", torch.zeros(()))
                state_dict.setdefault(prefix + f"{side}_coef", torch.zeros(0))
                for name in (f"{side}_scale", f"{side}_coef"):
                    new, own = state_dict.get(prefix + name), getattr(self, name)
                    if isinstance(new, Tensor) and new.shape != own.shape:
                        setattr(self, name, own.new_empty(new.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.posterior == "MVG":  # read from the loaded (CPU) tensors: no device sync
            self._root_kinds = [ROOT_KINDS[int(state_dict[prefix + f"{side}_kind"])] for side in ("out", "in")]

    # -- sampling ---------------------------------------------------------------------------
    def _split_matrix(self, m: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.bias is None:
            return m.view_as(self.weight), None
        return m[:, :-1].reshape_as(self.weight), m[:, -1]

    def sample_noise(self, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """One draw of ``(weight_noise, bias_noise)`` from the zero-mean posterior (the global RNG or ``generator``)."""
        with torch.no_grad():
            if self.posterior == "FFG":
                wn = standard_normal(self.weight.shape, self.weight, generator).mul_(self.weight_sigma)
                bn = (standard_normal(self.bias.shape, self.bias, generator).mul_(self.bias_sigma)
                      if self.bias is not None else None)
                return wn, bn
            e = standard_normal(self.mid_scale.shape, self.mid_scale, generator).mul_(self.mid_scale)
            out_root, in_root = self.factor_roots()
            return self._split_matrix(in_root.right(out_root.left(e)))

    def sample_weight(self) -> tuple[Tensor, Tensor | None]:
        """One fresh ``(weight, bias)`` sample; differentiable w.r.t. the means.

        With autograd on, the noise is recorded in ``step_noise`` (``last``, ``mean``).
        """
        noise = self.step_noise
        if noise.joint is not None:
            (wn, bn), noise.joint = noise.joint, None
        else:
            wn, bn = self.sample_noise()
        if torch.is_grad_enabled():
            noise.record(wn, bn)
        w = self.weight + wn
        b = self.bias + bn if self.bias is not None else None
        if self.track_noise_grad and torch.is_grad_enabled():
            for i, (t, n) in enumerate(((w, wn), (b, bn))):
                if t is not None and t.requires_grad:
                    t.register_hook(lambda g, i=i, n=n: noise.add_grad(i, g, n))
        return w, b

    @property
    def last_noise(self) -> LayerNoise | None:
        """The noise of the last sample taken with autograd on (``step_noise.last``)."""
        return self.step_noise.last

    @last_noise.setter
    def last_noise(self, value: LayerNoise | None) -> None:
        self.step_noise.last = value

    @property
    def mean_noise(self) -> LayerNoise | None:
        """The mean noise of the samples since the optimizer last took it (``step_noise.mean``)."""
        return self.step_noise.mean

    @property
    def joint_noise(self) -> LayerNoise | None:
        """Noise handed over by a joint draw, not yet used (``step_noise.joint``)."""
        return self.step_noise.joint

    def pop_noise_grad(self) -> tuple[Tensor | None, Tensor | None]:
        """The mean of ``g * noise`` (weight, bias) over the backward passes since the last call."""
        return self.step_noise.pop_grad()

    def pop_mean_noise(self) -> LayerNoise | None:
        """The mean noise of the samples since the last call (None: no sample), then cleared."""
        return self.step_noise.pop_mean()

    def weight_std(self) -> Tensor:
        """Marginal posterior std of every weight entry (same shape as ``weight``)."""
        return self._marginal_std()[0]

    def bias_std(self) -> Tensor | None:
        """Marginal posterior std of every bias entry (``None`` without bias)."""
        return self._marginal_std()[1]

    @torch.no_grad()
    def second_moment(self) -> tuple[float, int]:
        """``(sum of E_q[w^2] = mu^2 + Var[w] over the weight and bias entries, their number)``, in float64."""
        total, count = 0.0, 0
        for mean, std in zip((self.weight, self.bias), self._marginal_std()):
            if mean is not None:
                total += float(mean.double().square().sum() + std.double().square().sum())
                count += mean.numel()
        return total, count

    @torch.no_grad()
    def log_det_covariance(self) -> float:
        """``log det`` of the posterior covariance of the layer's entries (float64).

        FFG: ``sum log sigma^2``. MVG: the noise ``U (E * R) V`` has covariance ``(V^T (x) U) diag(R^2) (V (x) U^T)``,
        so ``2 in' log|det U| + 2 out log|det V| + sum log R^2``; an upstream layer of a chain adds the
        conditional map ``E -> E + P ((P^T E Q) * g) Q^T`` (orthonormal P, Q): ``2 sum log(1 + g)``.
        """
        if self.posterior == "FFG":
            sigmas = [self.weight_sigma] + ([self.bias_sigma] if self.bias is not None else [])
            return sum(float(s.double().square().log().sum()) for s in sigmas)
        out_root, in_root = self.factor_roots()
        out, n_in = self.matrix_shape
        value = (2 * n_in * out_root.logabsdet() + 2 * out * in_root.logabsdet()
                 + self.mid_scale.double().square().log().sum())
        gain = getattr(self, "cond_gain", None)
        if isinstance(gain, Tensor) and gain.numel():
            value = value + 2 * gain.double().log1p().sum()
        return float(value)

    @torch.no_grad()
    def _marginal_std(self) -> tuple[Tensor, Tensor | None]:
        if self.posterior == "FFG":
            return self.weight_sigma.clone(), (self.bias_sigma.clone() if self.bias is not None else None)
        if self.joint_variance is not None:
            return self._split_matrix(self.joint_variance().sqrt())
        out_root, in_root = self.factor_roots()
        var = out_root.dense(left=True).square() @ self.mid_scale.square() @ in_root.dense(left=False).square()
        return self._split_matrix(var.sqrt())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, posterior={self.posterior}"

    def _weights_for_forward(self) -> tuple[Tensor, Tensor | None]:
        if self.fixed_noise is not None:
            wn, bn = self.fixed_noise
            return self.weight + wn, (self.bias + bn if self.bias is not None else None)
        if self.training or self.sample_in_eval:
            return self.sample_weight()
        return self.weight, self.bias


class BayesianLinear(BayesianLayer, nn.Linear):
    """``nn.Linear`` whose weights are drawn from a Gaussian posterior in training mode."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, posterior: str = "FFG",
                 init_std: float = 0.0, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_posterior(posterior, init_std)

    def forward(self, input: Tensor) -> Tensor:
        w, b = self._weights_for_forward()
        return F.linear(input, w, b)


class BayesianConv2d(BayesianLayer, nn.Conv2d):
    """``nn.Conv2d`` whose kernels are drawn from a Gaussian posterior in training mode."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, posterior: str = "FFG", init_std: float = 0.0,
                 device=None, dtype=None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                           dilation=dilation, bias=bias, device=device, dtype=dtype)
        self._init_posterior(posterior, init_std)

    def forward(self, input: Tensor) -> Tensor:
        w, b = self._weights_for_forward()
        return self._conv_forward(input, w, b)


class BayesianNorm(BayesianLayer):
    """A normalisation layer whose affine ``weight`` / ``bias`` have a diagonal Gaussian posterior.

    Always fully factorised (``weight_sigma`` / ``bias_sigma``), also inside an MVG model, where
    Noisy K-FAC gives these layers a diagonal curvature (MATH.md, "Normalisation layers").
    With ``sigma = 0`` (the optimizers' ``norm_posterior="point"``) the sample is the mean.
    """

    def _init_norm_posterior(self, init_std: float) -> None:
        if self.weight is None:
            raise ValueError(f"{type(self).__name__} needs affine parameters (affine / elementwise_affine=True)")
        self._init_posterior("FFG", init_std)


class _BayesianBatchNorm(BayesianNorm):
    def forward(self, input: Tensor) -> Tensor:
        """``nn.BatchNorm``'s forward (same running-statistics update) with sampled ``weight`` / ``bias``."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        w, b = self._weights_for_forward()
        return F.batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                            w, b, batch_stats, factor, self.eps)


def _batchnorm_class(base: type) -> type:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True, init_std: float = 0.0, device=None, dtype=None) -> None:
        base.__init__(self, num_features, eps=eps, momentum=momentum, affine=True,
                      track_running_stats=track_running_stats, device=device, dtype=dtype)
        self._init_norm_posterior(init_std)

    name = f"Bayesian{base.__name__}"
    doc = f"``nn.{base.__name__}`` whose affine parameters are drawn from a Gaussian posterior in training mode."
    return type(name, (_BayesianBatchNorm, base), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


BayesianBatchNorm1d = _batchnorm_class(nn.BatchNorm1d)
BayesianBatchNorm2d = _batchnorm_class(nn.BatchNorm2d)
BayesianBatchNorm3d = _batchnorm_class(nn.BatchNorm3d)


class BayesianLayerNorm(BayesianNorm, nn.LayerNorm):
    """``nn.LayerNorm`` whose affine parameters are drawn from a Gaussian posterior in training mode."""

    def __init__(self, normalized_shape, eps: float = 1e-5, bias: bool = True, init_std: float = 0.0,
                 device=None, dtype=None) -> None:
        nn.LayerNorm.__init__(self, normalized_shape, eps=eps, elementwise_affine=True, bias=bias, device=device,
                              dtype=dtype)
        self._init_norm_posterior(init_std)

    def forward(self, input: Tensor) -> Tensor:
        w, b = self._weights_for_forward()
        return F.layer_norm(input, self.normalized_shape, w, b, self.eps)


class BayesianGroupNorm(BayesianNorm, nn.GroupNorm):
    """``nn.GroupNorm`` whose affine parameters are drawn from a Gaussian posterior in training mode."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, init_std: float = 0.0,
                 device=None, dtype=None) -> None:
        nn.GroupNorm.__init__(self, num_groups, num_channels, eps=eps, affine=True, device=device, dtype=dtype)
        self._init_norm_posterior(init_std)

    def forward(self, input: Tensor) -> Tensor:
        w, b = self._weights_for_forward()
        return F.group_norm(input, self.num_groups, w, b, self.eps)


def bayesian_norm(module: nn.Module) -> BayesianNorm | None:
    """The Bayesian twin of a plain normalisation layer with affine parameters (``None`` for other modules).

    Parameters and buffers (running statistics) are copied.
    """
    kind = type(module)
    new: BayesianNorm | None = None
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and module.affine:
        cls = {nn.BatchNorm1d: BayesianBatchNorm1d, nn.BatchNorm2d: BayesianBatchNorm2d,
               nn.BatchNorm3d: BayesianBatchNorm3d}[kind]
        new = cls(module.num_features, eps=module.eps, momentum=module.momentum,
                  track_running_stats=module.track_running_stats)
    elif kind is nn.LayerNorm and module.elementwise_affine:
        new = BayesianLayerNorm(module.normalized_shape, eps=module.eps, bias=module.bias is not None)
    elif kind is nn.GroupNorm and module.affine:
        new = BayesianGroupNorm(module.num_groups, module.num_channels, eps=module.eps)
    if new is not None:
        new.to(module.weight)
        new.load_state_dict(module.state_dict(), strict=False)
    return new


def bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    """The model's Bayesian layers, in ``named_modules()`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BayesianLayer)]

