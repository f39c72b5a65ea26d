"""Where parameters are used: each use attributed to a recorded call or to the operation itself.

A parameter used inside the call of a module with a hand-written rule that covers it (its
owner, or an ancestor whose rule covers its submodules, such as MultiheadAttention's
out_proj) is that call's: the record's rule differentiates it. Every other differentiable
use (a module without a rule of its own using its raw parameters, ``x * self.gamma``,
``torch.cat([self.cls_token.expand(N, -1, -1), x])``; a parent using a child's weight,
``F.linear(h, self.emb.weight)``) is *loose*: the batch tracker treats the parameter as a
tensor without the batch for that operation, and the operation where it (or what was computed
from it) meets the batch is recorded as a meet (jacext.engine.meets), exact at that one
operation. Parameters reached only through an ``autograd.Function`` (whose forward runs
without gradients, so this mode sees no use there) must belong to the running module.
"""

from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode

from jacext.engine.batch import BatchTracker
from jacext.engine.trees import leaves
from jacext.errors import JacextError
from jacext.rules import layer_of
from jacext.state import module_label


def _never() -> bool:
    return False


class ParameterUses(TorchFunctionMode):
    """A torch-function mode that knows which parameterised module is running."""

    def __init__(self, root: nn.Module, batch: BatchTracker):
        super().__init__()
        self.root = root
        self.batch = batch  # follows the batch dimension through every operation it sees
        self.stack: List[nn.Module] = []
        self._covered: Dict[int, Tuple[List[Tuple[str, nn.Parameter]], Set[int]]] = {}
        self.paused = False  # while jacext's own hooks run inside another mode (see pausing)
        self._functions: Dict[int, object] = {}  # autograd.Function nodes already attributed
        self.stale: Callable[[], bool] = _never  # the forward ended without closing the tape (and stopped it)
        self.param_ops: Dict[int, List[Tuple[object, Set[int]]]] = {}  # per running module: outputs, parameters
        self._ruled: Dict[int, Set[int]] = {}  # per module: the ids of the parameters its hand-written rule covers
        self.hold: Optional[Callable[[Tensor], Tensor]] = None  # ClipGrad: what free tensors meet the batch through

    def close(self) -> None:
        """Leave the mode and drop the callbacks into the tape that entered it (its cycles)."""
        self.__exit__(None, None, None)
        self.hold, self.stale = None, _never

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

    def ruled(self, module: Optional[nn.Module]) -> Set[int]:
        """The ids of the trainable parameters that a call of ``module`` differentiates with a
        hand-written rule (none for a module without one)."""
        if module is None:
            return set()
        found = self._ruled.get(id(module))
        if found is None:
            found = self._ruled[id(module)] = self.covered(module)[1] if layer_of(module).rule is not None else set()
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        graded = torch.is_grad_enabled()
        inside = self.stack[-1] if self.stack else None
        loose: Set[int] = set()
        used = []
        if graded:
            ruled = self.ruled(inside)
            for a in _shallow(args, kwargs):
                if isinstance(a, nn.Parameter):
                    if a.requires_grad:
                        if id(a) in ruled:
                            used.append(a)
                        else:
                            loose.add(id(a))
                elif isinstance(a, Tensor) and a.requires_grad and isinstance(a.grad_fn, BackwardCFunction):
                    used += self._through_function(a.grad_fn)
        written = self.batch.before(func, args, kwargs, loose)
        held = None
        if self.hold is not None and graded and (loose or self.batch.free):
            held = self.batch.held(args, kwargs, loose, self.hold)
        out = func(*args, **kwargs) if held is None else func(*held[0], **held[1])
        differentiated = bool(loose or used) and any(
            isinstance(o, Tensor) and o.requires_grad for o in ([out] if isinstance(out, Tensor) else leaves(out))
        )
        if loose and (not differentiated or self.stale()):  # (stale: code after an interrupted forward pass)
            loose = set()
        self.batch.after(func, args, kwargs, out, written, loose, held[2] if held is not None else frozenset())
        if used and differentiated:
            for p in used:
                if inside is None or id(p) not in self.covered(inside)[1]:
                    if self.stale():  # interrupted: this is code after that forward pass
                        return out
                    self._raise(p, inside)
            self.param_ops.setdefault(id(inside), []).append((out, {id(p) for p in used}))
        return out

    def _through_function(self, node) -> List[nn.Parameter]:
        """The parameters an ``autograd.Function`` output (``node``: its grad_fn) was computed from
        directly, the first time this mode sees it: inside ``Function.forward`` gradients are off,
        so this mode saw those uses as none."""
        if id(node) in self._functions:
            return []
        self._functions[id(node)] = node
        found = (getattr(n, "variable", None) for n, _ in node.next_functions if n is not None)
        return [v for v in found if isinstance(v, nn.Parameter) and v.requires_grad]

    def owns_outputs(self, outputs) -> Set[int]:
        """A recorded call's outputs: ``autograd.Function`` outputs among them are that call's.
        Returns the ids of the parameters such outputs were computed from directly (not yet
        attributed: a Function applied to the module's parameters inside its forward)."""
        found: Set[int] = set()
        for o in outputs:
            if isinstance(o.grad_fn, BackwardCFunction):
                found |= {id(p) for p in self._through_function(o.grad_fn)}
        return found

    def take_param_ops(self, module: nn.Module) -> List[Tuple[object, Set[int]]]:
        """The operations of the call of ``module`` that just ended that used its parameters
        (each with its output and the ids of those parameters)."""
        return self.param_ops.pop(id(module), [])

    def _raise(self, p: nn.Parameter, inside) -> None:
        name = next((n for n, q in self.root.named_parameters() if q is p), "?")
        where = "the forward of a module without parameters of its own"
        if inside is not None:
            where = f"the forward of {module_label(inside)}"
        raise JacextError(
            f"parameter '{name}' reaches {where} through an autograd.Function whose forward ran outside "
            "the module that owns it, so jacext cannot attribute that use to an operation it saw. Apply "
            "the Function inside the module that owns the parameter, or pass the parameter to an "
            "operation of torch (F.linear, a product) where it is used."
        )


def _shallow(args, kwargs):
    """The arguments, with lists and tuples opened one level (torch.cat, torch.stack, ...)."""
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a
