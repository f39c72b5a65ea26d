"""Differential privacy on jacext: per-sample clipping inside the backward pass (``ClipGrad``),
a noisy optimizer (``DPSGD``), and Opacus's accountants and optimizers on top (``to_opacus``)."""

from jacext.dp.clip import ClipGrad
from jacext.dp.sgd import DPSGD, epsilon, to_opacus

__all__ = ["ClipGrad", "DPSGD", "epsilon", "to_opacus"]
