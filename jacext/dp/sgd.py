"""Differentially private SGD on top of ClipGrad's clipped sums: noise, the step, and Opacus's pieces.

``ClipGrad`` (jacext.dp.clip) leaves ``p.grad`` as the clipped sum sum_n w_n g_n; ``DPSGD`` then
adds N(0, (sigma C)^2) noise, divides by the expected batch size and steps.

Materialising path with Opacus: ``BatchGrad`` plus ``to_opacus(model, loss_reduction)`` fills
``p.grad_sample`` so that Opacus's ``DPOptimizer`` (and its Poisson ``DPDataLoader``) work on
top of jacext. Privacy accounting always comes from Opacus's accountants (the ``dp`` extra).
"""

from typing import Iterable, Optional

import torch
from torch import nn

from jacext.errors import JacextError


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
