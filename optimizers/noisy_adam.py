"""Noisy Adam: natural-gradient VI for a fully factorised Gaussian posterior.

Zhang, Sun, Duvenaud, Grosse, "Noisy Natural Gradient as Variational Inference", ICML 2018,
Algorithm 1 (docs/MATH.md, "Noisy Adam and VOGN"). The prior term is taken at the *sampled* weights.
"""

from __future__ import annotations

from torch import nn

from optimizers.base import NGVI_FLAGS, PRIOR_EVERY
from optimizers.diagonal import DiagonalNGVI


class NoisyAdam(DiagonalNGVI):
    """Noisy Adam (FFG posterior).

    Args:
        model: a network of ``FFG`` Bayesian layers (``models.build_model(..., "FFG", ...)``).
        lr: step size alpha.
        betas: (beta1, beta2): momentum of ``v`` and running average of the Fisher ``f``.
        num_data: training-set size N.
        kl_weight: lambda (1 = the ELBO; < 1 tempers the posterior).
        prior_var: eta, variance of the zero-mean isotropic Gaussian prior, or ``"auto"``: learned per layer
            by empirical Bayes (each layer's ELBO maximiser, ``mean mu^2 + sigma^2`` over its entries).
        damping: extrinsic damping gamma_ex added to the denominator of the mean update only; it
            bounds the step ``lr m / (f + gamma)`` as the Fisher estimate ``f`` shrinks late in training.
        init_precision: posterior precision per weight before the first step (``None``: the prior).
            The defaults (``init_precision = 1e3``, ``beta2 = 0.9999``, ``lr = 3e-3``): sigma_0 = 0.032, a
            precision that moves towards the per-example Fisher over some 10^4 steps, and a first mean step
            ``lr / f_0 = 0.18`` (f_0 = 1/60 at N = 60000). On a network with normalisation layers use
            ``normalized_defaults`` (IVON's optimisation: 6e4, 0.99999, 0.1), as ``train.py`` does;
            docs/MATH.md, "Noisy Adam and VOGN".
        fisher: ``"example"`` (mean of per-example squared gradients: the diagonal empirical
            Fisher) or ``"batch"`` (square of the mini-batch gradient, as in Vadam and the first
            seed's code: about 1/B of the Fisher plus the squared mean, so a wider posterior) or
            ``"hessian"`` (the reparameterisation estimate ``g * (w - mu) / sigma**2`` of the expected
            Hessian, as in IVON; no per-example pass; point-estimate norm layers, which draw no
            noise, take ``g**2`` instead).
        norm_posterior: affine parameters of normalisation layers: ``"point"`` (the same step,
            no noise; default) or ``"gaussian"`` (sampled like every other weight).
        prior_every: with ``prior_var="auto"``, steps between the estimates of eta (the first after
            ``prior_every`` steps at eta = 1).
        warm_start: ``f`` is the plain mean of the batches' curvature estimates until the running average's
            window ``1 / (1 - beta2)`` fills (rate ``max(1 - beta2, 1/k)`` at step k), so the posterior follows
            the data from the first step and ``init_precision`` sets only the first step's sigma
            (docs/MATH.md, "Noisy Adam and VOGN"); not with ``fisher="hessian"``.
    """

    prior_at_sample = True
    cli_name = "noisy_adam"
    cli_flags = {**NGVI_FLAGS, "momentum": "betas[0]", "beta2": "betas[1]", "warm_start": "warm_start"}

    def __init__(self, model: nn.Module, lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.9999),
                 num_data: int = 60000, kl_weight: float = 1.0, prior_var: float | str = 1.0, damping: float = 1e-3,
                 init_precision: float | None = 1e3, fisher: str = "example", norm_posterior: str = "point",
                 prior_every: int = PRIOR_EVERY, warm_start: bool = False) -> None:
        super().__init__(model, lr, betas, num_data, kl_weight, prior_var, damping, init_precision, fisher,
                         norm_posterior, prior_every, warm_start)
