"""Calls whose parameter gradients the tape takes over: per-sample results in the ordinary backward.

A fused call's output hangs from a :class:`FusedGrads` node, which in the backward gives the
call's input gradients but decides where its parameter gradients come from:

* **BatchGrad** (layers that register their own backward, ``jacext.rules.register_backward``,
  where it says so: a Linear with many positions per sample). Autograd's weight gradient G^T X
  costs N T O I multiply-adds, as many as the per-sample gradients J[n] = G[n]^T X[n] that
  BatchGrad materialises; their sum over n is the same gradient for N O I additions. The node
  runs the rule on the G it receives and returns sum_n J[n].
* **ClipGrad** (every call with a hand-written rule and one output tensor). The clipped sum
  sum_n w_n g_n needs every sample's norm, known only once the backward has passed every
  layer. The nodes take the parameters through one :class:`ClipGate` node, which autograd
  therefore runs after all of them; they return no parameter gradients, and the gate computes
  the norms and weights w_n from the G the tape caught, then each call's parameter gradients
  for the cotangent w_n G[n] (:class:`jacext.engine.plan.InlineClipping`), and hands them on
  to the parameters. One backward pass instead of a pull-back for the norms and a second,
  rescaled backward.

What a node returns is the :class:`FusedMode` the backward's plan gives it
(:meth:`jacext.engine.plan.Plan.fused_mode`): the ordinary gradients (a plan that pulls back
separately, ``create_graph=True``), the input gradient only (the engine's own pull-back; ClipGrad,
whose parameter gradients come from the gate), or the rule's results contracted now. Input
gradients come from the layer's own backward where it gives them (Linear), else from autograd
on the call's own graph, which the node keeps. Parameter gradients always
reach the parameters through autograd (``AccumulateGrad``), so gradient hooks, DDP and
``retain_graph`` behave as without jacext.
"""

import enum
import weakref
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from jacext.rules import layer_of
from jacext.rules.util import sharing


class FusedMode(enum.Enum):
    """What a :class:`FusedGrads` node returns in a backward."""

    ORDINARY = "ordinary"  # input and parameter gradients, as without jacext
    INPUT_ONLY = "input only"  # the parameters get theirs elsewhere (or want none: the engine's pull-back)
    CONTRACT = "contract"  # run the rule on this cotangent now; the parameter gradients are its sums


class FusedCall:
    """One fused module call ``output = module(x, **kwargs)``: what its :class:`FusedGrads` node needs."""

    def __init__(self, module: nn.Module, kwargs, output: Tensor, trainable):
        self.module, self.kwargs, self.training = module, kwargs, module.training
        own = layer_of(module).backward
        self.backward: Optional[Callable[..., Any]] = own.backward if own else None
        self.reads: Tuple[str, ...] = own.reads if own else ()  # the parameters its own dx reads
        self.output = output  # its graph: autograd's input gradient where the layer has none of its own
        self.dtype = output.dtype  # the dtype the layer ran in (under autocast, not its parameters')
        self.names = [name for name, _ in trainable]
        self.params = [p for _, p in trainable]
        self.record: Optional[weakref.ref] = None
        self.tape: Optional[weakref.ref] = None

    def grads(self, x: Tensor, g: Tensor, *, dx_wanted: bool, params: bool, per_sample=None):
        """The input's gradient where wanted and the parameters' where ``params``, for cotangent
        ``g``. Parameters: the layer's own gradients, else its rule's per-sample results summed
        over the samples (both with differentiable operations, for ``create_graph=True``); never
        autograd on the call's graph, whose parameters the gradients of other fused calls of
        them (a module called twice, tied weights) would reach too. Input: the layer's own, else
        autograd's on the call's graph (the input is the only path there). ``g`` is taken in the
        dtype the layer ran in (ClipGrad's weighted cotangents may come promoted), as autograd
        would give it; autograd casts what this returns to the input's and parameters' dtypes."""
        g = g.to(self.dtype)
        dx, grads = None, {}
        if self.backward is not None:
            dx, grads = self.backward(self.module, x, g, dx_wanted=dx_wanted, params=params, per_sample=per_sample)
        elif params:
            grads = self._summed_rule(x, g)
        if dx_wanted and dx is None:
            create = torch.is_grad_enabled()
            (dx,) = torch.autograd.grad(self.output, [x], g, retain_graph=True, create_graph=create)
        return dx, [grads.get(name) for name in self.names]

    def _summed_rule(self, x: Tensor, g: Tensor):
        if g.shape[0] == 0:  # rules need a sample
            return {name: torch.zeros_like(p) for name, p in zip(self.names, self.params, strict=True)}
        rule: Any = layer_of(self.module).rule  # fused calls have a hand-written rule
        training, self.module.training = self.module.training, self.training
        try:
            per_sample = rule(self.module, (x,), self.kwargs, [g.unsqueeze(0)])
        finally:
            self.module.training = training
        return {name: j.sum(0)[0] for name, j in per_sample.items()}


def fusable(module: nn.Module, layer, args, kwargs, output, *, clipping: bool, own_output: bool) -> bool:
    """Whether the call's output should hang from a :class:`FusedGrads` node: for ClipGrad,
    every call with a hand-written rule, one tensor input and one output tensor; for BatchGrad,
    calls of layers with their own backward that say it pays. One input: autograd's gradient
    of the call's graph for one of two inputs would also count the paths through the other
    where that one was computed from it. ``own_output``: no forward hook has replaced the
    module's output (the layer's own gradients would not see what it did)."""
    if not (own_output and isinstance(output, Tensor) and output.requires_grad):
        return False
    if len(args) != 1 or not isinstance(args[0], Tensor) or any(isinstance(v, Tensor) for v in kwargs.values()):
        return False
    if clipping:
        return layer.rule is not None
    own = layer.backward
    return own is not None and own.when is not None and own.when(module, args[0], output)


def fused_output(module: nn.Module, x: Tensor, kwargs, output: Tensor, trainable, gated=None) -> Tensor:
    """``output``'s values, hanging from a :class:`FusedGrads` node (tell it its record with
    :func:`bind`); ``trainable``: ``(name, parameter)`` of the parameters the call covers;
    ``gated``: the parameters' aliases out of a :class:`ClipGate`, by id."""
    call = FusedCall(module, kwargs, output, trainable)
    params = [gated[id(p)] for p in call.params] if gated is not None else call.params
    return FusedGrads.apply(call, output.detach(), x, *params)


def bind(output: Tensor, record, tape) -> None:
    """Tell the node of a :func:`fused_output` which record and tape it serves (held weakly)."""
    call = call_of(output.grad_fn)
    call.record, call.tape = weakref.ref(record), weakref.ref(tape)


def call_of(node) -> FusedCall:
    """The call a :class:`FusedGrads` node serves."""
    return node.call


class FusedGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, values, x, *params):
        ctx.call = call
        read = [call.module.get_parameter(name) for name in call.reads] if x.requires_grad else []
        ctx.save_for_backward(x, *read)  # autograd's checks: freed, or changed in place since
        return values.detach()

    @staticmethod
    def backward(ctx, g):
        x = ctx.saved_tensors[0]  # first: a second backward without retain_graph fails before any work
        tape = ctx.call.tape()
        try:
            return FusedGrads._backward(ctx, x, g, tape)
        except BaseException:  # the backward stops here: no parameter keeps a result of an earlier batch
            if tape is not None:
                tape.drop_results()
            raise

    @staticmethod
    def _backward(ctx, x, g, tape):
        call, dx_wanted = ctx.call, ctx.needs_input_grad[2]
        mode = tape.fused_mode(g) if tape is not None else FusedMode.ORDINARY
        if mode is FusedMode.CONTRACT:
            with sharing():  # the rule and the layer's backward, on the same g
                per_sample = tape.plan.contract_now(call.record(), g)
                dx, dps = call.grads(x, g, dx_wanted=dx_wanted, params=True, per_sample=per_sample)
        else:
            dx, dps = call.grads(x, g, dx_wanted=dx_wanted, params=mode is FusedMode.ORDINARY)
        return (None, None, dx, *dps)


class ClipGate(torch.autograd.Function):
    """Aliases of the parameters for the fused calls of a ClipGrad tape: autograd runs this node
    after every node that uses them, so that the backward's plan can clip there
    (:meth:`jacext.engine.plan.Plan.gate`); otherwise it passes the gradients on."""

    @staticmethod
    def forward(ctx, tape, *params):
        ctx.tape = weakref.ref(tape)
        ctx.set_materialize_grads(False)
        return tuple(p.detach() for p in params)

    @staticmethod
    def backward(ctx, *grads):
        tape = ctx.tape()
        if tape is not None and tape.plan is not None:
            grads = tape.plan.gate(grads)
        return (None, *grads)
