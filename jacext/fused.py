"""p.grad from the per-sample gradients, for layers with many positions per sample (BatchGrad).

A Linear over T positions costs N T O I multiply-adds for autograd's weight gradient G^T X,
as many as the per-sample gradients J[n] = G[n]^T X[n] that BatchGrad materialises; the sum
sum_n J[n] is the same weight gradient for N O I additions. Where a layer registers its own
backward (``jacext.rules.register_backward``) and says the sum is cheaper, the tape routes
its output through :class:`FusedGrads`, whose backward

* in a backward the tape armed inline (:meth:`jacext.tape.Tape.arm_inline`): runs the
  layer's rule on the cotangent G it receives, keeps the per-sample results on the record,
  and returns their sum over samples as the parameters' gradients, with the input gradient
  from the layer's backward; autograd never forms G^T X;
* otherwise (the tape's own pull-back, which needs only input gradients; a backward that
  pulls back separately; ``create_graph=True``): returns what the layer's own backward gives.

The gradients reach the parameters through autograd (``AccumulateGrad``), so gradient hooks,
DDP and ``retain_graph`` behave as without jacext.
"""

import weakref

import torch
from torch import Tensor, nn

from jacext.rules import BACKWARDS


def fusable(module: nn.Module, args, output) -> bool:
    """Whether the call's output should go through :class:`FusedGrads`."""
    entry = BACKWARDS.get(type(module))
    x = args[0] if args else None
    return (
        entry is not None
        and isinstance(x, Tensor)
        and isinstance(output, Tensor)
        and output.requires_grad
        and entry[1](module, x)
    )


def fused_output(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    """``output``'s values, with :class:`FusedGrads` as its autograd node (bind it with :func:`bind`)."""
    params = [p for _, p in _trainable(module)]
    return FusedGrads.apply(module, output.detach(), x, *params)


def bind(output: Tensor, record, tape) -> None:
    """Tell the node of a :func:`fused_output` which record and tape it serves (held weakly)."""
    node = output.grad_fn
    node.record, node.tape = weakref.ref(record), weakref.ref(tape)


def _trainable(module: nn.Module):
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


class FusedGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, values, x, *params):
        ctx.module = module
        ctx.save_for_backward(x)
        return values.detach()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors  # first: a second backward without retain_graph fails before any work
        module = ctx.module
        backward, _ = BACKWARDS[type(module)]
        tape, record = ctx.tape(), ctx.record()
        names = [name for name, _ in _trainable(module)]
        if torch.is_grad_enabled() or not tape.armed or tape.busy:  # busy: only dx is wanted
            dx, grads = backward(module, x, g, params=not tape.busy)
        else:
            dx, grads = backward(module, x, g, params=True, per_sample=tape.contract_now(record, g))
        return (None, None, dx, *(grads.get(name) for name in names))
