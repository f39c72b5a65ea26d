"""What keeps DP-SGD from silently losing its guarantee: which backward passes clipped, which
gradients they produced, and checks of the privacy parameters.

* The **ledger**: every time a :class:`jacext.dp.ClipGrad` computes its per-sample weights (once
  per backward pass, inside it), it writes a :class:`ClipRecord` under the autograd graph task of
  that backward (``torch._C._current_graph_task_id()``, unique per backward call in the process).
  Forward passes of a private model's layers that were *not* recorded under its clipping mark
  the backward tasks they reach as **tainted**.
* A :class:`GradTracker` hooks each parameter (a tensor hook, which runs before the gradient is
  accumulated, and a post-accumulate hook): it lists, per parameter, the backward tasks that
  accumulated into ``p.grad`` since the optimizer last consumed or cleared it, and the tensor
  (with its version counter) the backward left there. An optimizer step then knows whether
  ``p.grad`` holds exactly one clipped backward pass, of which clipping, unchanged since.
"""

import math
import numbers
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Union

import torch
from torch import Tensor, nn

from jacext.errors import JacextError

STEPPED = "stepped"  # a tracker event: an optimizer step used p.grad (it is not cleared yet)
_LEDGER_SIZE = 256


@dataclass
class ClipRecord:
    """One backward pass's clipping: by which extension, with which bound, for how many samples.

    ``factors``: per sample, min(1, C / (||g_n|| + 1e-6)) (flat clipping; None for per-layer).
    ``scale``: the GradScaler's loss scale the norms were divided by (None: no scaler)."""

    clip: Any
    max_grad_norm: Union[float, tuple]
    loss_reduction: str
    n: int
    factors: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    task: int = -1
    consumed: bool = field(default=False)


_ledger: "OrderedDict[int, ClipRecord]" = OrderedDict()
_tainted: "OrderedDict[int, str]" = OrderedDict()


def current_task() -> int:
    """The autograd graph task running now (-1 outside a backward pass)."""
    return int(torch._C._current_graph_task_id())


def record_clip(record: ClipRecord, stored: Iterable[Tensor] = ()) -> ClipRecord:
    """Write ``record`` under the backward pass running now, and stamp the per-sample norms
    ``stored`` (the tensors that become ``p.per_sample_l2``) with it."""
    task = record.task if record.task >= 0 else current_task()
    record.task = task
    if task >= 0:
        _ledger[task] = record
        while len(_ledger) > _LEDGER_SIZE:
            _ledger.popitem(last=False)
    for t in stored:
        t._jacext_clip = record  # type: ignore[attr-defined]
    return record


def clip_of(task: int) -> Optional[ClipRecord]:
    return _ledger.get(task)


def taint(task: int, what: str) -> None:
    """Mark the backward task ``task`` as carrying gradients that no private clipping saw."""
    if task >= 0:
        _tainted[task] = what
        while len(_tainted) > _LEDGER_SIZE:
            _tainted.popitem(last=False)


def tainted(task: int) -> Optional[str]:
    return _tainted.get(task)


def stamp_of(p: nn.Parameter) -> Optional[ClipRecord]:
    """The clipping that computed ``p.per_sample_l2`` (None if no ClipGrad did)."""
    l2 = vars(p).get("per_sample_l2")
    return getattr(l2, "_jacext_clip", None) if l2 is not None else None


# ---------------------------------------------------------------- checks of the parameters


def _number(value, what: str, kind: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a {kind} number, got {value!r}")
    return float(value)


def check_max_grad_norm(value, what: str = "max_grad_norm") -> float:
    """A clipping bound: a positive, finite number."""
    c = _number(value, what, "positive finite")
    if not (c > 0 and math.isfinite(c)):
        raise ValueError(
            f"{what} must be a positive finite number, got {value!r}: with C <= 0, NaN or inf the "
            "per-sample sensitivity is not bounded by C and the noise would not cover it"
        )
    return c


def check_noise_multiplier(value) -> float:
    """A noise multiplier: a non-negative, finite number (0 gives no privacy, epsilon = inf)."""
    s = _number(value, "noise_multiplier", "non-negative finite")
    if not (s >= 0 and math.isfinite(s)):
        raise ValueError(f"noise_multiplier must be a non-negative finite number, got {value!r}")
    return s


def check_loss_reduction(value: str) -> str:
    if value not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {value!r}")
    return value


# ---------------------------------------------------------------- who owns a parameter

_OWNER = "_jacext_dp_owner"


def owner_of(p: nn.Parameter) -> Optional[str]:
    ref = vars(p).get(_OWNER)
    owner = ref() if ref is not None else None
    return getattr(owner, "label", None) if owner is not None else None


def claim(params: Sequence[nn.Parameter], owner) -> None:
    """Mark ``params`` as privatised by ``owner`` (a PrivacyEngine's optimizer): refuse a second one."""
    for p in params:
        other = owner_of(p)
        if other is not None:
            raise JacextError(
                f"a parameter of shape {tuple(p.shape)} is already privatised by {other}; two DP "
                "optimizers (or two make_private calls) on one model would clip and noise it twice "
                "with separate accounting. Use one PrivacyEngine per model (call "
                "private_module._close() before making it private again)."
            )
    for p in params:
        vars(p)[_OWNER] = weakref.ref(owner)


def release(params: Sequence[nn.Parameter], owner) -> None:
    for p in params:
        ref = vars(p).get(_OWNER)
        if ref is not None and ref() is owner:
            del vars(p)[_OWNER]


# ---------------------------------------------------------------- the gradients' history

_WRITTEN = "_jacext_dp_grad"


def note_grad(p: Tensor) -> None:
    """Remember the tensor, and its version, that the backward pass left in ``p.grad``."""
    g = p.grad
    vars(p)[_WRITTEN] = None if g is None else (weakref.ref(g), g._version)


def grad_changed(p: Tensor) -> bool:
    """Whether ``p.grad`` was replaced, or changed in place, since :func:`note_grad`. In-place
    changes are not seen under torch.distributed, whose reducer writes the averaged gradients
    into ``p.grad`` after the backward pass."""
    noted, g = vars(p).get(_WRITTEN), p.grad
    if noted is None or g is None:
        return noted is not None or g is not None
    ref, version = noted
    if ref() is not g:
        return True
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed and g._version != version


class GradTracker:
    """Per parameter, the backward tasks that accumulated into ``p.grad`` since :meth:`reset`.

    A gradient accumulated onto a ``p.grad`` that is None or all zeros starts the list afresh
    (nothing was added to), so ``optimizer.zero_grad()`` of any kind, or assigning None, is seen.
    The hooks hold the tracker weakly and are removed when it is garbage-collected.

    Args:
        params: the parameters to watch.
    """

    def __init__(self, params: Iterable[nn.Parameter]):
        self.params: List[nn.Parameter] = [p for p in params if p.requires_grad]
        self.events: Dict[int, List[Union[int, str]]] = {id(p): [] for p in self.params}
        me = weakref.ref(self)
        handles = []
        for p in self.params:
            ref = weakref.ref(p)
            handles.append(p.register_hook(_make_pre(me, ref)))
            handles.append(p.register_post_accumulate_grad_hook(_make_post(me)))
        self._finalizer = weakref.finalize(self, _remove, handles)

    def reset(self, stepped: bool = False) -> None:
        """Forget the history: after ``zero_grad`` (nothing), or after a step (``stepped``: the
        gradient the step used is still in ``p.grad``)."""
        for events in self.events.values():
            events[:] = [STEPPED] if stepped else []

    def tasks(self, p: nn.Parameter) -> List[int]:
        return [e for e in self.events.get(id(p), []) if isinstance(e, int)]

    def stepped(self, p: nn.Parameter) -> bool:
        return STEPPED in self.events.get(id(p), [])

    def remove(self) -> None:
        self._finalizer()


def _remove(handles) -> None:
    for h in handles:
        h.remove()


def _make_pre(tracker: "weakref.ref[GradTracker]", param: "weakref.ref[nn.Parameter]"):
    def pre(grad: Tensor) -> None:
        me, p = tracker(), param()
        if me is None or p is None:
            return
        events = me.events.get(id(p))
        if events and (p.grad is None or not bool(p.grad.any())):
            events.clear()  # what was in p.grad was discarded (or zero): nothing accumulates onto it

    return pre


def _make_post(tracker: "weakref.ref[GradTracker]"):
    def post(p: Tensor) -> None:
        me = tracker()
        if me is not None and id(p) in me.events:
            me.events[id(p)].append(current_task())
            note_grad(p)

    return post


def check_single_clipped_backward(
    tracker: GradTracker, params: Sequence[nn.Parameter], accepts, what: str
) -> Optional[ClipRecord]:
    """Refuse unless every ``p.grad`` of ``params`` holds exactly one backward pass, the same for
    all, which a clipping that ``accepts(record)`` (None if fine, else the reason) clipped, and no
    forward pass outside the private model reached. Parameters without gradient (or with zeros)
    contribute nothing. Returns that backward's record (None: no gradient at all)."""
    found: Optional[ClipRecord] = None
    seen: Set[int] = set()
    for p in params:
        tasks = tracker.tasks(p)
        if len(tasks) > 1:
            raise JacextError(
                f"{what}: p.grad of a parameter of shape {tuple(p.shape)} sums {len(tasks)} backward passes. "
                "DP-SGD's accounting covers one batch per step: call optimizer.zero_grad() before each "
                "backward, or split a large batch with jacext.dp.BatchMemoryManager (virtual steps)."
            )
        if tasks and tracker.stepped(p):
            raise JacextError(
                f"{what}: the backward pass added its gradients onto those of the last optimizer step, which "
                "were not cleared. Call optimizer.zero_grad() before each backward pass."
            )
        if not tasks:
            if p.grad is not None and bool(p.grad.any()):
                if tracker.stepped(p):
                    raise JacextError(
                        f"{what}: the gradients have not been cleared since the last optimizer step; a "
                        "second step would reuse them. Call optimizer.zero_grad() and run a backward pass "
                        "of the private model before each step."
                    )
                raise JacextError(
                    f"{what}: p.grad of a parameter of shape {tuple(p.shape)} was not produced by a backward "
                    "pass this optimizer saw (set by hand, or left from before): it is not known to be "
                    "clipped. Call optimizer.zero_grad() and compute the gradients with the private model."
                )
            continue
        if grad_changed(p):
            raise JacextError(
                f"{what}: p.grad of a parameter of shape {tuple(p.shape)} was replaced or changed in place after "
                "the clipped backward pass (by hand, clip_grad_norm_, GradScaler.unscale_, ...): it is no longer "
                "known to be the clipped sum. Leave p.grad as the backward pass left it; under "
                "torch.amp.GradScaler, give the scaler to make_private (grad_scaler=) and step with "
                "scaler.step(optimizer), which lets the optimizer unscale."
            )
        task = tasks[0]
        reason = tainted(task)
        if reason is not None:
            raise JacextError(
                f"{what}: the last backward pass also went through {reason}, outside the private model's "
                "clipping, so p.grad holds unclipped gradients. Compute the loss from the private model's "
                "output only."
            )
        record = clip_of(task)
        problem = "no jacext ClipGrad ran in it" if record is None else accepts(record)
        if record is None and p.grad is not None and p.grad.requires_grad:
            problem += " (a backward(create_graph=True) the engine did not clip: see docs/dp.md)"
        if problem:
            raise JacextError(
                f"{what}: the backward pass that produced p.grad was not clipped by this optimizer's "
                f"clipping ({problem}). Run the forward pass through the private model (the module "
                "make_private returned, or inside backpack(ClipGrad(...)) with the same max_grad_norm "
                "for DPSGD)."
            )
        seen.add(task)
        found = record
    if len(seen) > 1:
        raise JacextError(
            f"{what}: the gradients come from {len(seen)} different backward passes; DP-SGD needs all of "
            "them from one clipped backward pass per step. Call optimizer.zero_grad() before each batch."
        )
    return found
