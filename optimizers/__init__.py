"""Natural-gradient variational inference optimizers and the shared curvature capture."""

from optimizers.base import NGVIOptimizer
from optimizers.curvature import CurvatureCapture, kronecker_factors, sum_grad_squared
from optimizers.diagonal import DiagonalNGVI
from optimizers.noisy_adam import NoisyAdam
from optimizers.noisy_kfac import NoisyKFAC
from optimizers.vogn import VOGN

__all__ = [
    "VOGN", "CurvatureCapture", "DiagonalNGVI", "NGVIOptimizer", "NoisyAdam", "NoisyKFAC",
    "kronecker_factors", "sum_grad_squared",
]
