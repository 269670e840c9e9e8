"""VOGN: Variational Online Gauss-Newton.

Khan et al., "Fast and Scalable Bayesian Deep Learning by Weight-Perturbation in Adam",
ICML 2018; the second seed (Jain & Khan), Algorithm 1; momentum, tempering and several MC
samples per step as in Osawa et al., NeurIPS 2019 (docs/MATH.md, "Noisy Adam and VOGN")::

    s     <- beta2 s + (1 - beta2) mean_i g_i**2
    mu    <- mu - lr (g + lambda_p mu / N) / (s + lambda_p / N)
    sigma  = 1 / sqrt(N s + lambda_p)

with prior precision ``lambda_p = 1 / prior_var``. The mean update uses the *new* ``s``, as
in Khan et al. (the seed's pseudo-code writes ``s_t``). ``kl_weight`` tempers both terms
(``gamma_in = kl_weight / (N prior_var)``, ``sigma**2 = (kl_weight/N) / (s + gamma_in)``),
``momentum`` is ``beta1`` on the numerator, and each forward/backward pair before ``step()``
is one MC sample. The defaults (``lr`` 3e-3, ``beta2`` 0.9999, ``init_precision`` 1e3, and the
``normalized_defaults`` on a network with normalisation layers) are Noisy Adam's. The per-example
squared gradients come from the shared hooks, so convolution and pooling layers work without changes
to the model; ``fisher="hessian"`` replaces them by the reparameterisation Hessian estimate
(docs/MATH.md, "Noisy Adam and VOGN").
"""

from __future__ import annotations

from torch import nn

from optimizers.base import NGVI_FLAGS, PRIOR_EVERY
from optimizers.diagonal import DiagonalNGVI


class VOGN(DiagonalNGVI):
    """VOGN (FFG posterior); the prior term is taken at the mean ``mu``."""

    prior_at_sample = False
    cli_name = "vogn"
    cli_flags = {**NGVI_FLAGS, "momentum": "momentum", "beta2": "beta2", "warm_start": "warm_start"}

    def __init__(self, model: nn.Module, lr: float = 3e-3, momentum: float = 0.9, beta2: float = 0.9999,
                 num_data: int = 60000, kl_weight: float = 1.0, prior_var: float | str = 1.0, damping: float = 0.0,
                 init_precision: float | None = 1e3, fisher: str = "example", norm_posterior: str = "point",
                 prior_every: int = PRIOR_EVERY, warm_start: bool = False) -> None:
        super().__init__(model, lr, (momentum, beta2), num_data, kl_weight, prior_var, damping, init_precision,
                         fisher, norm_posterior, prior_every, warm_start)
