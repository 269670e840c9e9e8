"""Bayesian layers and the seeds' architectures."""

from models.architectures import ARCHS, bayesianize, build_model
from models.bayesian_layers import (
    POSTERIORS,
    BayesianConv2d,
    BayesianLayer,
    BayesianLinear,
    bayesian_layers,
    predictive,
    sampling,
)

__all__ = [
    "ARCHS", "POSTERIORS", "BayesianConv2d", "BayesianLayer", "BayesianLinear",
    "bayesian_layers", "bayesianize", "build_model", "predictive", "sampling",
]
