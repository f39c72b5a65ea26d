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
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from jacext.rules import Layer
from jacext.rules.util import sharing


class FusedMode(enum.Enum):
    """What a :class:`FusedGrads` node returns in a backward."""

    ORDINARY = "ordinary"  # input and parameter gradients, as without jacext
    INPUT_ONLY = "input only"  # the parameters get theirs elsewhere (or want none: the engine's pull-back)
    CONTRACT = "contract"  # run the rule on this cotangent now; the parameter gradients are its sums


class FusedCall:
    """One fused module call ``output = module(*args, **kwargs)``: what its :class:`FusedGrads` node
    needs. Its inputs are the distinct tensors of ``args`` and ``kwargs`` (one, but for layers
    whose own backward takes every input)."""

    def __init__(self, module: nn.Module, layer: Layer, args, kwargs, output: Tensor, trainable):
        self.module, self.training = module, module.training
        self.rule = layer.rule
        own = layer.backward
        self.backward: Optional[Callable[..., Any]] = own.backward if own else None
        self.every_input = own is not None and own.every_input
        self.reads: Tuple[str, ...] = own.reads if own else ()  # the parameters its own dx reads
        self.batch_dim = layer.batch_dim(module) if layer.batch_dim is not None else 0  # of the output
        self.output = output  # its graph: autograd's input gradient where the layer has none of its own
        self.dtype = output.dtype  # the dtype the layer ran in (under autocast, not its parameters')
        self.names = [name for name, _ in trainable]
        self.params = [p for _, p in trainable]
        leaves, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        ids = list(dict.fromkeys(map(id, tensors)))  # the distinct inputs, in order
        self.inputs = [next(t for t in tensors if id(t) == i) for i in ids]  # handed to FusedGrads.apply, then dropped
        self.first = [next(j for j, t in enumerate(tensors) if id(t) == i) for i in ids]  # among the tensor leaves
        self.leaves = [ids.index(id(leaf)) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        self.is_tensor = [isinstance(leaf, Tensor) for leaf in leaves]
        self.record: Optional[weakref.ref] = None
        self.tape: Optional[weakref.ref] = None

    def call_args(self, inputs):
        """``(args, kwargs)`` of the call, with ``inputs`` for its distinct input tensors."""
        leaves = [inputs[leaf] if t else leaf for leaf, t in zip(self.leaves, self.is_tensor, strict=True)]
        return tree_unflatten(leaves, self.spec)

    def grads(self, inputs, g: Tensor, *, dx_wanted, params: bool, per_sample=None, weights=None):
        """The inputs' gradients where ``dx_wanted`` (one flag per input) and the parameters'
        where ``params``, for cotangent ``g``. Parameters: the layer's own gradients, else its
        rule's per-sample results summed over the samples (both with differentiable operations,
        for ``create_graph=True``); never autograd on the call's graph, whose parameters the
        gradients of other fused calls of them (a module called twice, tied weights) would reach
        too. Inputs: the layer's own, else autograd's on the call's graph (the input is the only
        path there). ``g`` is taken in the dtype the layer ran in (ClipGrad's weighted cotangents
        may come promoted), as autograd would give it; autograd casts what this returns to the
        inputs' and parameters' dtypes."""
        g = g.to(self.dtype)
        dxs: List[Optional[Tensor]] = [None] * len(inputs)
        grads: Dict[str, Tensor] = {}
        if self.every_input and self.backward is not None:
            args, kwargs = self.call_args(inputs)
            pairs, grads = self.backward(
                self.module,
                args,
                kwargs,
                g,
                dx_wanted=any(dx_wanted),
                params=params,
                per_sample=per_sample,
                weights=weights,
            )
            for t, d in pairs:
                j = next(j for j, x in enumerate(inputs) if x is t)
                if dx_wanted[j]:
                    dxs[j] = d if dxs[j] is None else dxs[j] + d
        else:
            x = inputs[0]
            if self.backward is not None:
                dxs[0], grads = self.backward(
                    self.module, x, g, dx_wanted=dx_wanted[0], params=params, per_sample=per_sample
                )
            elif params:
                grads = self._summed_rule(inputs, g)
            if dx_wanted[0] and dxs[0] is None:
                create = torch.is_grad_enabled()
                (dxs[0],) = torch.autograd.grad(self.output, [x], g, retain_graph=True, create_graph=create)
        return dxs, [grads.get(name) for name in self.names]

    def clipped_grads(self, g: Tensor, w: Tensor):
        """The parameter gradients for the cotangent ``g`` with sample n scaled by ``w[n]`` (the
        samples along the output's batch dimension, the layer's or where the tape moved it from),
        from the record's inputs."""
        rec = self.record() if self.record is not None else None
        assert rec is not None  # the gate runs while the tape holds its records
        inputs = [rec.inputs[j] for j in self.first]  # as called (a moved batch is moved in rec.args only)
        if self.every_input:  # its backward weighs the samples itself (from what it derived from g for the norms)
            return self.grads(inputs, g, dx_wanted=[False] * len(inputs), params=True, weights=w)[1]
        placement = rec.placement
        dim = placement.out_dims[0] if placement is not None and placement.move else self.batch_dim
        shape = [1] * g.dim()
        shape[dim] = g.shape[dim]
        scaled = g * w.view(shape)
        return self.grads(inputs, scaled, dx_wanted=[False] * len(inputs), params=True)[1]

    def _summed_rule(self, inputs, g: Tensor):
        if g.shape[0] == 0:  # rules need a sample
            return {name: torch.zeros_like(p) for name, p in zip(self.names, self.params, strict=True)}
        rule: Any = self.rule  # fused calls have a hand-written rule
        training, self.module.training = self.module.training, self.training
        try:
            per_sample = rule(self.module, *self.call_args(inputs), [g.unsqueeze(0)])
        finally:
            self.module.training = training
        return {name: j.sum(0)[0] for name, j in per_sample.items()}


def fused_leaf(output) -> Optional[Tensor]:
    """The output tensor a fused call hangs from FusedGrads: the output, or the one tensor of a
    tuple of it and Nones (MultiheadAttention's ``(attn_output, None)``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple):
        tensors = [o for o in output if o is not None]
        if len(tensors) == 1 and isinstance(tensors[0], Tensor):
            return tensors[0]
    return None


def fusable(module: nn.Module, layer, args, kwargs, output, *, clipping: bool, own_output: bool) -> bool:
    """Whether the call's output should hang from a :class:`FusedGrads` node: for ClipGrad,
    every call with a hand-written rule, one tensor input (or an own backward that takes every
    input) and one output tensor; for BatchGrad, calls of layers with their own backward that say
    it pays. One input: autograd's gradient of the call's graph for one of two inputs would also
    count the paths through the other where that one was computed from it. ``own_output``: no
    forward hook has replaced the module's output (the layer's own gradients would not see what
    it did)."""
    out = fused_leaf(output)
    if not (own_output and out is not None and out.requires_grad):
        return False
    own = layer.backward
    every_input = own is not None and own.every_input
    one = len(args) == 1 and isinstance(args[0], Tensor) and not any(isinstance(v, Tensor) for v in kwargs.values())
    if not (one or every_input):
        return False
    if clipping:
        return layer.rule is not None
    return own is not None and own.when is not None and own.when(module, args[0] if args else None, out)


def fused_output(module: nn.Module, layer: Layer, args, kwargs, output, trainable, gated=None):
    """``output`` with its tensor's values hanging from a :class:`FusedGrads` node (tell it its
    record with :func:`bind`); ``trainable``: ``(name, parameter)`` of the parameters the call
    covers; ``gated``: the parameters' aliases out of a :class:`ClipGate`, by id."""
    leaf = fused_leaf(output)
    assert leaf is not None
    call = FusedCall(module, layer, args, kwargs, leaf, trainable)
    params = [gated[id(p)] for p in call.params] if gated is not None else call.params
    inputs, call.inputs = call.inputs, []
    values = FusedGrads.apply(call, leaf.detach(), len(inputs), *inputs, *params)
    return values if output is leaf else tuple(values if o is leaf else o for o in output)


def bind(output, record, tape) -> None:
    """Tell the node of a :func:`fused_output` which record and tape it serves (held weakly)."""
    leaf = fused_leaf(output)
    assert leaf is not None
    call = call_of(leaf.grad_fn)
    call.record, call.tape = weakref.ref(record), weakref.ref(tape)


def call_of(node) -> FusedCall:
    """The call a :class:`FusedGrads` node serves."""
    return node.call


class FusedGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, values, k, *inputs_and_params):
        ctx.call, ctx.k = call, k
        inputs = inputs_and_params[:k]
        wanted = any(isinstance(x, Tensor) and x.requires_grad for x in inputs)
        read = [p for p in map(partial(_parameter, call.module), call.reads) if p is not None] if wanted else []
        ctx.save_for_backward(*inputs, *read)  # autograd's checks: freed, or changed in place since
        return values.detach()

    @staticmethod
    def backward(ctx, g):
        inputs = ctx.saved_tensors[: ctx.k]  # first: a second backward without retain_graph fails before any work
        tape = ctx.call.tape()
        try:
            return FusedGrads._backward(ctx, inputs, g, tape)
        except BaseException:  # the backward stops here: no parameter keeps a result of an earlier batch
            if tape is not None:
                tape.drop_results()
            raise

    @staticmethod
    def _backward(ctx, inputs, g, tape):
        call, dx_wanted = ctx.call, ctx.needs_input_grad[3 : 3 + ctx.k]
        mode = tape.fused_mode(g) if tape is not None else FusedMode.ORDINARY
        if mode is FusedMode.CONTRACT:
            with sharing():  # the rule and the layer's backward, on the same g
                per_sample = tape.plan.contract_now(call.record(), g)
                dxs, dps = call.grads(inputs, g, dx_wanted=dx_wanted, params=True, per_sample=per_sample)
        else:
            dxs, dps = call.grads(inputs, g, dx_wanted=dx_wanted, params=mode is FusedMode.ORDINARY)
        return (None, None, None, *dxs, *dps)


def _parameter(module: nn.Module, name: str) -> Optional[Tensor]:
    """``module.get_parameter(name)``, or None where the module has none of that name."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


class ClipGate(torch.autograd.Function):
    """Aliases of the parameters for the fused calls (and the :class:`HeldFree` nodes) of a
    ClipGrad tape: autograd runs this node after every node that uses them, so that the
    backward's plan can clip there (:meth:`jacext.engine.plan.Plan.gate`); otherwise it passes
    the gradients on."""

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


class HeldFree(torch.autograd.Function):
    """A batch-free tensor f (computed from parameters) where it meets the batch, on a ClipGrad
    tape: the meeting operation takes ``HeldFree(f)``, the identity. In the backward, where the
    plan clips inline (:meth:`jacext.engine.plan.Plan.holds`), autograd's sum over the samples of
    f's cotangent stops here: the meet's hook has caught the per-sample contributions, and the
    gate hands the parameters their clipped sum. Elsewhere it passes the cotangent on. Its other
    input, one of the gate's aliases, makes autograd run the gate after this node, and so after
    the meet's hook."""

    @staticmethod
    def forward(ctx, tape, f, after_gate):
        ctx.tape = weakref.ref(tape)
        return f.view_as(f)

    @staticmethod
    def backward(ctx, g):
        tape = ctx.tape()
        held = tape is not None and tape.plan is not None and not tape.pulling and tape.plan.holds()
        return None, None if held else g, None
