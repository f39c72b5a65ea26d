"""``PrivateModule``: a model whose own backward pass clips every sample's gradient.

How: jacext's engine reads the active extensions once, when the extended model's forward pass
opens its tape; the tape then carries them to the backward pass, whose plan clips (the
``backpack`` context is not read again there). So the private model's ``forward`` runs the
wrapped model inside ``with backpack(clip):`` and leaves it before returning, and the backward
of whatever loss is computed from the output clips. A ``with`` block cannot be left open by an
exception, a forward pass without a backward, or an evaluation pass (unlike a pre-hook / tensor
hook pair that enters the context in the forward and leaves it after the backward), and nothing
global stays changed between the forward and the backward.
"""

import weakref
from contextvars import ContextVar
from functools import partial
from typing import Any, Dict, Optional

import torch
from backpack import backpack
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_leaves

import jacext
from jacext.dp.clip import ClipGrad, PerLayerClipGrad
from jacext.dp.guard import ClipRecord, current_task, note_grad, record_clip, taint
from jacext.engine import backpack_ctx
from jacext.engine.hooks import capturing
from jacext.errors import JacextError
from jacext.extensions import BatchGrad, RescalingExtension

_inside: ContextVar[Optional["PrivateModule"]] = ContextVar("jacext_dp_inside", default=None)
_MARK = "_jacext_dp_private"


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (the module itself otherwise)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


class PrivateModule(nn.Module):
    """The model, with every sample's gradient clipped inside its own backward pass.

    ``private(x)`` runs ``module(x)`` with ``clip`` active (see the module docstring for why a
    ``with backpack(...)`` block around the forward pass suffices): after ``loss.backward()``,
    ``p.grad`` is the clipped sum, ready for ``jacext.dp.DPOptimizer``. jacext extensions active
    around the call (``with backpack(jacext.BatchGrad()):``) join the clipping; ``p.grad_batch``
    is then the *unclipped* per-sample gradient. With per-layer clipping, where the backward
    cannot clip per parameter (calls that cannot be fused: LSTM, MultiheadAttention, modules
    on the generic rule), the first such forward pass is repeated with per-sample gradients
    materialised (``jacext.BatchGrad``), and every later one materialises them: p.grad is set
    from them, clipped per parameter, at the end of the backward pass (not under DDP).

    A call of the wrapped model, or of one of its layers, that bypasses the private one marks the
    backward passes it reaches, and the optimizer refuses their gradients. Attributes of the wrapped model are
    reachable on the private one; ``state_dict`` keys start with ``_module.`` (as Opacus's
    GradSampleModule).

    Args:
        module: the model (or ``DistributedDataParallel(model)``); extended with jacext here.
        clip: the clipping (``ClipGrad`` or ``PerLayerClipGrad``).

    Example:
        >>> import torch
        >>> from jacext.dp import ClipGrad, PrivateModule
        >>> private = PrivateModule(torch.nn.Linear(3, 2), ClipGrad(1.0, loss_reduction="sum"))
        >>> private(torch.randn(5, 3)).square().sum().backward()
        >>> bool(private.weight.grad.norm() <= 5.0 + 1e-5)
        True
    """

    def __init__(self, module: nn.Module, clip: ClipGrad):
        super().__init__()
        if isinstance(module, PrivateModule):
            raise JacextError("the module is already private (made by make_private): clipping it twice is refused")
        inner = unwrap(module)
        mark = vars(inner).get(_MARK)
        if mark is not None and mark() is not None:
            raise JacextError(
                f"{type(inner).__name__} is already the model of another private module (another "
                "PrivacyEngine.make_private): two engines on one model would clip and account twice. Call "
                "_close() on the first private module, or make a copy of the model."
            )
        self._module = module
        self._clip = clip
        self._materialise = False
        self._distributed = isinstance(module, DistributedDataParallel)
        jacext.extend(inner)
        vars(inner)[_MARK] = weakref.ref(self)
        hook = partial(_mark_direct_call, weakref.ref(self))
        owners = [m for m in inner.modules() if m is inner or next(m.parameters(recurse=False), None) is not None]
        self._direct = [m.register_forward_hook(hook) for m in owners]

    @property
    def clip(self) -> ClipGrad:
        return self._clip

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_module":
                raise
            return getattr(self._module, name)

    def forward(self, *args, **kwargs):
        token = _inside.set(self)
        try:
            if not torch.is_grad_enabled():
                return self._module(*args, **kwargs)
            outer = backpack_ctx.active_extensions()
            if any(isinstance(e, RescalingExtension) for e in outer):
                raise JacextError(
                    "the private model already clips inside its backward pass; a second clipping "
                    f"({[e for e in outer if isinstance(e, RescalingExtension)]}) around it is refused: "
                    "drop the backpack(ClipGrad(...)) block"
                )
            if isinstance(self._clip, PerLayerClipGrad) and self._materialise:
                return self._materialised(outer, args, kwargs)
            if not isinstance(self._clip, PerLayerClipGrad):
                with backpack(*outer, self._clip):
                    return self._module(*args, **kwargs)
            inner = unwrap(self._module)
            with capturing() as tapes, backpack(*outer, self._clip):
                out = self._module(*args, **kwargs)
            tape = next((t for t in tapes if t.root is inner), None)
            if tape is None or (all(r.fused for r in tape.records) and all(m.held for m in tape.meets)):
                return out
            del out, tapes, tape
            self._materialise = True
            return self._materialised(outer, args, kwargs)
        finally:
            _inside.reset(token)

    def _materialised(self, outer, args, kwargs):
        """Per-layer clipping from materialised per-sample gradients, at the end of the backward."""
        if self._distributed:
            raise JacextError(
                "per-layer clipping of this model needs materialised per-sample gradients (some call cannot "
                "be fused into the backward), which DistributedDataParallel would all-reduce unclipped; use "
                "clipping='flat' under DDP for this model"
            )
        mine = next((e for e in outer if isinstance(e, BatchGrad)), None)
        batch_grad = mine or BatchGrad()
        inner = unwrap(self._module)
        with capturing() as tapes, backpack(*outer, *(() if mine else (batch_grad,))):
            out = self._module(*args, **kwargs)
        tape = next((t for t in tapes if t.root is inner), None)
        if tape is not None and isinstance(out, Tensor) and out.requires_grad:
            out.register_hook(partial(_clip_at_end, weakref.ref(self), weakref.ref(tape), mine is None))
        return out

    def _close(self) -> None:
        """Remove the private model's hooks and mark (the model stays extended)."""
        for handle in self._direct:
            handle.remove()
        vars(unwrap(self._module)).pop(_MARK, None)

    def to_standard_module(self) -> nn.Module:
        """The wrapped model."""
        return self._module


def _trainable(module: PrivateModule):
    return [p for p in unwrap(module._module).parameters() if p.requires_grad]


def _clip_at_end(private_ref, tape_ref, drop_grad_batch: bool, grad: Tensor) -> None:
    """On the output, as the backward reaches it: set aside what p.grad held, and clip per layer
    from p.grad_batch once the backward is over (not in the engine's own pull-back)."""
    private, tape = private_ref(), tape_ref()
    if private is None or tape is None or tape.pulling:
        return
    task = current_task()
    before: Dict[nn.Parameter, Optional[Tensor]] = {
        p: (p.grad.detach().clone() if p.grad is not None else None) for p in _trainable(private)
    }
    n = grad.shape[0] if grad.dim() else 0

    def finish() -> None:
        clip = private._clip
        assert isinstance(clip, PerLayerClipGrad)
        batch = {p: vars(p).get("grad_batch") for p in before}
        missing = [tuple(p.shape) for p, g in batch.items() if g is None]
        if missing:
            raise JacextError(f"per-layer clipping found no per-sample gradients for parameters of shapes {missing}")
        scale = clip.loss_scale()
        clipped = clip.clip_materialised(batch, scale)  # type: ignore[arg-type]
        for p, old in before.items():
            p.grad = clipped[p] if old is None else old + clipped[p]
            note_grad(p)
            if drop_grad_batch:
                vars(p).pop("grad_batch", None)
        record_clip(ClipRecord(clip, clip.bounds(), clip.loss_reduction, n, scale=scale, task=task))

    torch.autograd.Variable._execution_engine.queue_callback(finish)  # type: ignore[attr-defined]


def _mark_direct_call(private_ref, module: nn.Module, args, output) -> None:
    """A forward pass of the wrapped model, or of a layer of it, outside the private one: the
    backward passes its output reaches carry gradients the clipping did not see (the optimizer
    refuses them)."""
    private = private_ref()
    if private is None or _inside.get() is private or not torch.is_grad_enabled() or current_task() >= 0:
        return  # (inside a backward pass: activation checkpointing recomputing a layer)
    what = f"a direct call of the wrapped model ({type(module).__name__})"
    for t in tree_leaves(output):
        if isinstance(t, Tensor) and t.requires_grad:
            t.register_hook(lambda g: taint(current_task(), what))
