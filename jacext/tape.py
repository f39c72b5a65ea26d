"""The tape: what jacext records in the forward pass and computes in the backward pass.

Forward: while a jacext extension is active, the extended root module opens a
tape; every call of a module that owns trainable parameters appends a record
(the module, its detached inputs, and the autograd edges of its outputs).
Edges are taken at call time, so later in-place operations on the outputs, a
module called several times, or any code between modules do not disturb them.

Backward: a hook on the root output receives the loss's cotangent. From there,
one batched ``torch.autograd.grad`` pulls back every active extension's seeds
at once (V seeds: C one-hot seeds for the Jacobian, the cotangent itself for
gradients) to the recorded output edges, giving G of shape (V, N, *out) per
record. Each record's rule contracts G with its inputs; contributions to a
shared parameter are summed. The ordinary backward then runs unchanged.
"""

from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
from backpack import disable
from backpack.context import CTX
from backpack.utils.hooks import no_op
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_leaves, tree_map

from jacext.errors import JacextError
from jacext.rules import rule_for
from jacext.rules.batchnorm import couples_samples
from jacext.rules.generic import generic
from jacext.uses import ParameterUses


def module_label(module: nn.Module) -> str:
    """``'path' (Class)`` for error messages."""
    return f"'{getattr(module, '_jacext_path', '?')}' ({type(module).__name__})"


def _detached(a):
    return a.detach() if isinstance(a, Tensor) else a


class Record:
    """One call of a parameterised module."""

    def __init__(self, module: nn.Module, args, kwargs, output):
        self.module = module
        self.training = module.training  # rules run with the module in its forward-time mode
        self.coupled = couples_samples(module)
        self.args, self.kwargs = tree_map(_detached, (tuple(args), dict(kwargs)))
        self.versions = self._versions()
        leaves = [o for o in tree_leaves(output) if isinstance(o, Tensor)]
        self.grad_leaves = [i for i, o in enumerate(leaves) if o.requires_grad]
        self.n_leaves = len(leaves)
        if len(self.grad_leaves) > 1:
            # One output may be computed from another inside the module (LSTMCell's h' from c'):
            # the edge of c' itself would also collect what flows back through h'. Hand out
            # aliases, whose edges see only what comes from outside the module.
            output = tree_map(lambda o: o.view_as(o) if isinstance(o, Tensor) and o.requires_grad else o, output)
            leaves = [o for o in tree_leaves(output) if isinstance(o, Tensor)]
            self.aliases = [leaves[i] for i in self.grad_leaves]
        else:
            self.aliases = []
        self.output = output
        self.alias_versions = [a._version for a in self.aliases]
        self.edges = [get_gradient_edge(leaves[i]) for i in self.grad_leaves]
        self.out_shapes = [leaves[i].shape for i in self.grad_leaves]

    def _versions(self) -> List[int]:
        return [a._version for a in tree_leaves((self.args, self.kwargs)) if isinstance(a, Tensor)]

    def check_unmodified(self) -> None:
        if [a._version for a in self.aliases] != self.alias_versions:
            raise JacextError(
                f"An output of module {module_label(self.module)}, which returns several tensors, was "
                "modified in place; jacext follows its outputs from where the module returned them. "
                "Use an out-of-place operation on it."
            )
        if self._versions() != self.versions:
            raise JacextError(
                f"An input of module {module_label(self.module)} was modified in place after the "
                "module used it; jacext needs the values the module saw. Use an out-of-place "
                "operation (for example x = x.relu() instead of x.relu_()) on that tensor."
            )


class Tape:
    """Records of one forward pass of an extended root module, for a set of extensions."""

    def __init__(self, root: nn.Module, extensions):
        self.root = root
        self.extensions = list(extensions)
        self.records: List[Record] = []
        self.coupled = False  # samples depend on each other: seed each one separately
        self.uses = ParameterUses(root)
        self.busy = False

    def record(self, module: nn.Module, args, kwargs, output):
        """Record a call; returns the output to hand on (aliased where the record needs it)."""
        rec = Record(module, args, kwargs, output)
        if rec.edges:
            self.records.append(rec)
            self.coupled = self.coupled or rec.coupled
        return rec.output

    def compute(self, out_edge: GradientEdge, out_shape, grad_out: Tensor) -> Dict[nn.Parameter, list]:
        """Per parameter, one result per extension (in ``self.extensions`` order)."""
        with _backpack_paused():
            return self._compute(out_edge, out_shape, grad_out)

    def _compute(self, out_edge: GradientEdge, out_shape, grad_out: Tensor) -> Dict[nn.Parameter, list]:
        seeds = [ext.seeds(out_shape, grad_out) for ext in self.extensions]
        sizes = [s.shape[0] for s in seeds]
        seeds = torch.cat(seeds)  # (V, N, ...)
        n = out_shape[0]
        if self.coupled:  # seed (n, v) is seed v restricted to sample n: (N * V, N, ...)
            only = torch.eye(n, dtype=seeds.dtype, device=seeds.device).view(n, 1, n, *[1] * (len(out_shape) - 1))
            seeds = (seeds.unsqueeze(0) * only).flatten(0, 1)
        edges = [e for rec in self.records for e in rec.edges]
        grads = self._pull_back(out_edge, edges, seeds)
        blocks: Dict[nn.Parameter, Tensor] = {}
        i = 0
        for rec in self.records:
            rec.check_unmodified()
            gs = grads[i : i + len(rec.edges)]
            i += len(rec.edges)
            leaf_grads: List[Optional[Tensor]] = [None] * rec.n_leaves
            for leaf, g, shape in zip(rec.grad_leaves, gs, rec.out_shapes):
                leaf_grads[leaf] = g if g is not None else grad_out.new_zeros(seeds.shape[0], *shape)
            gs = leaf_grads
            for name, block in _apply_rule(rec, gs).items():
                if self.coupled:  # sum over the samples m the seed reached: (N, V, *p)
                    block = block.sum(0).unflatten(0, (n, -1))
                p = rec.module.get_parameter(name)
                blocks[p] = block if p not in blocks else blocks[p] + block
        results = {}
        for p in self.root.parameters():
            if not p.requires_grad:
                continue
            block = blocks.get(p)
            if block is None:  # not used in this forward pass: its derivative is zero
                block = torch.zeros(n, sum(sizes), *p.shape, dtype=p.dtype, device=p.device)
            parts = block.split(sizes, dim=1)
            results[p] = [ext.finish(part, out_shape) for ext, part in zip(self.extensions, parts)]
        return results

    def _pull_back(self, out_edge, edges, seeds: Tensor) -> List[Optional[Tensor]]:
        """Cotangents (V, N, *out) at every edge for the V seeds, in one batched backward."""
        if not edges:
            return []
        self.busy = True
        try:
            if seeds.shape[0] == 1:
                grads = torch.autograd.grad(out_edge, edges, seeds[0], retain_graph=True, allow_unused=True)
                return [None if g is None else g.unsqueeze(0) for g in grads]
            return list(
                torch.autograd.grad(out_edge, edges, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True)
            )
        finally:
            self.busy = False


def _apply_rule(rec: Record, grads) -> Dict[str, Tensor]:
    """The module's hand-written rule, or the generic one (with an error that names the module)."""
    rule = rule_for(rec.module) or generic
    training, rec.module.training = rec.module.training, rec.training
    try:
        return rule(rec.module, rec.args, rec.kwargs, grads)
    except JacextError:
        raise
    except Exception as error:
        if rule is not generic:
            raise
        raise JacextError(
            f"module {module_label(rec.module)} has no hand-written jacext rule, and the generic rule "
            f"(torch.func vjp of its forward, vmapped over samples) failed on it: {error}. Register a "
            "rule for its class with jacext.rules.register, freeze its parameters, or replace it."
        ) from error
    finally:
        rec.module.training = training


@contextmanager
def _backpack_paused():
    """BackPACK's module hooks (``extend(..., backpack=True)``) also fire in the tape's own
    backward and in forward passes that rules run: let them do nothing there and keep the
    inputs they stored for the real backward. With no extension active, no tape opens there."""
    saved = CTX.get_active_exts(), CTX.get_retain_graph(), CTX.get_extension_hook()
    CTX.set_active_exts(())
    CTX.set_retain_graph(True)
    CTX.set_extension_hook(no_op)
    try:
        with disable():
            yield
    finally:
        CTX.set_active_exts(saved[0])
        CTX.set_retain_graph(saved[1])
        CTX.set_extension_hook(saved[2])
