"""The noisy optimizer of ``jacext.dp.PrivacyEngine``: ``DPOptimizer`` wraps any torch optimizer.

The backward pass of the private model leaves ``p.grad`` as the clipped sum (jacext.dp.clip);
``DPOptimizer.step`` checks that it is (jacext.dp.guard), adds N(0, (sigma C)^2) noise, scales it
as Opacus does (by the expected batch size for a "mean" loss) and calls the wrapped optimizer.
Virtual steps (``signal_skip_step``, as Opacus's BatchMemoryManager sends) accumulate the clipped
sums of a logical batch's physical batches and add the noise once, at its end.
"""

import math
import os
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from jacext.dp.clip import ClipGrad, PerLayerClipGrad
from jacext.dp.guard import (
    ClipRecord,
    GradTracker,
    check_loss_reduction,
    check_noise_multiplier,
    check_single_clipped_backward,
    claim,
    release,
)
from jacext.errors import JacextError


def gaussian_noise(
    std: float, like: Tensor, generator: Optional[torch.Generator] = None, secure: bool = False
) -> Tensor:
    """N(0, std^2) noise shaped like ``like``, drawn as Opacus draws it (nothing drawn for std 0);
    for a complex ``like``, N(0, std^2) in its real and in its imaginary part (clipping bounds
    the norm of both together: a complex parameter counts as its two real ones).

    ``secure``: Opacus's defence against floating-point attacks on the Gaussian sampler (one draw
    discarded, then the sum of four draws over 2; Mironov's and Holohan's attacks, arXiv
    2107.10138 section 5.1). It does not make the generator cryptographically secure."""
    if std == 0:
        return torch.zeros(like.shape, device=like.device, dtype=like.dtype)
    shape, dtype = (*like.shape, 2) if like.is_complex() else like.shape, like.real.dtype

    def draw() -> Tensor:
        return torch.normal(mean=0, std=std, size=shape, device=like.device, generator=generator, dtype=dtype)

    if secure:
        torch.normal(mean=0, std=std, size=(1, 1), device=like.device, generator=generator)
        noise = sum((draw() for _ in range(4)), torch.zeros(shape, device=like.device, dtype=dtype)) / 2
    else:
        noise = draw()
    return torch.view_as_complex(noise) if like.is_complex() else noise


def urandom_generator(device="cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from ``os.urandom``: an unpredictable seed, not a
    cryptographically secure stream (see docs/dp.md, secure randomness)."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class DPOptimizer(torch.optim.Optimizer):
    """Any torch optimizer on privatised gradients (Opacus's ``DPOptimizer`` interface).

    ``step()`` refuses gradients that the ``clip`` extension did not produce in exactly one backward
    pass since the last step or ``zero_grad()``; then p.grad <- (clipped sum + N(0, (sigma C)^2)) /
    expected batch size (no division for ``loss_reduction="sum"``), and the wrapped optimizer steps.
    Usually made by ``jacext.dp.PrivacyEngine.make_private``.

    Args:
        optimizer: the wrapped optimizer (SGD, Adam, AdamW, ...).
        clip: the clipping the model's backward runs (``ClipGrad`` or ``PerLayerClipGrad``).
        noise_multiplier: sigma, >= 0.
        expected_batch_size: per process, as Opacus (the global expected batch over the world size).
        loss_reduction: ``"mean"`` or ``"sum"``.
        generator: the noise's generator (None: torch's global one).
        secure_mode: draw noise with Opacus's floating-point-attack defence.
        world_size: processes whose gradients DistributedDataParallel averages (the clipped sums
            are multiplied back by it; every process draws the same noise from a shared generator).
        adaptive: adaptive clipping (Andrew et al. 2021): a dict with ``target_unclipped_quantile``,
            ``clipbound_learning_rate``, ``max_clipbound``, ``min_clipbound``, ``unclipped_num_std``.

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> from jacext.dp import ClipGrad, DPOptimizer
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> clip = ClipGrad(1.0, loss_reduction="sum")
        >>> opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), clip=clip, noise_multiplier=1.0,
        ...                   expected_batch_size=5, loss_reduction="sum")
        >>> opt.zero_grad()
        >>> with backpack(clip):
        ...     out = model(torch.randn(5, 3))
        >>> out.square().sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        clip: ClipGrad,
        noise_multiplier: float,
        expected_batch_size: Optional[float],
        loss_reduction: str = "mean",
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        world_size: int = 1,
        adaptive: Optional[dict] = None,
        label: str = "a jacext DPOptimizer",
    ):
        if hasattr(optimizer, "original_optimizer"):
            raise JacextError(
                "the optimizer is already a DP optimizer (it has original_optimizer); pass the plain torch "
                "optimizer: two DP optimizers would noise the gradients twice"
            )
        check_loss_reduction(loss_reduction)
        if loss_reduction == "mean" and not (expected_batch_size is not None and expected_batch_size > 0):
            raise ValueError(f"a 'mean' loss needs a positive expected_batch_size, got {expected_batch_size!r}")
        if clip.loss_reduction != loss_reduction:
            raise ValueError(f"the clipping's loss_reduction {clip.loss_reduction!r} differs from {loss_reduction!r}")
        self.original_optimizer = optimizer
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size
        self.loss_reduction = loss_reduction
        self.generator = generator
        self.secure_mode = secure_mode
        self.world_size = int(world_size)
        self.label = label
        self.step_hook: Optional[Callable[["DPOptimizer"], None]] = None
        self._step_skip_queue: List[bool] = []
        self._is_last_step_skipped = False
        self._summed: Dict[int, Tensor] = {}
        self._overflow = False
        self._samples = 0
        self._unclipped = 0.0
        self.adaptive = _check_adaptive(adaptive, self.noise_multiplier) if adaptive is not None else None
        claim(self.params, self)
        self.tracker = GradTracker(self.params)

    _step_supports_amp_scaling = True  # GradScaler.step hands over grad_scale and found_inf (see step)

    # ------------------------------------------------------------ Opacus's interface

    @property
    def params(self) -> List[nn.Parameter]:
        """The trainable parameters, flat, in the optimizer's order."""
        return [p for group in self.original_optimizer.param_groups for p in group["params"] if p.requires_grad]

    @property
    def param_groups(self) -> List[dict]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: List[dict]) -> None:
        self.original_optimizer.param_groups = groups

    @property
    def state(self):  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.original_optimizer.state = state

    @property
    def defaults(self):  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults) -> None:
        self.original_optimizer.defaults = defaults

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value: float) -> None:
        self._noise_multiplier = check_noise_multiplier(value)

    @property
    def max_grad_norm(self) -> float:
        """C: the clipping's bound (per-layer: the norm of the per-parameter bounds, as Opacus).
        Setting it (a clipping scheduler) changes the bound of the next backward passes."""
        return self.clip.max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        if isinstance(self.clip, PerLayerClipGrad):
            raise JacextError("per-layer clipping's bounds are per parameter: set clip.max_grad_norms instead")
        self.clip.max_grad_norm = value

    @property
    def accumulated_iterations(self) -> int:
        """Batches in the step (Opacus's accountant hook multiplies the sample rate by it): always 1,
        since a step refuses gradients of more than one batch outside virtual steps."""
        return 1

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        """Call ``fn(optimizer)`` at every real step, after the noise (the accountant's hook)."""
        self.step_hook = fn

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next ``step()`` only accumulates the clipped sum (a physical batch inside a logical one)."""
        self._step_skip_queue.append(do_skip)

    def add_param_group(self, param_group: dict) -> None:
        raise JacextError(
            "add parameters to the optimizer before make_private: new ones would be neither clipped nor tracked"
        )

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Clear ``p.grad`` (Opacus's default: to zeros); the clipped sums of the physical batches of a
        logical batch in progress are kept."""
        self.original_optimizer.zero_grad(set_to_none)
        self.tracker.reset()

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"jacext.dp.DPOptimizer({self.original_optimizer!r})"

    # ------------------------------------------------------------ the step

    def _accepts(self, record: ClipRecord) -> Optional[str]:
        if record.clip is not self.clip:
            return f"another clipping ran: {record.clip!r}"
        bound = self.clip.bounds() if isinstance(self.clip, PerLayerClipGrad) else self.clip.max_grad_norm
        if record.max_grad_norm != bound:
            return f"it clipped with max_grad_norm {record.max_grad_norm}, the optimizer's is now {bound}"
        return None

    def _take_gradients(self, via_scaler: bool, scale: Optional[Tensor]) -> None:
        """Check p.grad and add it, unscaled, to the logical batch's clipped sums; p.grad becomes None.
        ``via_scaler``: a GradScaler steps this optimizer; ``scale``: the scale it asks to undo."""
        params = self.params
        record = check_single_clipped_backward(self.tracker, params, self._accepts, "DPOptimizer.step")
        if record is not None and via_scaler and record.scale is None:
            raise JacextError(
                "DPOptimizer.step: a GradScaler steps this optimizer, but the clipping did not know the scaler, so it "
                "clipped the scaled per-sample gradients at C (C / scale unscaled). Pass grad_scaler=scaler to "
                "make_private (or to ClipGrad)."
            )
        if record is not None and record.scale is not None:
            if not via_scaler:
                raise JacextError(
                    "DPOptimizer.step: the gradients are of a loss scaled by the GradScaler: step with "
                    "scaler.step(optimizer), which lets the optimizer unscale them, not optimizer.step()"
                )
            if scale is None:
                raise JacextError(
                    "DPOptimizer.step: the gradients were unscaled before the step (scaler.unscale_(optimizer)); "
                    "leave it to scaler.step(optimizer): the optimizer unscales the clipped sums itself"
                )
            if not torch.equal(scale.to(record.scale), record.scale):
                raise JacextError(
                    f"DPOptimizer.step: the clipping divided the norms by the loss scale {record.scale.item()}, the "
                    f"GradScaler now asks to unscale by {scale.item()}: call scaler.update() only after "
                    "scaler.step(optimizer)"
                )
        factor = self.world_size / scale.double().item() if scale is not None else self.world_size
        for p in params:
            g = p.grad
            if g is not None:
                g = g.detach() * factor if factor != 1 else g.detach()
                if g.is_sparse:
                    g = g.to_dense()
                have = self._summed.get(id(p))
                self._summed[id(p)] = g if have is None else have + g
            p.grad = None
        if record is not None:
            self._samples += record.n
            if self.adaptive is not None and record.factors is not None:
                self._unclipped += float((record.factors >= 1).sum())
        self.tracker.reset()

    def _noise_std(self) -> float:
        sigma = self.noise_multiplier
        if self.adaptive is not None and sigma > 0:
            sigma = (sigma ** (-2) - (2 * self.adaptive["unclipped_num_std"]) ** (-2)) ** (-1 / 2)
        return sigma * self.max_grad_norm

    @torch.no_grad()
    def add_noise(self) -> None:
        """p.grad <- (logical batch's clipped sum + N(0, std^2)) / scale, for every parameter."""
        std = self._noise_std()
        for p in self.params:
            summed = self._summed.pop(id(p), None)
            if summed is None:
                summed = torch.zeros_like(p)
            grad = (summed + gaussian_noise(std, summed, self.generator, self.secure_mode)).view_as(p)
            if self.loss_reduction == "mean":
                assert self.expected_batch_size is not None
                grad = grad / (self.expected_batch_size * self.world_size)
            p.grad = grad
        self._summed.clear()

    def _update_clipbound(self) -> None:
        """Adaptive clipping: C <- C exp(-eta (noisy unclipped fraction - target)), within bounds."""
        ada = self.adaptive
        assert ada is not None
        count = torch.tensor(self._unclipped, dtype=torch.float64)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(count)
        noisy = count + gaussian_noise(ada["unclipped_num_std"], count, self.generator)
        expected = (self.expected_batch_size or 0) * self.world_size
        frac = float(noisy) / expected if expected > 0 else 0.0
        c = self.clip.max_grad_norm * math.exp(
            -ada["clipbound_learning_rate"] * (frac - ada["target_unclipped_quantile"])
        )
        self.clip.max_grad_norm = min(max(c, ada["min_clipbound"]), ada["max_clipbound"])

    def pre_step(self, via_scaler: bool = False, scale: Optional[Tensor] = None, overflow: bool = False) -> bool:
        """Take the gradients; at the end of a logical batch, noise and scale them: True if the
        wrapped optimizer should step now. A logical batch one of whose backward passes
        overflowed (``overflow``: the GradScaler found inf or NaN) is dropped, as GradScaler skips
        a step: no noise, no step, no accounting."""
        self._take_gradients(via_scaler, scale)
        self._overflow = self._overflow or overflow
        if self._step_skip_queue and self._step_skip_queue.pop(0):
            self._is_last_step_skipped = True
            return False
        if self._overflow:
            self._summed.clear()
            self._samples, self._unclipped, self._overflow = 0, 0.0, False
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        if self.step_hook is not None:
            self.step_hook(self)
        if self.adaptive is not None:
            self._update_clipbound()
        self._samples, self._unclipped = 0, 0.0
        self._is_last_step_skipped = False
        return True

    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """One DP step (or, after ``signal_skip_step()``, one physical batch's accumulation).
        Under ``scaler.step(optimizer)``, the GradScaler hands over its scale and whether it found
        inf or NaN (``grad_scale``, ``found_inf``: the optimizer unscales the clipped sums itself)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        found_inf: Optional[Tensor] = getattr(self, "found_inf", None)
        via_scaler = found_inf is not None
        overflow = via_scaler and bool(found_inf.sum() > 0)  # type: ignore[union-attr]
        if not self.pre_step(via_scaler, getattr(self, "grad_scale", None), overflow):
            return None
        result = self.original_optimizer.step()
        self.tracker.reset(stepped=True)
        return result

    # ------------------------------------------------------------ checkpoints

    def dp_state_dict(self) -> dict:
        """What a checkpoint needs beyond the wrapped optimizer's state (no noise generator state)."""
        if self._summed:
            raise JacextError(
                "a checkpoint in the middle of a logical batch (virtual steps) cannot resume it; save after a real step"
            )
        bounds = self.clip.bounds() if isinstance(self.clip, PerLayerClipGrad) else None
        return {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.clip.max_grad_norm,
            "per_layer_bounds": bounds,
            "loss_reduction": self.loss_reduction,
            "expected_batch_size": self.expected_batch_size,
            "world_size": self.world_size,
            "adaptive": dict(self.adaptive) if self.adaptive is not None else None,
        }

    def load_dp_state_dict(self, state: dict) -> None:
        for key in ("loss_reduction", "expected_batch_size", "per_layer_bounds"):
            mine = self.dp_state_dict()[key]
            if state[key] != mine:
                raise JacextError(f"the checkpoint's {key} {state[key]!r} differs from this optimizer's {mine!r}")
        if (state["adaptive"] is None) != (self.adaptive is None):
            raise JacextError("the checkpoint's clipping (adaptive or not) differs from this optimizer's")
        self.noise_multiplier = state["noise_multiplier"]
        if not isinstance(self.clip, PerLayerClipGrad):
            self.clip.max_grad_norm = state["max_grad_norm"]

    def _close(self) -> None:
        """Remove the hooks and the claim on the parameters."""
        self.tracker.remove()
        release(self.params, self)


def _check_adaptive(options: dict, noise_multiplier: float) -> dict:
    keys = (
        "target_unclipped_quantile",
        "clipbound_learning_rate",
        "max_clipbound",
        "min_clipbound",
        "unclipped_num_std",
    )
    missing = [k for k in keys if k not in options]
    if missing:
        raise ValueError(f"adaptive clipping needs {', '.join(missing)} (as Opacus's AdaClipDPOptimizer)")
    ada = {k: float(options[k]) for k in keys}
    if not all(math.isfinite(v) for k, v in ada.items() if k != "max_clipbound"):
        raise ValueError(f"adaptive clipping's parameters must be finite, got {ada}")
    if not ada["max_clipbound"] > ada["min_clipbound"] > 0:
        raise ValueError("adaptive clipping needs max_clipbound > min_clipbound > 0")
    if not ada["unclipped_num_std"] > 0:
        raise ValueError(
            "adaptive clipping needs unclipped_num_std > 0 (the count of unclipped samples must be noised)"
        )
    if noise_multiplier >= 2 * ada["unclipped_num_std"]:
        raise ValueError(
            "noise_multiplier must be smaller than 2 * unclipped_num_std (Theorem 1 of Andrew et al., "
            "arXiv 1905.03871: the gradient's noise is sigma_eff = (sigma^-2 - (2 sigma_b)^-2)^-1/2)"
        )
    return ada
