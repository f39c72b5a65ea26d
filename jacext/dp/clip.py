"""Per-sample clipping inside the backward pass: ``ClipGrad`` (flat) and ``PerLayerClipGrad``.

jacext computes every sample's gradient norm ||g_n|| (BatchL2Grad's norm rules: no per-sample
gradients in memory for Linear, Conv and Embedding) and scales sample n by

    w_n = min(1, C / (||g_n|| + 1e-6))

so that ``p.grad`` comes out as the clipped sum sum_n w_n g_n (g_n the gradient of sample n's
own loss: a "mean" loss is undone by N first). Where every recorded call can be fused
(jacext.engine.fused), in one backward pass: the layers' parameter gradients are formed from
the scaled cotangents once the norms are known. Elsewhere, when the backward reaches the model
output, jacext pulls the cotangent back for the norms and rescales it per sample before the
ordinary backward continues.

Under ``torch.amp.GradScaler`` (``grad_scaler=``) the backward computes the gradients of the
scaled loss S L: the norms are divided by S before they are compared with C, so that the bound is
C on the unscaled gradients (not C / S), and ``p.grad`` is S times the clipped sum, which the
optimizer unscales (``scaler.step(optimizer)``).

Every clipping writes a record of itself under the backward pass it ran in (jacext.dp.guard), so
that the DP optimizers can refuse a step on gradients no clipping (or another one) produced.
"""

from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from jacext.dp.guard import ClipRecord, check_loss_reduction, check_max_grad_norm, record_clip, stamp_of
from jacext.errors import JacextError
from jacext.extensions import RescalingExtension

EPS = 1e-6  # as Opacus: w = min(1, C / (||g|| + 1e-6))


class ClipGrad(RescalingExtension):
    """Clip every sample's gradient to norm ``max_grad_norm`` inside the backward pass.

    After ``loss.backward()``, ``p.grad`` is the sum of the clipped per-sample gradients and
    ``p.per_sample_l2`` each sample's squared gradient norm for p before clipping. With
    ``loss_reduction="mean"`` (the loss divides by N) per-sample gradients are those of the
    individual losses, as in Opacus. Next to it, ``jacext.BatchGrad`` gives the *unclipped*
    per-sample gradients (``p.grad_batch``, BackPACK's semantics: 1/N included for a mean loss).

    Args:
        max_grad_norm: the bound C, positive and finite.
        loss_reduction: ``"mean"`` or ``"sum"``, as the loss reduces over the batch.
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss, if any: C then bounds the
            unscaled per-sample gradients, ``p.per_sample_l2`` holds unscaled norms, and ``p.grad``
            stays scaled (the scaler unscales it).

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> with backpack(ClipGrad(1.0, loss_reduction="sum")):
        ...     model(torch.randn(5, 3)).square().sum().backward()
        >>> model.weight.per_sample_l2.shape
        torch.Size([5])
    """

    savefield = "per_sample_l2"

    def __init__(self, max_grad_norm: float, loss_reduction: str = "mean", grad_scaler=None):
        check_loss_reduction(loss_reduction)
        super().__init__()
        self.max_grad_norm = max_grad_norm
        self.loss_reduction = loss_reduction
        self.grad_scaler = grad_scaler

    @property
    def max_grad_norm(self) -> float:
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        self._max_grad_norm = check_max_grad_norm(value)

    def _per_loss(self, n: int) -> float:
        return float(n) if self.loss_reduction == "mean" else 1.0

    def finish(self, value: Tensor, out_shape: torch.Size) -> Tensor:
        return value.squeeze(1) * self._per_loss(out_shape[0]) ** 2

    def loss_scale(self) -> Optional[Tensor]:
        """The scale of the grad scaler now (None without one, or with a disabled one)."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        scale = scaler._get_scale_async()  # a tensor: no synchronisation with the device
        if scale is None:
            raise JacextError(
                "the GradScaler given to the clipping has not scaled a loss: use scaler.scale(loss).backward()"
            )
        return scale.detach().clone()

    def unscaled(self, stored: Sequence[Tensor]) -> Optional[Tensor]:
        """Divide the squared norms ``stored`` (in place) by the squared loss scale; the scale."""
        scale = self.loss_scale()
        if scale is not None:
            for sq in stored:
                sq.div_(scale.to(sq) ** 2)
        return scale

    def weights(self, n: int, stored, like: Tensor) -> Tensor:
        """Per sample, w_n times the 'mean' factor N, from the parameters' squared norms ``stored``."""
        stored = list(stored)
        scale = self.unscaled(stored)
        norms = torch.stack(stored).sum(0).sqrt() if stored else like.new_zeros(n)
        factors = (self.max_grad_norm / (norms + EPS)).clamp(max=1.0)
        record_clip(ClipRecord(self, self.max_grad_norm, self.loss_reduction, n, factors.detach(), scale), stored)
        return factors * self._per_loss(n)

    def __repr__(self) -> str:
        return f"jacext.ClipGrad(max_grad_norm={self.max_grad_norm}, loss_reduction={self.loss_reduction!r})"


class PerLayerClipGrad(ClipGrad):
    """Clip every sample's gradient per parameter: parameter p's part of sample n's gradient is
    scaled by min(1, C_p / (||g_np|| + 1e-6)) (Opacus's ``clipping="per_layer"``).

    Exact inside the one backward pass where every call is fused (jacext.engine.plan.InlineClipping
    forms each parameter's gradient from the cotangent scaled by its own weights); where the
    backward would rescale the model output's cotangent instead (one weight per sample for all
    parameters), it refuses. ``jacext.dp.PrivateModule`` falls back to materialised per-sample
    gradients there.

    Args:
        max_grad_norms: C_p per parameter, a mapping from the parameter.
        loss_reduction: ``"mean"`` or ``"sum"``.

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> clip = PerLayerClipGrad({model.weight: 1.0, model.bias: 0.1}, loss_reduction="sum")
        >>> with backpack(clip):
        ...     model(torch.randn(5, 3)).square().sum().backward()
        >>> bool(model.bias.grad.norm() <= 5 * 0.1 + 1e-6)
        True
    """

    def __init__(self, max_grad_norms: Mapping[nn.Parameter, float], loss_reduction: str = "mean", grad_scaler=None):
        norms = {
            p: check_max_grad_norm(c, "every max_grad_norm of per-layer clipping") for p, c in max_grad_norms.items()
        }
        if not norms:
            raise ValueError("per-layer clipping needs a bound for at least one parameter")
        self.max_grad_norms: Dict[nn.Parameter, float] = norms
        super().__init__(sum(c * c for c in norms.values()) ** 0.5, loss_reduction, grad_scaler)

    def bounds(self) -> tuple:
        return tuple(self.max_grad_norms.values())

    def weights(self, n: int, stored, like: Tensor) -> Tensor:
        raise JacextError(
            "per-layer clipping (PerLayerClipGrad) needs every layer call fused into the backward pass "
            "(hand-written rule, one tensor input, one tensor output, every output reaching the loss); "
            "this backward would rescale the model output's cotangent, one weight per sample for all "
            "parameters. Use clipping='flat', or jacext.dp.PrivacyEngine, whose private model falls back "
            "to materialised per-sample gradients for such models."
        )

    def parameter_weights(
        self, n: int, stored: Mapping[nn.Parameter, Tensor], like: Tensor
    ) -> Dict[nn.Parameter, Tensor]:
        """Per parameter, its per-sample weights (N,) times the 'mean' factor, from its squared norms."""
        missing = [tuple(p.shape) for p in stored if p not in self.max_grad_norms]
        if missing:
            raise JacextError(
                f"per-layer clipping has no bound for the trainable parameters of shapes {missing}; give "
                "one max_grad_norm per trainable parameter (or freeze them)"
            )
        per_loss = self._per_loss(n)
        scale = self.unscaled(list(stored.values()))
        out = {p: (self.max_grad_norms[p] / (sq.sqrt() + EPS)).clamp(max=1.0) * per_loss for p, sq in stored.items()}
        record_clip(ClipRecord(self, self.bounds(), self.loss_reduction, n, scale=scale), stored.values())
        return out

    def clip_materialised(
        self, grad_batch: Mapping[nn.Parameter, Tensor], scale: Optional[Tensor] = None
    ) -> Dict[nn.Parameter, Tensor]:
        """The per-layer clipped sums from per-sample contributions ``grad_batch`` (BatchGrad's,
        1/N included for a "mean" loss; of a loss scaled by ``scale``): the fallback where the
        backward cannot clip per layer."""
        out = {}
        for p, g in grad_batch.items():
            if p not in self.max_grad_norms:
                raise JacextError(f"per-layer clipping has no bound for a parameter of shape {tuple(p.shape)}")
            g = g * self._per_loss(g.shape[0])
            norms = g.flatten(1).norm(dim=1) / (1 if scale is None else scale.to(g))
            w = (self.max_grad_norms[p] / (norms + EPS)).clamp(max=1.0)
            out[p] = torch.einsum("n,n...->...", w.to(g.dtype), g)
        return out

    def __repr__(self) -> str:
        return f"jacext.dp.PerLayerClipGrad({len(self.max_grad_norms)} bounds, loss_reduction={self.loss_reduction!r})"


def per_parameter_bounds(params: Sequence[nn.Parameter], max_grad_norm) -> Dict[nn.Parameter, float]:
    """Opacus's per-layer ``max_grad_norm``: one bound per parameter (a list in the optimizer's
    order), or one number for all."""
    if isinstance(max_grad_norm, (int, float)):
        return {p: float(max_grad_norm) for p in params}
    bounds = list(max_grad_norm)
    if len(bounds) != len(params):
        raise ValueError(
            f"per-layer clipping needs one max_grad_norm per trainable parameter of the optimizer: "
            f"{len(params)} parameters, {len(bounds)} bounds"
        )
    return dict(zip(params, bounds, strict=True))


def clipped_grad_batch(p: Tensor) -> Tensor:
    """The per-sample gradients of ``p`` as the last clipping scaled them: (N, *p.shape), sample n's
    w_n g_n, with g_n the gradient of sample n's own loss (unscaled under a GradScaler), so that
    their sum is the clipped sum in ``p.grad``. Needs ``jacext.BatchGrad`` in the same backward
    pass as the clipping: ``p.grad_batch`` itself stays BatchGrad's unclipped contributions
    (BackPACK's semantics: 1/N included for a "mean" loss).

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> with backpack(ClipGrad(0.1, loss_reduction="sum"), jacext.BatchGrad()):
        ...     model(torch.randn(5, 3)).square().sum().backward()
        >>> torch.allclose(clipped_grad_batch(model.weight).sum(0), model.weight.grad)
        True
    """
    record, g = stamp_of(p), vars(p).get("grad_batch")  # type: ignore[arg-type]
    if record is None or g is None or g.shape[0] != record.n:
        raise JacextError(
            "clipped_grad_batch needs p.grad_batch and p.per_sample_l2 of one clipped backward pass: run it "
            "with jacext.BatchGrad() active next to the clipping (backpack(jacext.BatchGrad()) around the "
            "private model's forward pass)"
        )
    clip = record.clip
    g = g * clip._per_loss(record.n)
    if record.scale is not None:
        g = g / record.scale.to(g)
    w = record.factors
    if w is None:  # per-layer: p's own norms (per_sample_l2 is unscaled)
        w = (clip.max_grad_norms[p] / (vars(p)["per_sample_l2"].sqrt() + EPS)).clamp(max=1.0)
    return w.to(g).view(-1, *[1] * (g.dim() - 1)) * g
