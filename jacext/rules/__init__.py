"""Per-layer rules: the registry that maps module classes to their Jacobian rule.

A rule is a function ``rule(module, args, kwargs, grads) -> {param_name: tensor}``:

* ``args``, ``kwargs``: what the module was called with in the forward pass
  (tensors detached);
* ``grads``: one entry per tensor leaf of the module's output (flattened with
  ``torch.utils._pytree``, so tuples and PackedSequence are unpacked): the
  cotangents ``G`` of shape ``(V, *leaf.shape)`` for ``V`` seeds (``V = 1`` for
  a loss gradient, ``V = C`` for the Jacobian of a ``C``-dimensional output),
  zeros where the leaf did not influence the root output, ``None`` for leaves
  that do not require a gradient;
* it returns, for each trainable parameter it covers (named as in
  ``module.get_parameter``, so ``"out_proj.weight"`` may be covered by a parent), the per-sample
  contraction ``J[n, v] = G[v, n] . d output(n) / d param`` of shape
  ``(N, V, *param.shape)``.

Every extension (BatchGrad, BatchJacobian, ...) is served by this one function.
Classes are matched exactly (no ``isinstance``), as in BackPACK: a subclass
may change ``forward`` and needs its own registration.
"""

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Set, Tuple, Type

from torch import Tensor, nn

Rule = Callable[..., Dict[str, Tensor]]

RULES: Dict[Type[nn.Module], Rule] = {}
SUBTREE: Set[Type[nn.Module]] = set()  # classes whose rule also covers their submodules' parameters
MIN_DIMS: Dict[Type[nn.Module], Callable[[Any], int]] = {}


def register(
    *classes: Type[nn.Module], subtree: bool = False, min_dim: Optional[Callable[[Any], int]] = None
) -> Callable[[Rule], Rule]:
    """Register ``rule`` for the given module classes (decorator).

    ``subtree=True``: the rule also returns the parameters of submodules that the module
    uses in its own forward without calling them (MultiheadAttention's out_proj).
    ``min_dim(module)``: the fewest dimensions of the first input with a leading batch
    dimension; a call with fewer is refused as the forward records it, before any backward.
    """

    def decorator(rule: Rule) -> Rule:
        for cls in classes:
            if cls in RULES:
                raise ValueError(f"{cls.__name__} already has a jacext rule: {RULES[cls]}")
            RULES[cls] = rule
            if subtree:
                SUBTREE.add(cls)
            if min_dim is not None:
                MIN_DIMS[cls] = min_dim
        return rule

    return decorator


def covers_subtree(module: nn.Module) -> bool:
    return type(module) in SUBTREE


NORM_RULES: Dict[Type[nn.Module], Rule] = {}


def register_norms(*classes: Type[nn.Module]) -> Callable[[Rule], Rule]:
    """Register a squared-norm rule (decorator): same arguments as a rule, returns
    ``{param_name: (N, V)}``, the squared norms of the per-sample contractions, computed
    without materialising them (Gram matrices over positions). Optional: without one, norms
    come from the rule's materialised result."""

    def decorator(rule: Rule) -> Rule:
        for cls in classes:
            NORM_RULES[cls] = rule
        return rule

    return decorator


def norm_rule_for(module: nn.Module) -> Optional[Rule]:
    return NORM_RULES.get(type(module))


@dataclass(frozen=True)
class OwnBackward:
    """A layer's own gradients, as :func:`register_backward` registered them."""

    backward: Callable[..., Any]
    when: Optional[Callable[..., bool]] = None
    reads: Tuple[str, ...] = ()


BACKWARDS: Dict[Type[nn.Module], OwnBackward] = {}


def register_backward(
    *classes: Type[nn.Module],
    when: Optional[Callable[..., bool]] = None,
    reads: Tuple[str, ...] = (),
) -> Callable:
    """Register a layer's own gradients (decorator), ``backward(module, x, g, dx_wanted, params,
    per_sample=None) -> (dx, {param_name: dp})`` for its one input ``x`` and output cotangent
    ``g`` (N, *out): the parameter gradients summed over the batch where ``params`` (from
    ``per_sample``, the rule's results for this call, where the tape has them and summing them
    is cheaper), dx where wanted or None to leave it to autograd; with differentiable
    operations (``create_graph=True`` runs it). ClipGrad forms its clipped sums with it; BatchGrad,
    where ``when(module, x, output)`` (many positions per sample), takes p.grad from the
    per-sample gradients it materialises anyway (jacext.fused). ``reads``: the parameters its
    dx reads, which autograd then checks for changes in place since the forward, as it would.
    Where BatchGrad runs the rule and the backward on one cotangent, what both compute from it
    can be computed once (``jacext.rules.util.shared``)."""

    def decorator(backward: Callable[..., Any]) -> Callable[..., Any]:
        for cls in classes:
            BACKWARDS[cls] = OwnBackward(backward, when, reads)
        return backward

    return decorator


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule registered for ``type(module)``, or None."""
    return RULES.get(type(module))


def trainable(module: nn.Module, name: str) -> bool:
    """Whether ``module.get_parameter(name)`` exists and requires a gradient."""
    if "." not in name:  # the module's own (what get_parameter finds, without its cost)
        p = module._parameters.get(name)
        return p is not None and p.requires_grad
    try:
        return module.get_parameter(name).requires_grad
    except AttributeError:  # absent, or None (bias=False)
        return False


def _load_all() -> None:
    """Import every module of this package: adding a layer is adding one file."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_load_all()
