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

import sys
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from types import FrameType
from typing import Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.module import _global_forward_hooks
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from jacext.engine import backpack_ctx, penalty
from jacext.engine.batch import Layout
from jacext.engine.demand import Demand
from jacext.engine.plan import Inline, InlineFused, Plan, choose_plan
from jacext.engine.record import Alias, InputGate, InputPlace, Tape, drop_results
from jacext.engine.trees import leaves
from jacext.errors import JacextError
from jacext.extensions import BatchJacobian, JacextExtension
from jacext.rules import layer_of
from jacext.rules.batchnorm import at_batch_statistics
from jacext.state import ModuleState, ensure_state, module_label, state_of

_recording: ContextVar[Optional[Tape]] = ContextVar("jacext_recording", default=None)
_captured: ContextVar[Optional[List[Tape]]] = ContextVar("jacext_captured", default=None)
_serving: "weakref.WeakValueDictionary[int, Tape]" = weakref.WeakValueDictionary()  # by graph task
_abandoned: List = []  # the modes of tapes whose forward ended without closing them
_last_tape = WeakIdKeyDictionary()  # parameter -> the _LastForward that recorded it (None: not yet)
SCRIPTING = "__prepare_scriptable__"  # what torch.jit.script calls on every module first (see adopt)


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
    if _abandoned:
        _sweep()
    if not torch.is_grad_enabled() or _recording.get() is not None or state_of(module) is not None:
        return  # (a module with jacext's state is part of an extended model: recomputed by checkpointing)
    if not backpack_ctx.jacext_active():
        return
    if isinstance(module, torch.jit.ScriptModule) and any(p.requires_grad for p in module.parameters()):
        raise JacextError(
            _scripted(f"{type(module).__name__}, running inside a backpack context with jacext extensions,")
        )
    if any(p.requires_grad for p in module.parameters()) and not any(is_extended(m) for m in module.modules()):
        raise JacextError(
            f"{type(module).__name__} with trainable parameters runs inside a backpack context with "
            f"jacext extensions, but neither it nor a module inside it was extended: call "
            "model = jacext.extend(model) once before the forward pass."
        )


def is_extended(module: nn.Module) -> bool:
    state = state_of(module)
    return state is not None and state.root


def _scripted(what: str) -> str:
    return (
        f"{what} is a TorchScript module (torch.jit.script or torch.jit.trace): its forward runs compiled "
        "code that calls none of jacext's Python hooks, so jacext cannot record it. Extend and run the eager "
        "model; for export, script or trace a copy without jacext's hooks: jacext.unextend(copy.deepcopy(model))."
    )


def refuse_scripted(root: nn.Module) -> None:
    """Refuse a model that holds a TorchScript module, before anything is hooked."""
    for name, m in root.named_modules():
        if isinstance(m, torch.jit.ScriptModule):
            raise JacextError(_scripted(f"module '{name or '<root>'}' ({type(m).__name__})"))


def _not_scriptable(path: str) -> None:
    """``__prepare_scriptable__`` of a module jacext extended: ``torch.jit.script`` calls it first."""
    raise JacextError(
        f"module '{path}' is extended by jacext, whose forward hooks are Python code that TorchScript cannot "
        "compile or run. Script a copy without them: torch.jit.script(jacext.unextend(copy.deepcopy(model))); "
        "train with the eager model (torch.compile works with jacext's hooks)."
    )


def adopt(module: nn.Module, path: str, options: dict) -> ModuleState:
    """jacext's state on a module of an extended model: its path (for messages), the options
    chosen at ``extend``, the hooks of its layer's policy (BatchNorm, also without parameters:
    :func:`before_layer`), and a ``__prepare_scriptable__`` that refuses ``torch.jit.script``."""
    state = ensure_state(module)
    state.path = path
    state.options.update(options)
    vars(module)[SCRIPTING] = partial(_not_scriptable, path)
    if layer_of(module).policy is not None and "policy" not in state.handles:
        state.handles["policy"] = (
            module.register_forward_pre_hook(before_layer),
            module.register_forward_hook(after_layer, always_call=True),
        )
    return state


def hook_recorders(root: nn.Module) -> None:
    """Recording hooks on every module of ``root`` that owns parameters and has none yet, and
    a gradient hook on each of those parameters (:func:`on_parameter_grad`). A module added
    after ``extend`` is adopted first, with the root's options."""
    paths = None
    for m in root.modules():
        state = state_of(m)
        if state is None:
            if paths is None:
                refuse_scripted(root)
            paths = paths or {id(sub): name for name, sub in root.named_modules()}
            state = adopt(m, paths[id(m)], ensure_state(root).options)
        own = list(m.named_parameters(recurse=False))
        if "record" not in state.handles and own:
            state.handles["record"] = (
                m.register_forward_pre_hook(enter),
                m.register_forward_hook(record, with_kwargs=True, prepend=True, always_call=True),
            )
            hooked = [(n, p) for n, p in own if p.requires_grad and p not in _last_tape]  # (a tied one: once)
            for _, p in hooked:
                _last_tape[p] = None
            state.handles["grads"] = tuple(
                p.register_hook(partial(on_parameter_grad, weakref.ref(p), f"'{state.path}.{n}'")) for n, p in hooked
            )


class _LastForward:
    """A parameter's link to the forward pass that last recorded it: its tape, weakly (the graph
    holds the tape, which dies with it), and what dropping that pass's results needs after the
    tape has died: the root, weakly, and the attributes BackPACK's own extensions write."""

    __slots__ = ("tape", "root", "foreign_fields")

    def __init__(self, tape: Tape):
        self.tape, self.root = weakref.ref(tape), weakref.ref(tape.root)
        self.foreign_fields = frozenset(tape.foreign_fields)

    def drop_results(self) -> None:
        tape, root = self.tape(), self.root()
        if tape is not None:
            tape.drop_results()
        elif root is not None:
            drop_results(root.parameters(), self.foreign_fields)


def on_parameter_grad(param: "weakref.ref[nn.Parameter]", name: str, grad: Tensor) -> None:
    """On every parameter of an extended model, as a backward computes its gradient: refuse a
    backward that would leave results that are not this backward's. Inside a jacext context, a
    backward must have passed through the output of the forward pass that last recorded the
    parameter (else: ``module.forward(x)`` called directly, a forward outside the context, a loss
    of parameters alone: the attributes would hold an earlier batch). And no backward that
    jacext serves may also run through a graph that an earlier ``create_graph=True`` backward
    built (a Hessian-vector product) unless it is served as a gradient penalty
    (jacext.engine.penalty): its terms would reach ``p.grad`` through no recorded call."""
    p = param()
    if p is None or not backpack_ctx.jacext_active():
        return
    last = _last_tape.get(p)
    tape = last.tape() if last is not None else None
    task = torch._C._current_graph_task_id()
    if tape is not None and tape.served == task:
        if torch.is_grad_enabled():  # a parameter gradient with a graph (a Hessian-vector product may follow)
            tape.built_parameter_grads = True
        if tape.built_graph not in (None, task) and tape.penalty_task != task:
            penalty.serve(tape)  # (refused where that graph may hold a use no tap sees; once per backward)
        # (zeros: a parameter that ClipGrad's gate hands on without a use)
        if not tape.reaches(p) and grad is not None and bool(grad.ne(0).any()):
            tape.drop_results()
            raise JacextError(
                f"parameter {name} gets a gradient in this backward pass through a use that jacext did not "
                f"see in the forward pass of {type(tape.root).__name__} (not an operation of torch that it "
                "watches, nor a call of a module with a rule), so its per-sample results would be missing. "
                "Use the parameter through an operation of torch (F.linear, a product) or a module, or "
                "register a rule for the module that uses it (jacext.rules.register)."
            )
        return
    if tape is not None and tape.pulling:
        return
    if tape is not None and tape.built_graph not in (None, task):
        raise penalty.refusal(tape)
    if last is not None:
        last.drop_results()
    raise JacextError(
        f"a backward pass inside a context with jacext extensions reaches parameter {name} of an extended "
        "model without passing through the output of a forward pass jacext recorded in this context, so "
        "there are no per-sample results for it. Run the forward pass inside the same `with backpack(...)` "
        "block, call the model (model(x), not model.forward(x)), and differentiate a loss computed from "
        "its output."
    )


def open_tape(root: nn.Module, args, kwargs) -> Optional[Tuple[tuple, dict]]:
    open_ = _recording.get()
    if not torch.is_grad_enabled() or open_ is not None and not abandon_if_stale(open_):
        return None  # (an extended module inside an extended model: the outer tape records it)
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
        inputs = [t for t in leaves((args, kwargs)) if isinstance(t, Tensor)]
        dim = 0  # the samples: the first dimension of the first tensor input
        if not inputs or inputs[0].dim() <= dim:
            shape = tuple(inputs[0].shape) if inputs else None
            raise JacextError(
                f"{type(root).__name__} got an input of shape {shape} without a batch dimension {dim}: jacext "
                f"takes the samples from dimension {dim} of the extended module's first tensor input. Pass a "
                "batch (x.unsqueeze(0) for a single sample)."
            )
        tape = Tape(root, Demand(ours, backpack=state.backpack), inputs[0].shape[dim])
        tape.foreign_fields = {e.savefield for e in others}
        gated = _gate_inputs(tape, args, kwargs, dim) if tape.demand.rescaler is not None else None
        if gated is not None:
            args, kwargs = gated
            inputs = [t for t in leaves((args, kwargs)) if isinstance(t, Tensor)]
        tape.batch.seed(inputs, dim)
        tape.tapping = tape.demand.one_cotangent and any(t.requires_grad for t in inputs)
        tape.batch.on_batch_statistics = partial(at_batch_statistics, tape)
        last = _LastForward(tape)
        for p in tape.parameters:
            _last_tape[p] = last
        tape.frame = sys._getframe(1)  # the root's call, running until close_tape
        tape.uses.stale = partial(abandon_if_stale, tape)
        _recording.set(tape)
        tape.uses.__enter__()
        return gated
    return None


def _gate_inputs(tape: Tape, args, kwargs, dim: int):
    """The root's batched inputs that require a gradient, each behind an :class:`InputGate`
    (``(args, kwargs)``), or None where there is none."""
    flat, spec = tree_flatten((args, kwargs))
    ref = weakref.ref(tape)
    for i, t in enumerate(flat):
        if tape.batch.is_batch_input(t, dim) and t.requires_grad:
            place = InputPlace()
            flat[i] = InputGate.apply(ref, place, t)
            tape.input_gates.append((place, flat[i]))
    return tree_unflatten(flat, spec) if tape.input_gates else None


def _settle_input_gates(tape: Tape) -> None:
    """At the end of the forward: where each gated input's batch is (a seq-first layer on the
    root's input moves it)."""
    for place, t in tape.input_gates:
        tag = tape.batch.tag(t)
        place.dim = tag.dim if isinstance(tag, Layout) and tag.rows is None else None
    tape.input_gates = []


def abandon_if_stale(tape: Tape) -> bool:
    """Whether ``tape``'s forward pass ended without closing it (a KeyboardInterrupt, or any
    BaseException, which skips the hooks that close it); if so, stop recording: torch's mode
    stack and this thread's state are left as they were before that forward pass."""
    frame: Optional[FrameType] = sys._getframe()
    while frame is not None:
        if frame is tape.frame:
            return False
        frame = frame.f_back
    tape.frame = None
    if _recording.get() is tape:
        _recording.set(None)
    tape.uses.paused = True  # inert from now on; off the stack once no operation of it runs
    _abandoned.append(tape.uses)
    _sweep()
    return True


def _sweep() -> None:
    """Take the modes of abandoned tapes off the top of torch's mode stack (not possible while
    one of them handles an operation: it is back on the stack after that)."""
    depth = torch._C._len_torch_function_stack()
    while depth and _abandoned and torch._C._get_function_stack_at(depth - 1) in _abandoned:
        _abandoned.remove(torch._C._pop_torch_function_stack())
        depth -= 1


def enter(module: nn.Module, args) -> Optional[tuple]:
    tape = _recording.get()
    if tape is None and torch.is_grad_enabled():
        _refuse_recomputation(module)
    if tape is not None:
        tape.uses.enter(module)
        tape.meets_at[id(module)] = len(tape.meets)
        layer = layer_of(module)
        if layer.batch_dim is not None and args and isinstance(args[0], Tensor):
            tape.batch.declare(args[0], layer.batch_dim(module))
        if tape.tapping:
            return _tapped(tape, module, layer, args)
    return None


def _tapped(tape: Tape, module: nn.Module, layer, args) -> Optional[tuple]:
    """Where the root's input requires a gradient: the first input of a layer whose rule serves
    gradient penalties, where it holds the batch, through an
    :class:`jacext.engine.penalty.InputTap` (its slot kept for the call's record; None where there
    is none, so that each record takes its own call's)."""
    x = args[0] if args else None
    slot = None
    alone = not any(a is x for a in args[1:])  # (a tapped copy would change a forward that tests `is`)
    ruled = layer.affine or layer.forward_ad
    if ruled and alone and isinstance(x, Tensor) and x.requires_grad and isinstance(tape.batch.tag(x), Layout):
        with tape.uses.pausing():
            tapped, slot = penalty.tap(tape, x)
        tape.batch.retag([x], [tapped])
        args = (tapped, *args[1:])
    tape.taps.setdefault(id(module), []).append(slot)
    return args if slot is not None else None


def _refuse_recomputation(module: nn.Module) -> None:
    """A call during a backward that jacext serves, of a module whose forward-time call ran
    without gradients: reentrant activation checkpointing recomputing it. Its records would
    come too late for the plan, which would give it zero results."""
    task = torch._C._current_graph_task_id()
    served = _serving.get(task) if task >= 0 else None
    if served is None or id(module) not in served.no_grad_calls:
        return
    served.drop_results()
    raise JacextError(
        f"module {module_label(module)} is recomputed in the backward pass by reentrant activation "
        "checkpointing (torch.utils.checkpoint with use_reentrant=True), whose forward pass ran without "
        "gradients, so jacext recorded nothing for it. Use torch.utils.checkpoint(..., use_reentrant=False)."
    )


def record(module: nn.Module, args, kwargs, output):
    tape = _recording.get()
    if tape is not None and not torch.is_grad_enabled():
        tape.no_grad_calls.add(id(module))
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
    tape.frame = None
    tape.end_forward()
    _settle_input_gates(tape)
    if output is None:  # the forward pass raised (a refusal of jacext's too): the last batch's results are stale
        tape.drop_results()
        return None
    try:
        return _hand_on(tape, root, output)
    except JacextError:
        tape.drop_results()
        raise


def _hand_on(tape: Tape, root: nn.Module, output) -> Optional[Tensor]:
    """The root's output, with the hooks that run the backward's plan on the leaves that hold
    the samples (on aliases, handed on instead), or a refusal of an output without them."""
    if isinstance(output, Tensor) and output.dim() == 0:
        raise JacextError(
            f"the extended module ({type(root).__name__}) returned an output of shape () without a batch "
            "dimension; jacext needs its output per sample, of shape (N, ...). Extend the model, not "
            "the model and its loss."
        )
    captured = _captured.get()
    if captured is not None:
        captured.append(tape)
    flat, spec = tree_flatten(output)
    at = _per_sample_leaves(tape, root, output, flat)
    watched = set() if isinstance(output, Tensor) else _reached_inside(flat, at)
    for i in at:
        # The hook (which holds the tape, which holds the records' autograd edges) lives on the
        # output's grad_fn. If that node were itself a record's edge (a root ending in a Linear),
        # node -> hook -> tape -> edge -> node would be a reference cycle through C++ that nothing
        # frees. An alias of the output has its own node, which no record references; not a
        # view, so that an in-place operation on the returned output (out /= T) builds on it.
        original = flat[i]
        alias = Alias.apply(original)
        alias.register_hook(partial(on_root_grad, tape, alias.shape, alias.output_nr, i, len(at) > 1))
        if tape.out_shape is None:
            tape.out_shape, tape.out_dtype = alias.shape, alias.dtype
        flat[i] = alias
        if i in watched:
            # a loss computed inside the forward (HuggingFace's labels=) uses the original: a
            # hook there holds the tape weakly; the loss's own node holds it (below)
            inside = partial(_inside, weakref.ref(tape), original.shape, original.output_nr, i, len(at) > 1)
            original.register_hook(inside)
    if not at:
        return None
    if isinstance(output, Tensor):
        return flat[0]
    for o in flat:
        if isinstance(o, Tensor) and o.requires_grad and o.dim() == 0:
            o.register_hook(partial(_keep, tape))
    return tree_unflatten(flat, spec)


def _reached_inside(flat: List, at: List[int]) -> Set[int]:
    """The per-sample leaves ``at`` whose originals a loss computed inside the forward (another
    leaf with a gradient) reaches other than through another per-sample leaf: a backward from
    that loss starts the plan there. One reached only through another (the encoder's output, from
    which the decoder computes the logits) is a path of that one's plan, not a second start."""
    ends = {}
    for i in at:
        edge = get_gradient_edge(flat[i])
        ends[(id(edge.node), edge.output_nr)] = i
    losses = [o for j, o in enumerate(flat) if j not in at and isinstance(o, Tensor) and o.requires_grad]
    stack = [get_gradient_edge(o) for o in losses]
    found: Set[int] = set()
    seen: Set[int] = set()
    while stack:
        edge = stack.pop()
        end = ends.get((id(edge.node), edge.output_nr))
        if end is not None:
            found.add(end)
        elif id(edge.node) not in seen:
            seen.add(id(edge.node))
            stack += [GradientEdge(node, nr) for node, nr in edge.node.next_functions if node is not None]
    return found


def _keep(tape: Tape, grad: Tensor) -> None:
    """On a loss in the output: keeps the tape alive while that loss can be differentiated."""


def _inside(tape: "weakref.ref[Tape]", shape, output_nr: int, leaf: int, several: bool, grad: Tensor):
    t = tape()
    if t is None or (t.served == torch._C._current_graph_task_id() and leaf in t.served_leaves):
        return None  # the tape is gone, or the returned alias of this leaf started the plan
    return on_root_grad(t, shape, output_nr, leaf, several, grad)


def _per_sample_leaves(tape: Tape, root: nn.Module, output, flat: List) -> List[int]:
    """Which output leaves the backward's plan starts from: the tensor output, or, in a tuple,
    dict or ``ModelOutput``, every leaf with a gradient that holds the samples in its first
    dimension (a loss computed inside the forward reaches the results through them)."""
    if isinstance(output, Tensor):
        if output.requires_grad and tape.batch.free_parameters and tape.batch.tag(output) is None:
            raise JacextError(
                f"the output of the extended module ({type(root).__name__}) does not depend on its input's "
                "batch, but on layers called without it (such as positional embeddings): it has no "
                "per-sample derivatives. Give the extended module inputs whose first dimension is the batch."
            )
        _refuse_complex_jacobian(tape, root, [output])
        return [0] if output.requires_grad else []
    at = [
        i
        for i, o in enumerate(flat)
        if isinstance(o, Tensor) and o.requires_grad and o.dim() > 0 and tape.batch.tag(o) == Layout(0)
    ]
    if not at and any(isinstance(o, Tensor) and o.requires_grad for o in flat):
        raise JacextError(
            f"the extended module ({type(root).__name__}) returned a {type(output).__name__} without a "
            "tensor that holds the samples in its first dimension; jacext needs an output per sample, "
            "of shape (N, ...), to differentiate (a loss computed inside the forward may come with it)."
        )
    jacobians = [e for e in tape.extensions if isinstance(e, BatchJacobian)]
    if jacobians:
        at = _differentiated(root, output, flat, at, jacobians[0])
    _refuse_complex_jacobian(tape, root, [flat[i] for i in at])
    return at


def _differentiated(root: nn.Module, output, flat: List, at: List[int], ext: BatchJacobian) -> List[int]:
    """The one leaf BatchJacobian differentiates: the one ``output=`` names, or the only one
    with the samples in its first dimension."""
    chosen = ext.select(output)
    if chosen is not None:
        found = [i for i in at if flat[i] is chosen]
        if not found:
            raise JacextError(
                f"BatchJacobian(output={ext.output!r}) selects a tensor of the output of {type(root).__name__} that "
                f"has no gradient or does not hold the samples in its first dimension (shape {tuple(chosen.shape)})."
            )
        return found
    if len(at) > 1:
        paths = [keystr(path) for path, _ in tree_flatten_with_path(output)[0]]
        candidates = ", ".join(f"output{paths[i]} {tuple(flat[i].shape)}" for i in at)
        raise JacextError(
            f"the output of {type(root).__name__} holds several tensors with the samples in their first "
            f"dimension ({candidates}); name the one BatchJacobian differentiates: BatchJacobian(output=key), "
            "with a key or an index, or a function of the output."
        )
    return at


def _refuse_complex_jacobian(tape: Tape, root: nn.Module, outputs: List[Tensor]) -> None:
    """Real one-hot seeds at a complex output pull back the real part of its Jacobian only."""
    if any(o.is_complex() for o in outputs) and any(isinstance(e, BatchJacobian) for e in tape.extensions):
        raise JacextError(
            f"the output of the extended module ({type(root).__name__}) is complex; BatchJacobian differentiates "
            "real outputs. Return torch.view_as_real(output): p.jacobian then has shape (N, *out, 2, *p.shape), "
            "the real and imaginary parts of the Jacobian at index 0 and 1 of the dimension after the output's."
        )


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
def on_root_grad(
    tape: Tape, shape: torch.Size, output_nr: int, leaf: int, several: bool, grad: Tensor
) -> Optional[Tensor]:
    """Runs when the backward pass reaches the root output, before the model's own backward:
    chooses the plan (jacext.engine.plan) and starts it. Returns the cotangent the model's own
    backward continues with: unchanged, or rescaled per sample (``jacext.dp.ClipGrad``).
    ``several``: the output has several per-sample leaves, each with this hook."""
    if tape.pulling:  # the engine's own batched backward passes through here too
        return None
    task = torch._C._current_graph_task_id()
    if tape.served == task:  # a second per-sample leaf of the same output
        tape.served_leaves.add(leaf)
        if tape.plan is not None and isinstance(tape.plan, Inline):
            return None  # the inline plan catches what flows through every leaf
        tape.drop_results()
        raise JacextError(
            f"the backward pass reaches several per-sample outputs of the extended module "
            f"({type(tape.root).__name__}), and the extensions need it to start from one. Return the output "
            "to differentiate alone (or first, for BatchJacobian), or compute the loss from one output."
        )
    _begin_serving(tape, task, {leaf})
    if torch.is_grad_enabled():  # backward(create_graph=True): it builds a graph a later backward may run through
        tape.built_graph = task
        tape.built_graphs += 1
    if len(tape.demand.rescalers) > 1 or (tape.demand.rescalers and tape.coupled):
        raise JacextError(
            "per-sample rescaling of the cotangent (ClipGrad) needs exactly one such extension and "
            "independent samples (not batchnorm='exact')"
        )
    plan = _plan_of(tape, choose_plan(tape, shape)(tape, shape, grad))
    # the node being evaluated is the root output's grad_fn; holding it only here avoids a cycle
    return plan.at_root(GradientEdge(torch._C._current_autograd_node(), output_nr))


def serve_without_root(tape: Tape) -> None:
    """Serve the backward in progress, which runs through the graph of a create_graph=True
    backward of ``tape`` (a gradient penalty, jacext.engine.penalty) but has not passed through
    the root output: an inline plan, whose records the backward does not reach get zero G. A
    record it does not reach, none of whose parameters get a gradient either, may have been left
    out by ``backward(inputs=...)``: refused."""
    task = torch._C._current_graph_task_id()
    if tape.plan is not None or tape.out_shape is None or tape.out_dtype is None:
        raise JacextError("jacext cannot serve this backward pass as a gradient penalty (a plan is running)")
    will_run = torch._C._will_engine_execute_node
    for rec in tape.records:
        if not any(will_run(e.node) for e in rec.edges) and not any(
            will_run(get_gradient_edge(p).node) for p in rec.named.values()
        ):
            tape.drop_results()
            raise JacextError(
                f"this backward pass of a gradient penalty reaches neither module {module_label(rec.module)} nor its "
                "parameters; jacext cannot tell whether backward(inputs=...) left them out. Differentiate the "
                "penalty with respect to every parameter (no inputs=)."
            )
    _begin_serving(tape, task, set())
    grad = torch.zeros(tape.out_shape, dtype=tape.out_dtype, device=tape.parameters[0].device)
    plan = (InlineFused if tape.fused and tape.out_shape[0] > 0 else Inline)(tape, tape.out_shape, grad)
    _plan_of(tape, plan)
    plan.start()


def _begin_serving(tape: Tape, task: int, leaves: Set[int]) -> None:
    """The backward ``task`` is the tape's (through the root output's ``leaves``)."""
    _one_tape_per_backward(tape)
    tape.served, tape.served_leaves = task, leaves
    tape.input_weights = None  # (set by a plan that rescales the cotangent)
    _serving[task] = tape


def _plan_of(tape: Tape, plan: Plan) -> Plan:
    """``plan``, now the tape's (and ``jacext.backward_plan``'s)."""
    ensure_state(tape.root).plan = plan.name
    tape.plan = plan
    return plan


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
