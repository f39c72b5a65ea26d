"""Gradient penalties: the per-sample term of a loss computed from a ``create_graph=True`` backward.

A penalty ``P(g)`` on ``g = autograd.grad(s(out), x, create_graph=True)`` (WGAN-GP, input
gradient regularisation) reaches a layer's weight W in two ways in the backward of the loss:

* through the activations of the forward pass, which the graph of the first backward uses
  (``tanh'(z)``): they reach the records' output edges, whose hooks catch them with the rest of
  the cotangent G (jacext.engine.record);
* through the layer's own input gradient in that graph, ``gx = A_W^T gy`` for a layer affine in
  its input (``y = A_W x + b``: Linear, Conv), where gy is the cotangent the first backward
  brought to the layer's output. For the cotangent v of gx in the second backward,
  ``<v, A_W^T gy> = <gy, A_W v>``, whose derivative in W for sample n is the layer's rule on the
  input v with the cotangent gy, less the rule on the input 0 (the part that does not multiply
  the input: the bias): ``R(v, gy)[n] - R(0, gy)[n]``. Samples stay independent, so each
  sample's term comes from its own rows.

Where the root's input requires a gradient, the first input of each affine layer passes through
an :class:`InputTap`: in a ``create_graph=True`` backward its node gets the layer's input
gradient gx, on which it hooks the catch of v; the record's hook keeps gy (:class:`TapSlot`).
A backward that runs through such a graph is served as a penalty (:func:`serve`) where every
layer it reaches that way has a tap and nothing else could use a parameter there: BatchGrad and
BatchL2Grad (one cotangent), independent samples, no operation where parameters meet the batch
(jacext.engine.meets), real parameters, one ``create_graph=True`` backward per forward pass.
Elsewhere it is refused, before any result is written.
"""

import copy
import warnings
import weakref
from functools import partial
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from jacext.engine.meets import op_name
from jacext.errors import JacextError
from jacext.state import module_label

if TYPE_CHECKING:
    from jacext.engine.record import Record, Tape


class TapSlot:
    """What the penalty needs of one tapped call: the tape (weakly), the call's record, the
    cotangent gy the first backward brought to its output (``g``, per edge), and the cotangent v
    of its input gradient in the backward ``v_task`` that runs through that graph."""

    __slots__ = ("tape", "record", "g", "v", "v_task", "others")

    def __init__(self, tape: "Tape"):
        self.tape = weakref.ref(tape)
        self.record: Optional["weakref.ref[Record]"] = None  # the call's record, where there is one
        self.g: Optional[List[Optional[Tensor]]] = None
        self.v: Optional[Tensor] = None
        self.v_task: Optional[int] = None
        self.others = False  # the call took other tensors that require a gradient (not tapped)


class InputTap(torch.autograd.Function):
    """The identity on a layer's first input; in a ``create_graph=True`` backward it hooks its
    cotangent, the layer's input gradient gx, to catch gx's own cotangent later."""

    generate_vmap_rule = True

    @staticmethod
    def forward(slot: TapSlot, x: Tensor) -> Tensor:
        return x.detach()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.slot = inputs[0]

    @staticmethod
    def backward(ctx, gx: Tensor):
        tape = ctx.slot.tape()
        if tape is not None and torch.is_grad_enabled() and gx.requires_grad:
            # the graph this builds holds the tape: the penalty may be all its loss
            gx.register_hook(partial(_catch_v, ctx.slot, tape))
        return None, gx


def tap(tape: "Tape", x: Tensor) -> "tuple[Tensor, TapSlot]":
    """``x`` through an :class:`InputTap`, and the tap's slot."""
    slot = TapSlot(tape)
    return InputTap.apply(slot, x), slot


def _catch_v(slot: TapSlot, tape: "Tape", v: Tensor) -> None:
    rec = slot.record() if slot.record is not None else None
    if rec is None:  # a call without a record (frozen parameters): no term
        return
    task = torch._C._current_graph_task_id()
    if slot.g is None:  # (the backward that built the graph left jacext without gy)
        raise refusal(tape, _unsupported(tape) or f"it has no cotangent of module {module_label(rec.module)} there")
    if tape.penalty_task != task:
        serve(tape)
    slot.v, slot.v_task = v.detach(), task


def keep_pulled(rec: "Record", leaf_grads) -> None:
    """A pull-back plan's cotangents ``(1, *leaf)`` at the record, in a ``create_graph=True``
    backward that runs its edges (:func:`keep_g`)."""
    will_run = torch._C._will_engine_execute_node
    for j, (leaf, edge) in enumerate(zip(rec.grad_leaves, rec.edges, strict=True)):
        g = leaf_grads[leaf]
        if g is not None and will_run(edge.node):
            keep_g(rec, j, g[0])


def keep_g(rec: "Record", j: int, g: Tensor) -> None:
    """In a ``create_graph=True`` backward: the cotangent at the record's edge ``j`` (its hook)."""
    rec.built = True
    slot = rec.tap
    if slot is not None:
        if slot.g is None:
            slot.g = [None] * len(rec.edges)
        slot.g[j] = g.detach()


def serve(tape: "Tape") -> None:
    """The backward in progress may run through the graph of a ``create_graph=True`` backward of
    this tape: refuse it where the penalty's per-sample term could be incomplete, else serve it
    (its plan, started here where the backward does not also pass through the root output). A
    backward through the root output in which no tap caught a cotangent left that graph alone
    where this finds nothing to refuse: every parameter use there is inside a tapped call, so a
    path to a parameter through it would have passed a tap first."""
    from jacext.engine import hooks  # (hooks imports this module)

    problem = _unsupported(tape)
    if problem is not None:
        raise refusal(tape, problem)
    tape.penalty_task = torch._C._current_graph_task_id()
    if tape.served != tape.penalty_task:
        hooks.serve_without_root(tape)


def refusal(tape: "Tape", problem: Optional[str] = None) -> JacextError:
    """The error for a backward through the graph of a create_graph=True backward of ``tape`` whose
    per-sample results would miss terms (``problem``: why; default: what :func:`serve` finds, else
    a parameter reached there through no tapped layer); the results are dropped."""
    problem = problem or _unsupported(tape) or (
        "a parameter gets a gradient there through no layer whose input jacext taps (a penalty on a tensor "
        "inside the model rather than on its input, a Hessian-vector product)"
    )
    tape.drop_results()
    return JacextError(
        "this backward pass runs through the graph of an earlier backward(create_graph=True) of the extended "
        f"model ({type(tape.root).__name__}), such as a gradient penalty; jacext includes the per-sample terms of "
        f"that graph only where it can see every use of the parameters there, and {problem}. Compute those "
        "per-sample gradients with torch.func, or run the earlier backward without create_graph where its "
        "result is only needed as a value."
    )


def _unsupported(tape: "Tape") -> Optional[str]:
    """Why the penalty's term cannot be complete here, or None."""
    if not tape.demand.one_cotangent or tape.foreign_fields:
        names = ", ".join(type(e).__name__ for e in tape.extensions)
        return f"the active extensions ({names}) need more than the backward's own cotangent (as BatchGrad does not)"
    if tape.coupled:
        return "the samples are coupled (batchnorm='exact')"
    if tape.built_parameter_grads:
        return "that backward computed parameter gradients (a Hessian-vector product, a penalty on p.grad)"
    if not tape.tapping:
        return (
            "the extended model's input does not require a gradient, so jacext taps no layer's input (a penalty "
            "on a tensor inside the model rather than on its input)"
        )
    if tape.built_graphs > 1:
        return "more than one create_graph=True backward ran through this forward pass"
    if tape.plan is not None and not tape.plan.takes_penalties:
        return f"this backward's plan ({tape.plan.name}) was chosen as it passed the root output"
    if tape.meets:
        return f"parameters meet the batch outside a layer's call (at torch's {op_name(tape.meets[0].func)})"
    for rec in tape.records:
        if rec.layer.rule is None:
            return f"module {module_label(rec.module)} has no hand-written rule (the generic rule differentiates it)"
        if not rec.built:
            continue
        if not (rec.layer.affine or rec.layer.forward_ad):
            return (
                f"module {module_label(rec.module)} has no rule whose derivative in its input jacext takes "
                "(the affine layers: Linear, Conv, ConvTranspose, Conv1D; the normalisations and PReLU)"
            )
        if rec.tap is None or rec.tap.others:
            return (
                f"module {module_label(rec.module)} takes tensors that require a gradient other than its first "
                "input, or its first input does not hold the batch: jacext differentiates a layer's input "
                "gradient through its first input only"
            )
        if any(p.is_complex() for p in rec.named.values()):
            return f"module {module_label(rec.module)} has complex parameters"
    return None


def penalty_blocks(tape: "Tape", task: int) -> Dict[nn.Parameter, Tensor]:
    """The penalty's per-sample terms (N, 1, *p) of the backward ``task``, per parameter."""
    blocks: Dict[nn.Parameter, Tensor] = {}
    if tape.penalty_task != task:
        return blocks
    for rec in tape.records:
        slot = rec.tap
        if slot is None or slot.v_task != task or slot.g is None or slot.v is None:
            continue
        leaf_grads: List[Optional[Tensor]] = [None] * rec.n_leaves
        for leaf, g, shape, dtype in zip(rec.grad_leaves, slot.g, rec.out_shapes, rec.out_dtypes, strict=True):
            g = g if g is not None else torch.zeros(shape, dtype=dtype, device=slot.v.device)
            leaf_grads[leaf] = g.unsqueeze(0)
        v = slot.v.to(rec.args[0].dtype)
        placement = rec.placement
        if placement is not None and placement.move:
            v = v.movedim(placement.in_dims[0] or 0, 0)
        for name, term in _terms(rec, v, leaf_grads).items():
            p = rec.named[name]
            blocks[p] = term if p not in blocks else blocks[p] + term
    return blocks


def _terms(rec: "Record", v: Tensor, leaf_grads) -> Dict[str, Tensor]:
    """d/dW_n <gy_n, J_x y_n v_n> for the record's parameters. For a layer affine in its input,
    its rule on v less its rule on 0. Otherwise (``forward_ad`` layers) the rule's derivative
    along v in its input, d/de R(x + e v, gy), by torch's forward-mode AD (dual tensors; not
    torch.func's jvp of a vmapped VJP, which on LayerNorm is wrong in torch 2.14, measured against
    finite differences)."""
    from jacext.engine.apply import apply_rule  # (apply imports the rules, which import the engine)

    if rec.layer.affine:
        on_v = apply_rule(_on_input(rec, v), leaf_grads)
        on_0 = apply_rule(_on_input(rec, torch.zeros_like(v)), leaf_grads)
        return {name: block - on_0[name] for name, block in on_v.items()}
    x = rec.args[0]
    with fwAD.dual_level():
        with warnings.catch_warnings():  # (torch's first make_dual scripts its decompositions)
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            dual = fwAD.make_dual(x, v.to(x.dtype))
        results = apply_rule(_on_input(rec, dual), leaf_grads)
        tangents = {name: fwAD.unpack_dual(r).tangent for name, r in results.items()}
    return {name: t if t is not None else torch.zeros_like(results[name]) for name, t in tangents.items()}


def _on_input(rec: "Record", x: Tensor) -> "Record":
    """The record, with ``x`` for its first input."""
    other = copy.copy(rec)
    other.args = (x, *rec.args[1:])
    other.contracted = None
    return other
