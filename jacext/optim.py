"""Optimizers that consume what jacext's extensions fill in the same backward pass."""

from jacext.dp import DPSGD, DPOptimizer
from jacext.natural_gradient import SR

__all__ = ["DPSGD", "DPOptimizer", "SR"]
