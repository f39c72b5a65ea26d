"""``jacext.extend`` / ``jacext.unextend``: the forward hooks that feed the tape.

Only forward hooks are installed (no module backward hooks), so in-place
operations, modules called several times and arbitrary code between modules
keep working. ``backpack=True`` additionally applies ``backpack.extend`` for
BackPACK's own extensions, with BackPACK's restrictions.
"""

import weakref
from contextlib import contextmanager
from functools import partial
from typing import Optional

import backpack as bp
import torch
from backpack.context import CTX
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.nn.modules.module import _global_forward_hooks

from jacext.errors import JacextError
from jacext.extensions import JacextExtension
from jacext.rules.batchnorm import BATCHNORMS, CHOICES, couples_samples, require_choice
from jacext.tape import Tape

_current: Optional[Tape] = None  # the tape of the forward pass in progress
_last: Optional["weakref.ref[Tape]"] = None  # the last finished forward's tape, alive while its output is


def extend(module: nn.Module, *, backpack: bool = False, batchnorm: str = "error") -> nn.Module:
    """Make ``module`` ready for jacext's extensions and return it.

    Args:
        module: the model; its output is what ``BatchJacobian`` differentiates.
        backpack: also apply ``backpack.extend`` so that BackPACK's own
            extensions (DiagGGN, KFAC, ...) work in the same ``backpack`` context.
        batchnorm: what BatchNorm layers that normalise with batch statistics (train mode)
            do, since they make every output depend on the whole batch: ``"error"`` (raise),
            ``"eval"`` (use the running statistics in the forward passes jacext records; they
            are then not updated), ``"exact"`` (differentiate each sample's output through the
            batch statistics; N times the cost).
    """
    if batchnorm not in CHOICES:
        raise ValueError(f"batchnorm must be one of {CHOICES}, got {batchnorm!r}")
    if backpack:
        bp.extend(module)
        vars(module)["_jacext_backpack"] = True
    for name, m in module.named_modules():
        vars(m)["_jacext_path"] = name or "<root>"
        if isinstance(m, BATCHNORMS):
            vars(m)["_jacext_batchnorm"] = batchnorm
            if not hasattr(m, "_jacext_check_handles"):  # also without parameters (affine=False)
                vars(m)["_jacext_check_handles"] = (m.register_forward_pre_hook(_check_batchnorm),)
            if batchnorm == "eval" and not hasattr(m, "_jacext_eval_handles"):
                vars(m)["_jacext_eval_handles"] = (
                    m.register_forward_pre_hook(_to_eval),
                    m.register_forward_hook(_back_to_mode, always_call=True),
                )
    if not hasattr(module, "_jacext_root_handles"):
        pre = module.register_forward_pre_hook(_open_tape)
        _hook_recorders(module)
        post = module.register_forward_hook(_close_tape, always_call=True)
        vars(module)["_jacext_root_handles"] = (pre, post)
    return module


def unextend(module: nn.Module) -> nn.Module:
    """Remove every hook and attribute ``extend`` added (BackPACK's own hooks excepted)."""
    for m in module.modules():
        _restore(m, {})
    return module


@contextmanager
def temporarily_extended(module: nn.Module):
    """``module`` extended for the duration, then exactly as before (modules the user extended
    stay extended, with their own paths)."""
    if is_extended(module):
        yield module
        return
    before = {m: {k: v for k, v in vars(m).items() if k.startswith("_jacext")} for m in module.modules()}
    extend(module)
    try:
        yield module
    finally:
        for m in module.modules():
            _restore(m, before.get(m, {}))


def _restore(m: nn.Module, old: dict) -> None:
    """Set m's jacext attributes back to ``old``, removing the hooks of those not in it."""
    for key in [k for k in vars(m) if k.startswith("_jacext")]:
        if key in old:
            vars(m)[key] = old[key]
            continue
        if key.endswith("handles"):
            for handle in vars(m)[key]:
                handle.remove()
        del vars(m)[key]


def is_extended(module: nn.Module) -> bool:
    return hasattr(module, "_jacext_root_handles")


def take_last_tape() -> Optional[Tape]:
    """The tape of the last forward pass of an extended root (handed over once)."""
    global _last
    tape, _last = (_last() if _last is not None else None), None
    return tape


def _hook_recorders(root: nn.Module) -> None:
    for m in root.modules():
        if not hasattr(m, "_jacext_record_handles") and any(True for _ in m.parameters(recurse=False)):
            vars(m)["_jacext_record_handles"] = (
                m.register_forward_pre_hook(_enter),
                m.register_forward_hook(_record, with_kwargs=True, prepend=True, always_call=True),
            )


def install_guard() -> None:
    """Once per process: a global forward pre-hook that catches models used with a jacext
    extension active but never extended (they would otherwise get no attributes, silently)."""
    global _guard_installed
    if not _guard_installed:
        nn.modules.module.register_module_forward_pre_hook(_guard)
        _guard_installed = True


_guard_installed = False


def _guard(module: nn.Module, args) -> None:
    if _current is not None or is_extended(module) or not torch.is_grad_enabled():
        return
    if not any(isinstance(e, JacextExtension) for e in CTX.get_active_exts()):
        return
    if any(p.requires_grad for p in module.parameters()) and not any(is_extended(m) for m in module.modules()):
        raise JacextError(
            f"{type(module).__name__} with trainable parameters runs inside a backpack context with "
            f"jacext extensions, but neither it nor a module inside it was extended: call "
            "model = jacext.extend(model) once before the forward pass."
        )


def _check_batchnorm(module: nn.Module, args) -> None:
    """While a tape records: refuse batch statistics without a choice (before anything is computed),
    and mark the tape coupled for batchnorm="exact", whether or not the module has parameters."""
    if _current is not None:
        require_choice(module)
        _current.coupled = _current.coupled or couples_samples(module)


def _to_eval(module: nn.Module, args) -> None:
    """batchnorm="eval": normalise with the running statistics while a tape records."""
    vars(module)["_jacext_mode"] = module.training
    if _current is not None and vars(module).get("_jacext_batchnorm") == "eval":  # not if re-extended since
        module.training = False


def _back_to_mode(module: nn.Module, args, output) -> None:
    mode = vars(module).pop("_jacext_mode", None)  # None: a pre-hook before _to_eval raised
    if mode is not None:
        module.training = mode


def _open_tape(root: nn.Module, args) -> None:
    global _current
    if _current is not None or not torch.is_grad_enabled():
        return
    exts = CTX.get_active_exts()
    others = [e for e in exts if not isinstance(e, JacextExtension)]
    if others and not getattr(root, "_jacext_backpack", False):
        raise JacextError(
            f"BackPACK extensions {others} are active but the model was extended without BackPACK's "
            "hooks; use jacext.extend(model, backpack=True) to combine them with jacext's."
        )
    ours = [e for e in exts if isinstance(e, JacextExtension)]
    if ours:
        _hook_recorders(root)  # modules added after extend()
        _current = Tape(root, ours)
        _current.uses.__enter__()


def _enter(module: nn.Module, args) -> None:
    if _current is not None:
        _current.uses.enter(module)


def _record(module: nn.Module, args, kwargs, output):
    if _current is None:
        return None
    _current.uses.leave(module)
    with _current.uses.pausing():
        if output is None:  # the forward raised
            return None
        return _current.record(module, args, kwargs, output, _first_forward_hook(module))


def _first_forward_hook(module: nn.Module) -> bool:
    """Whether the recording hook is the first forward hook to run on ``module``'s output."""
    first = next(iter(module._forward_hooks), None)
    return first == vars(module)["_jacext_record_handles"][1].id and not _global_forward_hooks


def _close_tape(root: nn.Module, args, output) -> Optional[Tensor]:
    global _current, _last
    tape = _current
    if tape is None:
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(_refuse_without_tape)
        return None
    if tape.root is not root:
        return None
    _current = None
    tape.uses.__exit__(None, None, None)
    if output is None:  # the forward pass raised
        return None
    if not isinstance(output, Tensor):
        raise JacextError(
            f"jacext differentiates the output of the extended module ({type(root).__name__}), which "
            f"returned {type(output).__name__}, not a tensor. Extend a wrapper module that returns "
            "the tensor of shape (N, ...) to differentiate."
        )
    if output.dim() == 0:
        raise JacextError(
            f"the extended module ({type(root).__name__}) returned an output of shape () without a batch "
            "dimension; jacext needs its output per sample, of shape (N, ...). Extend the model, not "
            "the model and its loss."
        )
    _last = weakref.ref(tape)
    if not output.requires_grad:
        return None
    # The hook (which holds the tape, which holds the records' autograd edges) lives on the
    # output's grad_fn. If that node were itself a record's edge (a root ending in a Linear),
    # node -> hook -> tape -> edge -> node would be a reference cycle through C++ that nothing
    # frees. An alias of the output has its own node, which no record references.
    output = output.view_as(output)
    output.register_hook(partial(_on_root_grad, tape, output.shape, output.output_nr))
    return output


def _refuse_without_tape(grad: Tensor) -> None:
    """On the output of a forward pass that no jacext extension recorded: its backward must not
    run inside a context with one (it would compute nothing, and leave the last batch's results)."""
    if any(isinstance(e, JacextExtension) for e in CTX.get_active_exts()):
        raise JacextError(
            "the backward pass runs inside a backpack context with jacext extensions, but the forward "
            "pass of the extended model ran outside it, so nothing was recorded. Run the forward pass "
            "inside the same `with backpack(...)` block."
        )


@torch.compiler.disable
def _on_root_grad(tape: Tape, shape: torch.Size, output_nr: int, grad: Tensor) -> Optional[Tensor]:
    """Runs when the backward pass reaches the root output, before the model's own backward.

    Returns the cotangent the model's own backward continues with: unchanged, or rescaled
    per sample by an extension that asks for it (``jacext.dp.ClipGrad``)."""
    if tape.busy:  # the tape's own batched backward passes through here too
        return None
    _one_tape_per_backward(tape)
    rescaling = [(i, e) for i, e in enumerate(tape.extensions) if hasattr(e, "rescale")]
    if len(rescaling) > 1 or (rescaling and tape.coupled):
        raise JacextError(
            "per-sample rescaling of the cotangent (ClipGrad) needs exactly one such extension and "
            "independent samples (not batchnorm='exact')"
        )
    if tape.arm_inline(shape, grad):  # G is caught as this backward goes on; results at its end
        engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
        engine.queue_callback(partial(_assign_inline, tape, shape, grad))
        return None
    # the node being evaluated is the root output's grad_fn; holding it only here avoids a cycle
    out_edge = GradientEdge(torch._C._current_autograd_node(), output_nr)
    results = tape.compute(out_edge, shape, grad)  # raising here, it leaves p.grad and attributes as they were
    _assign(tape, results)
    if not rescaling:
        return None
    i, ext = rescaling[0]
    return ext.rescale(grad, [values[i] for values in results.values()])


def _assign_inline(tape: Tape, shape: torch.Size, grad: Tensor) -> None:
    with tape.cleared_on_error():
        results = tape.compute_inline(shape, grad)
    _assign(tape, results)


def _assign(tape: Tape, results) -> None:
    """Every parameter's results; a frozen parameter keeps none of an earlier batch."""
    for p in tape.parameters:
        for ext, value in zip(tape.extensions, results.get(p, ())):
            setattr(p, ext.savefield, value)
        if p not in results:
            for ext in tape.extensions:
                vars(p).pop(ext.savefield, None)


_computed: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()  # root -> last graph task


def _one_tape_per_backward(tape: Tape) -> None:
    """Refuse a second forward pass of the same model reaching the same backward: each would
    store its own batch's results on the same parameters."""
    task = torch._C._current_graph_task_id()
    if _computed.get(tape.root) == task:
        raise JacextError(
            f"two forward passes of the extended model ({type(tape.root).__name__}) reach one backward "
            "pass; jacext stores one batch's per-sample results on the parameters. Run one forward "
            "pass on the concatenated batch (torch.cat) instead."
        )
    _computed[tape.root] = task
