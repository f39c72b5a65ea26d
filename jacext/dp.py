"""Differentially private SGD on top of jacext: per-sample clipping in the backward pass.

Norm-only path (``ClipGrad``): jacext computes every sample's gradient norm ||g_n||
(BatchL2Grad's norm rules: no per-sample gradients in memory for Linear, Conv and Embedding)
and scales sample n by

    w_n = min(1, C / (||g_n|| + 1e-6))

so that ``p.grad`` comes out as the clipped sum sum_n w_n g_n (g_n the gradient of sample n's
own loss: a "mean" loss is undone by N first). Where every recorded call can be fused
(jacext.fused), in one backward pass: the layers' parameter gradients are formed from the
scaled cotangents once the norms are known. Elsewhere, when the backward reaches the model
output, jacext pulls the cotangent back for the norms and rescales it per sample before the
ordinary backward continues. ``DPSGD`` then adds N(0, (sigma C)^2) noise, divides by the
expected batch size and steps.

Materialising path with Opacus: ``BatchGrad`` plus ``to_opacus(model, loss_reduction)`` fills
``p.grad_sample`` so that Opacus's ``DPOptimizer`` (and its Poisson ``DPDataLoader``) work on
top of jacext. Privacy accounting always comes from Opacus's accountants (the ``dp`` extra).
"""

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from jacext.errors import JacextError
from jacext.extensions import JacextExtension


class ClipGrad(JacextExtension):
    """Clip every sample's gradient to norm ``max_grad_norm`` inside the backward pass.

    After ``loss.backward()``, ``p.grad`` is the sum of the clipped per-sample gradients and
    ``p.per_sample_l2`` each sample's squared gradient norm for p before clipping. With
    ``loss_reduction="mean"`` (the loss divides by N) per-sample gradients are those of the
    individual losses, as in Opacus.
    """

    savefield = "per_sample_l2"
    kind = "loss"
    needs_block = False

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

    def rescale(self, grad: Tensor, stored) -> Tensor:
        """A cotangent (N, ...) with sample n scaled by its weight."""
        n = grad.shape[0]
        return grad * self.weights(n, stored, grad).view(n, *[1] * (grad.dim() - 1)).to(grad.dtype)

    def __repr__(self) -> str:
        return f"jacext.ClipGrad(max_grad_norm={self.max_grad_norm}, loss_reduction={self.loss_reduction!r})"


class DPSGD(torch.optim.SGD):
    """SGD on privatised gradients: ``p.grad`` (a clipped sum, from ``ClipGrad``) plus Gaussian
    noise of standard deviation ``noise_multiplier * max_grad_norm``, divided by
    ``expected_batch_size``; then torch's SGD step (momentum, weight decay as usual).

    Noise comes from ``torch.normal`` with the optional ``generator`` (not Opacus's
    ``secure_mode`` sampling). ``accountant`` (an Opacus accountant, e.g.
    ``opacus.accountants.RDPAccountant()``) is told of every step when ``sample_rate`` is given.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        sample_rate: Optional[float] = None,
        accountant=None,
        generator: Optional[torch.Generator] = None,
        **sgd_options,
    ):
        super().__init__(params, lr=lr, **sgd_options)
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.sample_rate = sample_rate
        self.accountant = accountant
        self.generator = generator

    @torch.no_grad()
    def privatise(self) -> None:
        """p.grad <- (p.grad + N(0, (sigma C)^2)) / expected_batch_size, for every parameter."""
        std = self.noise_multiplier * self.max_grad_norm
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p.grad is None:  # an empty batch, or a parameter the loss does not reach
                    p.grad = torch.zeros_like(p)
                noise = torch.normal(0.0, std, p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
                p.grad.add_(noise).div_(self.expected_batch_size)

    def step(self, closure=None):
        self.privatise()
        if self.accountant is not None and self.sample_rate is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return super().step(closure)


def to_opacus(model: nn.Module, loss_reduction: str = "mean") -> None:
    """Set ``p.grad_sample`` from jacext's ``p.grad_batch`` in the form Opacus's DPOptimizer reads:
    gradients of the individual losses (``grad_batch`` times N for a "mean" loss)."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not hasattr(p, "grad_batch"):
            raise JacextError(
                f"parameter '{name}' has no grad_batch: run the backward pass inside backpack(jacext.BatchGrad())"
            )
        vars(p)["grad_sample"] = p.grad_batch * (p.grad_batch.shape[0] if loss_reduction == "mean" else 1)


def epsilon(accountant, delta: float) -> float:
    """The privacy spent so far, from an Opacus accountant."""
    return float(accountant.get_epsilon(delta=delta))
