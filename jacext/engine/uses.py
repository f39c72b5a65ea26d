"""Where parameters are used: a guard against silently missing a contribution.

jacext attributes every use of a parameter to a recorded module call: the module that owns
it (or, for rules that cover their submodules, such as MultiheadAttention's out_proj, an
ancestor). A parameter used anywhere else, for example ``F.linear(h, self.emb.weight)`` in a
parent's forward, would contribute to ``p.grad`` but not to the per-sample results. While a
tape records, this torch-function mode checks every differentiable use and raises instead.
"""

from contextlib import contextmanager
from typing import Dict, List, Set, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from jacext.engine.batch import BatchTracker
from jacext.errors import JacextError
from jacext.rules import layer_of
from jacext.state import module_label


class ParameterUses(TorchFunctionMode):
    """A torch-function mode that knows which parameterised module is running."""

    def __init__(self, root: nn.Module, batch: BatchTracker):
        super().__init__()
        self.root = root
        self.batch = batch  # follows the batch dimension through every operation it sees
        self.stack: List[nn.Module] = []
        self._covered: Dict[int, Tuple[List[Tuple[str, nn.Parameter]], Set[int]]] = {}
        self.paused = False  # while jacext's own hooks run inside another mode (see pausing)

    @contextmanager
    def pausing(self):
        """jacext's own tensor calls (its forward hooks) are not the model's: not checked, and,
        where this mode is the innermost one, not seen at all (no Python call per operation)."""
        depth = torch._C._len_torch_function_stack()
        if depth and torch._C._get_function_stack_at(depth - 1) is self:
            torch._C._pop_torch_function_stack()
            try:
                yield
            finally:
                torch._C._push_on_torch_function_stack(self)
            return
        paused, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = paused

    def enter(self, module: nn.Module) -> None:
        self.stack.append(module)

    def leave(self, module: nn.Module) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def covered(self, module: nn.Module) -> Tuple[List[Tuple[str, nn.Parameter]], Set[int]]:
        """``(name, parameter)`` of the trainable parameters a call of ``module`` covers (its
        own, or its subtree's where its rule covers it) and their ids, looked up once per
        forward pass (the tape's records use them too)."""
        found = self._covered.get(id(module))
        if found is None:
            params = module.named_parameters(recurse=layer_of(module).subtree)
            # a parameter that a submodule owns too (``self.w = self.sub.weight``) is that
            # submodule's: its call covers it, and a second cover would count it twice
            inner = set() if layer_of(module).subtree else {id(p) for c in module.children() for p in c.parameters()}
            trainable = [(name, p) for name, p in params if p.requires_grad and id(p) not in inner]
            found = self._covered[id(module)] = (trainable, {id(p) for _, p in trainable})
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        written = None if self.paused else self.batch.before(func, args, kwargs or {})
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.batch.after(func, args, kwargs or {}, out, written)
        if not self.paused and torch.is_grad_enabled():
            used = [a for a in _shallow(args, kwargs) if isinstance(a, nn.Parameter) and a.requires_grad]
            outs = [out] if isinstance(out, Tensor) else tree_leaves(out)
            if used and any(isinstance(o, Tensor) and o.requires_grad for o in outs):
                inside = self.stack[-1] if self.stack else None
                for p in used:
                    if inside is None or id(p) not in self.covered(inside)[1]:
                        self._raise(p, inside)
        return out

    def _raise(self, p: nn.Parameter, inside) -> None:
        name = next((n for n, q in self.root.named_parameters() if q is p), "?")
        where = "the forward of a module without parameters of its own"
        if inside is not None:
            where = f"the forward of {module_label(inside)}"
        raise JacextError(
            f"parameter '{name}' is used in {where}, outside the module that owns it, so jacext "
            "cannot attribute that use to a recorded call. Use it through its module, or share it as "
            "a parameter of the module that uses it (for tied weights: out.weight = emb.weight)."
        )


def _shallow(args, kwargs):
    """The arguments, with lists and tuples opened one level (torch.cat, torch.stack, ...)."""
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a
