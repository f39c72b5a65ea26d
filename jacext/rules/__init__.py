"""The layer registry: one :class:`Layer` per module class, everything jacext knows of it.

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

Every extension (BatchGrad, BatchJacobian, ...) is served by this one function. A layer may
add, each with its own decorator on the same class: a norm rule (:func:`register_norms`), its
own backward (:func:`register_backward`), the factors of its Jacobian for the NTK
(:func:`register_ntk_factors`) and a policy for calls that couple samples
(:func:`register_policy`). Classes are matched exactly (no ``isinstance``), as in BackPACK: a
subclass may change ``forward`` and needs its own registration. Except for classes with a
policy (BatchNorm), whose subclasses behave alike where it matters: a subclass without an entry
of its own gets the policy of its nearest registered base, and the whole entry (the rule too)
where it keeps that base's ``forward``. Adding a layer is adding one
file to this package. Classes of optional libraries (HuggingFace's ``Conv1D``, timm's
``BatchNormAct2d``) are registered by their full name, ``"module.QualName"``, so that jacext
imports none of them.
"""

import importlib
import pkgutil
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

from torch import Tensor, nn

Rule = Callable[..., Dict[str, Tensor]]


@dataclass(frozen=True)
class OwnBackward:
    """A layer's own gradients, as :func:`register_backward` registered them."""

    backward: Callable[..., Any]
    when: Optional[Callable[..., bool]] = None
    reads: Tuple[str, ...] = ()
    every_input: bool = False  # takes the call's args and kwargs, gives each input tensor's gradient


@dataclass(frozen=True)
class Policy:
    """What a layer does about calls that make samples depend on each other (BatchNorm on batch
    statistics), as :func:`register_policy` registered it."""

    check: Callable[[nn.Module], None]  # before each recorded call: raise where no usable choice was made
    couples: Callable[[nn.Module], bool]  # whether this call couples samples (then seeded per sample)
    mode: Callable[[nn.Module], Optional[bool]]  # the training mode to record the call in, or None: as is


@dataclass(frozen=True)
class Layer:
    """Everything jacext knows about one module class."""

    rule: Optional[Rule] = None
    subtree: bool = False  # the rule also covers submodules' parameters (MultiheadAttention's out_proj)
    min_dim: Optional[Callable[[Any], int]] = None  # fewest dims of the first input with a batch dimension
    batch_dim: Optional[Callable[[Any], int]] = None  # where the rule reads the batch (default 0)
    leading: bool = False  # the rule treats all leading dims alike: the batch may be moved to dim 0
    holomorphic: bool = False  # the output is holomorphic in the parameters: the rule serves complex ones too
    affine: bool = False  # the output is affine in the first input: gradient penalties (jacext.engine.penalty)
    forward_ad: bool = False  # the rule has a forward-mode derivative in the first input: the same, otherwise
    norms: Optional[Rule] = None  # squared norms (N, V) without materialising
    norms_cheaper: Optional[Callable[..., bool]] = None  # whether they beat materialising (default: always)
    backward: Optional[OwnBackward] = None
    ntk_factors: Optional[Callable[..., Dict[str, Any]]] = None
    policy: Optional[Policy] = None


LAYERS: Dict[Type[nn.Module], Layer] = {}
NAMED: Dict[str, Layer] = {}  # classes of optional libraries, by "module.QualName"

Class = Union[Type[nn.Module], str]  # a class, or the full name of one jacext does not import


def layer_of(module: nn.Module) -> Layer:
    """The registry's entry for ``type(module)`` (an empty one if it has none; for a subclass of
    a class with a policy, what it inherits: see above)."""
    cls = type(module)
    layer = LAYERS.get(cls)
    if layer is None:
        layer = NAMED.get(f"{cls.__module__}.{cls.__qualname__}")
    if layer is None:
        layer = _INHERITED.get(cls)
    if layer is None:
        layer = _INHERITED[cls] = _inherited(cls)
    return layer


def _inherited(cls: type) -> Layer:
    for base in cls.__mro__[1:]:
        entry = LAYERS.get(base) or NAMED.get(f"{base.__module__}.{base.__qualname__}")
        if entry is not None:
            if entry.policy is None:
                return _NONE
            same_forward = getattr(cls, "forward", None) is getattr(base, "forward", None)
            return entry if same_forward else Layer(policy=entry.policy)
    return _NONE


_NONE = Layer()
_INHERITED: Dict[type, Layer] = {}  # classes without an entry of their own, looked up once


def _update(classes, **fields) -> None:
    _INHERITED.clear()
    for cls in classes:
        table: Dict[Any, Layer] = NAMED if isinstance(cls, str) else LAYERS
        table[cls] = replace(table.get(cls, _NONE), **fields)


def register(
    *classes: Class,
    subtree: bool = False,
    min_dim: Optional[Callable[[Any], int]] = None,
    batch_dim: Optional[Callable[[Any], int]] = None,
    leading: bool = False,
    holomorphic: bool = False,
    affine: bool = False,
    forward_ad: bool = False,
) -> Callable[[Rule], Rule]:
    """Register ``rule`` for the given module classes (decorator).

    Args:
        classes: the module classes (matched exactly), or their full names ``"module.QualName"``.
        subtree: the rule also returns the parameters of submodules that the module uses in its
            own forward without calling them (MultiheadAttention's out_proj).
        min_dim: ``min_dim(module)``, the fewest dimensions of the first input with a leading
            batch dimension; a call with fewer is refused as the forward records it.
        batch_dim: ``batch_dim(module)``, the dimension of the first input (and of the outputs)
            the rule takes the samples from (default 0; ``1`` for a seq-first layer).
        leading: the rule treats every leading dimension of the input alike (y = x W^T + b),
            so a batch found elsewhere (a seq-first model) is moved to dimension 0 for it.
        holomorphic: the output is a holomorphic function of the parameters (a product with the
            input: Linear, Conv), so the rule, written for real parameters, also gives complex
            ones, in autograd's convention, as conj(rule(conj G)); otherwise complex parameters
            take the generic rule.
        affine: the output is affine in the first input for fixed parameters (y = A_W x + b:
            Linear, Conv), so the per-sample term of a gradient penalty through the layer's input
            gradient is the rule on that input's cotangent (jacext.engine.penalty); a penalty
            through a layer without it or ``forward_ad`` is refused.
        forward_ad: the rule, written with operations that have forward-mode derivatives (no
            ``out=``, no in-place writes into other tensors), is differentiable in its first
            input, so that term is the rule's derivative along that input's cotangent
            (``torch.autograd.forward_ad``): normalisations, PReLU.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from jacext.rules import layer_of, register
        >>> class Scale(nn.Module):  # y = a * x
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = nn.Parameter(torch.ones(()))
        ...     def forward(self, x):
        ...         return self.a * x
        >>> @register(Scale)
        ... def scale(module, args, kwargs, grads):  # J_a[n, v] = sum G[v, n] x[n]
        ...     return {"a": (grads[0] * args[0]).flatten(2).sum(2).transpose(0, 1)}
        >>> layer_of(Scale()).rule is scale
        True
    """

    def decorator(rule: Rule) -> Rule:
        for cls in classes:
            if layer_of_class(cls).rule is not None:
                raise ValueError(f"{cls} already has a jacext rule: {layer_of_class(cls).rule}")
        _update(
            classes, rule=rule, subtree=subtree, min_dim=min_dim, batch_dim=batch_dim, leading=leading,
            holomorphic=holomorphic, affine=affine, forward_ad=forward_ad,
        )
        return rule

    return decorator


def layer_of_class(cls: Class) -> Layer:
    return NAMED.get(cls, _NONE) if isinstance(cls, str) else LAYERS.get(cls, _NONE)


def register_norms(*classes: Class, cheaper: Optional[Callable[..., bool]] = None) -> Callable[[Rule], Rule]:
    """Register a squared-norm rule (decorator): same arguments as a rule, returns
    ``{param_name: (N, V)}``, the squared norms of the per-sample contractions, computed
    without materialising them (Gram matrices over positions). Optional: without one, norms
    come from the rule's materialised result.

    ``cheaper(module, args, grads)``: whether the norm rule costs less than the rule where it
    would materialise the products anyway; where it says no, ClipGrad's inline plan runs the rule
    instead and takes the clipped sum from its results (N |p| multiply-adds) rather than from the
    layer's gradients again (jacext.engine.plan.InlineClipping). Default: always cheaper."""

    def decorator(rule: Rule) -> Rule:
        _update(classes, norms=rule, norms_cheaper=cheaper)
        return rule

    return decorator


def register_backward(
    *classes: Class,
    when: Optional[Callable[..., bool]] = None,
    reads: Tuple[str, ...] = (),
    every_input: bool = False,
) -> Callable:
    """Register a layer's own gradients (decorator), ``backward(module, x, g, *, dx_wanted,
    params, per_sample=None) -> (dx, {param_name: dp})`` for its one input ``x`` and output
    cotangent ``g`` (N, *out): the parameter gradients summed over the batch where ``params``
    (from ``per_sample``, the rule's results for this call, where the engine has them and
    summing them is cheaper), dx where ``dx_wanted`` or None to leave it to autograd; with
    differentiable operations (``create_graph=True`` runs it).

    ClipGrad forms its clipped sums with it; BatchGrad, where ``when(module, x, output)`` (many
    positions per sample), takes p.grad from the per-sample gradients it materialises anyway
    (jacext.engine.fused). ``reads``: the parameters its dx reads, which autograd then checks
    for changes in place since the forward, as it would (those the module has). What the rule and
    the backward both compute from one cotangent can be computed once (``jacext.rules.util.shared``).

    ``every_input``: a layer of several input tensors (MultiheadAttention's query, key, value)
    registers ``backward(module, args, kwargs, g, *, dx_wanted, params, per_sample=None) ->
    (pairs, {param_name: dp})`` instead, with ``pairs`` the ``(input, gradient)`` of each input
    tensor it differentiates (a tensor passed twice gets the sum of its pairs), and a keyword
    ``weights`` (N,): where given, the parameters' gradients for the cotangent w_n g[n] (ClipGrad's
    clipped sums, from the g its norms were computed from); its calls are fused whatever their inputs."""

    def decorator(backward: Callable[..., Any]) -> Callable[..., Any]:
        _update(classes, backward=OwnBackward(backward, when, reads, every_input))
        return backward

    return decorator


def register_ntk_factors(*classes: Class) -> Callable:
    """Register the factors of a layer's Jacobian for the NTK (decorator): ``factors(module,
    args, grads, n) -> {param_name: factor}`` with ``grads`` the cotangents (C, n, *out) of
    the C output seeds; a factor is a dense block (C, n, P) or a pair (X, G) whose Jacobian
    ``J[c, n] = sum_t G[c, n, t]^T X[n, t]`` the NTK contracts without building it."""

    def decorator(factors: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
        _update(classes, ntk_factors=factors)
        return factors

    return decorator


def register_policy(*classes: Class, check, couples, mode) -> None:
    """Register what the classes do about calls that couple samples (see :class:`Policy`)."""
    _update(classes, policy=Policy(check, couples, mode))


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
