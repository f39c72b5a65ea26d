"""Per-sample clipping inside the backward pass: ``ClipGrad``.

jacext computes every sample's gradient norm ||g_n|| (BatchL2Grad's norm rules: no per-sample
gradients in memory for Linear, Conv and Embedding) and scales sample n by

    w_n = min(1, C / (||g_n|| + 1e-6))

so that ``p.grad`` comes out as the clipped sum sum_n w_n g_n (g_n the gradient of sample n's
own loss: a "mean" loss is undone by N first). Where every recorded call can be fused
(jacext.engine.fused), in one backward pass: the layers' parameter gradients are formed from
the scaled cotangents once the norms are known. Elsewhere, when the backward reaches the model
output, jacext pulls the cotangent back for the norms and rescales it per sample before the
ordinary backward continues.
"""

import torch
from torch import Tensor

from jacext.extensions import RescalingExtension


class ClipGrad(RescalingExtension):
    """Clip every sample's gradient to norm ``max_grad_norm`` inside the backward pass.

    After ``loss.backward()``, ``p.grad`` is the sum of the clipped per-sample gradients and
    ``p.per_sample_l2`` each sample's squared gradient norm for p before clipping. With
    ``loss_reduction="mean"`` (the loss divides by N) per-sample gradients are those of the
    individual losses, as in Opacus.
    """

    savefield = "per_sample_l2"

    def __init__(self, max_grad_norm: float, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        super().__init__()
        self.max_grad_norm = max_grad_norm
        self.loss_reduction = loss_reduction

    def _per_loss(self, n: int) -> float:
        return float(n) if self.loss_reduction == "mean" else 1.0

    def finish(self, value: Tensor, out_shape: torch.Size) -> Tensor:
        return value.squeeze(1) * self._per_loss(out_shape[0]) ** 2

    def weights(self, n: int, stored, like: Tensor) -> Tensor:
        """Per sample, w_n times the 'mean' factor N, from the parameters' squared norms ``stored``."""
        norms = torch.stack(list(stored)).sum(0).sqrt() if stored else like.new_zeros(n)
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * self._per_loss(n)

    def __repr__(self) -> str:
        return f"jacext.ClipGrad(max_grad_norm={self.max_grad_norm}, loss_reduction={self.loss_reduction!r})"
