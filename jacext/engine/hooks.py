"""The hooks that feed the engine, and the recording session they share.

The tape of the forward pass in progress lives in a context variable, so each thread (and
each asyncio task) records its own. Forward hooks, installed by ``jacext.extend``:

* on the root: open a tape (:func:`open_tape`) and close it (:func:`close_tape`), putting a
  hook on the root output that runs the backward's plan (:func:`on_root_grad`);
* on every module that owns parameters: record its call (:func:`enter`, :func:`record`);
* on layers with a policy for coupled samples (BatchNorm): check the choice, switch the mode
  (:func:`before_layer`, :func:`after_layer`).

A process-wide forward pre-hook (:func:`guard`, installed when this module is imported) refuses
models that run inside a context with jacext extensions without having been extended.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Iterator, List, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.nn.modules.module import _global_forward_hooks

from jacext.engine import backpack_ctx
from jacext.engine.demand import Demand
from jacext.engine.plan import choose_plan
from jacext.engine.record import Tape
from jacext.errors import JacextError
from jacext.extensions import JacextExtension
from jacext.rules import layer_of
from jacext.state import ensure_state, state_of

_recording: ContextVar[Optional[Tape]] = ContextVar("jacext_recording", default=None)
_captured: ContextVar[Optional[List[Tape]]] = ContextVar("jacext_captured", default=None)


def recording() -> Optional[Tape]:
    """The tape of the forward pass in progress in this thread or task, if any."""
    return _recording.get()


@contextmanager
def capturing() -> Iterator[List[Tape]]:
    """The tapes that extended roots close inside the block, for callers that compute the
    results themselves (``jacext.jacobian``, ``jacext.ntk``)."""
    tapes: List[Tape] = []
    token = _captured.set(tapes)
    try:
        yield tapes
    finally:
        _captured.reset(token)


def guard(module: nn.Module, args) -> None:
    """Catch models used with a jacext extension active but never extended (they would otherwise
    get no attributes, silently)."""
    if not torch.is_grad_enabled() or _recording.get() is not None or is_extended(module):
        return
    if not backpack_ctx.jacext_active():
        return
    if any(p.requires_grad for p in module.parameters()) and not any(is_extended(m) for m in module.modules()):
        raise JacextError(
            f"{type(module).__name__} with trainable parameters runs inside a backpack context with "
            f"jacext extensions, but neither it nor a module inside it was extended: call "
            "model = jacext.extend(model) once before the forward pass."
        )


def is_extended(module: nn.Module) -> bool:
    state = state_of(module)
    return state is not None and state.root


def hook_recorders(root: nn.Module) -> None:
    """Recording hooks on every module of ``root`` that owns parameters and has none yet."""
    for m in root.modules():
        state = ensure_state(m)
        if "record" not in state.handles and any(True for _ in m.parameters(recurse=False)):
            state.handles["record"] = (
                m.register_forward_pre_hook(enter),
                m.register_forward_hook(record, with_kwargs=True, prepend=True, always_call=True),
            )


def open_tape(root: nn.Module, args) -> None:
    if _recording.get() is not None or not torch.is_grad_enabled():
        return
    exts = backpack_ctx.active_extensions()
    others = [e for e in exts if not isinstance(e, JacextExtension)]
    state = ensure_state(root)
    if others and not state.backpack:
        raise JacextError(
            f"BackPACK extensions {others} are active but the model was extended without BackPACK's "
            "hooks; use jacext.extend(model, backpack=True) to combine them with jacext's."
        )
    ours = tuple(e for e in exts if isinstance(e, JacextExtension))
    if ours:
        hook_recorders(root)  # modules added after extend()
        tape = Tape(root, Demand(ours, backpack=state.backpack))
        _recording.set(tape)
        tape.uses.__enter__()


def enter(module: nn.Module, args) -> None:
    tape = _recording.get()
    if tape is not None:
        tape.uses.enter(module)


def record(module: nn.Module, args, kwargs, output):
    tape = _recording.get()
    if tape is None:
        return None
    tape.uses.leave(module)
    with tape.uses.pausing():
        if output is None:  # the forward raised
            return None
        return tape.record(module, args, kwargs, output, _first_forward_hook(module))


def _first_forward_hook(module: nn.Module) -> bool:
    """Whether the recording hook is the first forward hook to run on ``module``'s output."""
    first = next(iter(module._forward_hooks), None)
    state = state_of(module)
    return state is not None and first == state.handles["record"][1].id and not _global_forward_hooks


def before_layer(module: nn.Module, args) -> None:
    """While a tape records, the layer's policy: refuse a call without a usable choice (before
    anything is computed), mark the tape coupled, switch the mode it records in."""
    tape, policy = _recording.get(), layer_of(module).policy
    if tape is None or policy is None:
        return
    policy.check(module)
    tape.coupled = tape.coupled or policy.couples(module)
    mode = policy.mode(module)
    if mode is not None:
        ensure_state(module).saved_training = module.training
        module.training = mode


def after_layer(module: nn.Module, args, output) -> None:
    state = state_of(module)
    if state is not None and state.saved_training is not None:
        module.training, state.saved_training = state.saved_training, None


def close_tape(root: nn.Module, args, output) -> Optional[Tensor]:
    tape = _recording.get()
    if tape is None:
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(_refuse_without_tape)
        return None
    if tape.root is not root:
        return None
    _recording.set(None)
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
    captured = _captured.get()
    if captured is not None:
        captured.append(tape)
    if not output.requires_grad:
        return None
    # The hook (which holds the tape, which holds the records' autograd edges) lives on the
    # output's grad_fn. If that node were itself a record's edge (a root ending in a Linear),
    # node -> hook -> tape -> edge -> node would be a reference cycle through C++ that nothing
    # frees. An alias of the output has its own node, which no record references.
    output = output.view_as(output)
    output.register_hook(partial(on_root_grad, tape, output.shape, output.output_nr))
    return output


def _refuse_without_tape(grad: Tensor) -> None:
    """On the output of a forward pass that no jacext extension recorded: its backward must not
    run inside a context with one (it would compute nothing, and leave the last batch's results)."""
    if backpack_ctx.jacext_active():
        raise JacextError(
            "the backward pass runs inside a backpack context with jacext extensions, but the forward "
            "pass of the extended model ran outside it, so nothing was recorded. Run the forward pass "
            "inside the same `with backpack(...)` block."
        )


@torch.compiler.disable
def on_root_grad(tape: Tape, shape: torch.Size, output_nr: int, grad: Tensor) -> Optional[Tensor]:
    """Runs when the backward pass reaches the root output, before the model's own backward:
    chooses the plan (jacext.engine.plan) and starts it. Returns the cotangent the model's own
    backward continues with: unchanged, or rescaled per sample (``jacext.dp.ClipGrad``)."""
    if tape.pulling:  # the engine's own batched backward passes through here too
        return None
    _one_tape_per_backward(tape)
    if len(tape.demand.rescalers) > 1 or (tape.demand.rescalers and tape.coupled):
        raise JacextError(
            "per-sample rescaling of the cotangent (ClipGrad) needs exactly one such extension and "
            "independent samples (not batchnorm='exact')"
        )
    plan = choose_plan(tape, shape)(tape, shape, grad)
    ensure_state(tape.root).plan = plan.name
    tape.plan = plan
    # the node being evaluated is the root output's grad_fn; holding it only here avoids a cycle
    return plan.at_root(GradientEdge(torch._C._current_autograd_node(), output_nr))


def _one_tape_per_backward(tape: Tape) -> None:
    """Refuse a second forward pass of the same model reaching the same backward: each would
    store its own batch's results on the same parameters."""
    task = torch._C._current_graph_task_id()
    state = ensure_state(tape.root)
    if state.last_task == task:
        raise JacextError(
            f"two forward passes of the extended model ({type(tape.root).__name__}) reach one backward "
            "pass; jacext stores one batch's per-sample results on the parameters. Run one forward "
            "pass on the concatenated batch (torch.cat) instead."
        )
    state.last_task = task


nn.modules.module.register_module_forward_pre_hook(guard)
