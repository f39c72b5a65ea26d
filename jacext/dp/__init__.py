"""Differential privacy on jacext: per-sample clipping inside the backward pass (``ClipGrad``,
``PerLayerClipGrad``; ``clipped_grad_batch`` for the clipped per-sample gradients), a noisy
optimizer (``DPSGD``, ``DPOptimizer`` around any torch optimizer), Opacus's ``PrivacyEngine``
interface on top (``PrivacyEngine``, ``PrivateModule``, ``BatchMemoryManager``), and Opacus's
accountants and optimizers (``to_opacus``)."""

from jacext.dp.clip import ClipGrad, PerLayerClipGrad, clipped_grad_batch
from jacext.dp.data import BatchMemoryManager
from jacext.dp.engine import PrivacyEngine
from jacext.dp.module import PrivateModule
from jacext.dp.optimizer import DPOptimizer
from jacext.dp.sgd import DPSGD, epsilon, to_opacus

__all__ = [
    "ClipGrad",
    "PerLayerClipGrad",
    "clipped_grad_batch",
    "DPSGD",
    "DPOptimizer",
    "PrivacyEngine",
    "PrivateModule",
    "BatchMemoryManager",
    "epsilon",
    "to_opacus",
]
