"""Bayesian layers and the architectures (the seeds' three and ResNet-20)."""

from models.architectures import ARCHS, NORMALIZED_ARCHS, POSTERIORS, bayesianize, build_model
from models.bayesian_layers import (
    BAYESIAN_POSTERIORS,
    BayesianBatchNorm1d,
    BayesianBatchNorm2d,
    BayesianBatchNorm3d,
    BayesianConv2d,
    BayesianGroupNorm,
    BayesianLayer,
    BayesianLayerNorm,
    BayesianLinear,
    BayesianNorm,
    bayesian_layers,
    bayesian_norm,
)
from models.weight_samples import sampling

__all__ = [
    "ARCHS", "BAYESIAN_POSTERIORS", "NORMALIZED_ARCHS", "POSTERIORS", "BayesianBatchNorm1d", "BayesianBatchNorm2d",
    "BayesianBatchNorm3d", "BayesianConv2d", "BayesianGroupNorm", "BayesianLayer", "BayesianLayerNorm",
    "BayesianLinear", "BayesianNorm", "bayesian_layers", "bayesian_norm", "bayesianize", "build_model", "sampling",
]
