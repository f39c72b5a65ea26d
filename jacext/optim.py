"""Optimizers that consume what jacext's extensions fill in the same backward pass."""

from jacext.dp import DPSGD

__all__ = ["DPSGD"]
