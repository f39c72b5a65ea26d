"""Differentially private SGD on top of ClipGrad's clipped sums: noise, the step, and Opacus's pieces.

``ClipGrad`` (jacext.dp.clip) leaves ``p.grad`` as the clipped sum sum_n w_n g_n; ``DPSGD`` then
adds N(0, (sigma C)^2) noise, divides by the expected batch size and steps. It refuses a step on
gradients that no ClipGrad with its ``max_grad_norm`` produced (jacext.dp.guard).

Materialising path with Opacus: ``BatchGrad`` plus ``to_opacus(model, loss_reduction)`` fills
``p.grad_sample`` so that Opacus's ``DPOptimizer`` (and its Poisson ``DPDataLoader``) work on
top of jacext. Privacy accounting always comes from Opacus's accountants (the ``dp`` extra).
"""

from typing import Iterable, Optional

import torch
from torch import nn

from jacext.dp.guard import (
    ClipRecord,
    GradTracker,
    check_max_grad_norm,
    check_noise_multiplier,
    check_single_clipped_backward,
    owner_of,
    stamp_of,
)
from jacext.dp.optimizer import gaussian_noise
from jacext.errors import JacextError


class DPSGD(torch.optim.SGD):
    """SGD on privatised gradients: ``p.grad`` (a clipped sum, from ``ClipGrad``) plus Gaussian
    noise of standard deviation ``noise_multiplier * max_grad_norm``, divided by
    ``expected_batch_size``; then torch's SGD step (momentum, weight decay as usual).

    ``step()`` refuses gradients that a ClipGrad with this ``max_grad_norm`` did not produce in
    exactly one backward pass since the last step (or ``zero_grad()``); zero gradients (an empty
    batch) step with noise only. Gradients computed before the optimizer was made are judged by
    the ClipGrad stamp on ``p.per_sample_l2``. Noise comes from ``torch.normal`` with the optional
    ``generator`` (not Opacus's ``secure_mode`` sampling). ``accountant`` (an Opacus accountant,
    e.g. ``opacus.accountants.RDPAccountant()``) is told of every step when ``sample_rate`` is given.

    Args:
        params: the parameters.
        lr: the learning rate.
        noise_multiplier: sigma >= 0.
        max_grad_norm: C > 0, the ClipGrad's bound.
        expected_batch_size: the divisor of the noisy sum.
        sample_rate: the Poisson sampling rate, for the accountant.
        accountant: an Opacus accountant.
        generator: the noise's generator.
        **sgd_options: torch.optim.SGD's (momentum, weight_decay, ...).

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> from jacext.dp import ClipGrad
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> opt = DPSGD(model.parameters(), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=5)
        >>> with backpack(ClipGrad(1.0, loss_reduction="sum")):
        ...     model(torch.randn(5, 3)).square().sum().backward()
        >>> opt.step()
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
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be positive, got {expected_batch_size!r}")
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if accountant is not None and sample_rate is None:
            raise ValueError(
                "an accountant needs the sample_rate (the Poisson loader's, 1 / len(loader)): without it no step "
                "would be counted and the accountant would report epsilon = 0"
            )
        self.expected_batch_size = expected_batch_size
        self.sample_rate = sample_rate
        self.accountant = accountant
        self.generator = generator
        owned = [owner_of(p) for p in self._params()]
        if any(owned):
            raise JacextError(
                f"these parameters are already privatised by {next(o for o in owned if o)}: a DPSGD on top "
                "would clip and noise them twice"
            )
        self._tracker = GradTracker(self._params())

    def _params(self):
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

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
                p.grad.add_(gaussian_noise(std, p, self.generator)).div_(self.expected_batch_size)

    def _accepts(self, record: ClipRecord) -> Optional[str]:
        if record.scale is not None:
            return "it clipped under a GradScaler, whose scale DPSGD does not undo: use jacext.dp.PrivacyEngine"
        if record.max_grad_norm != self.max_grad_norm:
            return (
                f"a ClipGrad with max_grad_norm {record.max_grad_norm} ran, DPSGD's max_grad_norm is "
                f"{self.max_grad_norm}: the noise must be calibrated to the bound that clipped"
            )
        return None

    def check_gradients(self) -> None:
        """Refuse gradients that are not one ClipGrad backward pass with this ``max_grad_norm``."""
        params = self._params()
        tracked = [p for p in params if self._tracker.tasks(p) or self._tracker.stepped(p)]
        check_single_clipped_backward(self._tracker, tracked, self._accepts, "DPSGD.step")
        ids = {id(p) for p in tracked}
        for p in params:
            if id(p) in ids or p.grad is None or not bool(p.grad.any()):
                continue
            stamp = stamp_of(p)  # gradients from before this optimizer was made
            problem = (
                "no ClipGrad ran for it"
                if stamp is None
                else ("its clipped gradient was used by an earlier step" if stamp.consumed else self._accepts(stamp))
            )
            if problem:
                raise JacextError(
                    f"DPSGD.step: p.grad of a parameter of shape {tuple(p.shape)} is not known to be clipped "
                    f"({problem}). Run the forward pass inside backpack(ClipGrad({self.max_grad_norm}, ...)) "
                    "and call zero_grad() before each batch."
                )

    def step(self, closure=None):
        self.check_gradients()
        for p in self._params():
            stamp = stamp_of(p)
            if stamp is not None:
                stamp.consumed = True
        self.privatise()
        if self.accountant is not None and self.sample_rate is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        result = super().step(closure)
        self._tracker.reset(stepped=True)
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._tracker.reset()


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
