"""The generic rule: per-sample vector-Jacobian products of a module's own forward with torch.func.

For a module y = f(theta, x) whose rule is not written by hand, sample n's contraction is
the VJP of f(., x[n]) at theta with cotangent G[v, n]:

    J[n, v] = vjp(theta -> f(theta, x[n]), G[v, n])

computed as ``vmap`` over samples (each slice keeps a batch dimension of size 1) of ``vmap``
over seeds of ``torch.func.vjp`` of ``torch.func.functional_call``. Exact for any
differentiable forward that torch.func can transform and that treats samples independently
(``f(x)[n] == f(x[n:n+1])[0]``, as everything in jacext assumes); the hand-written rules are faster.
"""

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from jacext.errors import JacextError
from jacext.rules.util import replaying


def batch_size(grads: Sequence[Optional[Tensor]], out_dims: Sequence[int]) -> int:
    for g, d in zip(grads, out_dims, strict=True):
        if g is not None:
            return g.shape[1 + d]
    raise JacextError("no output of the module carries a gradient")


def per_sample_vjp(
    module: nn.Module,
    names: List[str],
    args,
    kwargs,
    grads: Sequence[Optional[Tensor]],
    in_dims: Optional[Sequence[Optional[int]]] = None,
    out_dims: Optional[Sequence[int]] = None,
    forward: Optional[Callable] = None,
) -> Dict[str, Tensor]:
    """``{name: (N, V, *p.shape)}`` for the parameters ``names`` of ``module``.

    Args:
        in_dims: the batch dimension of each leaf of ``tree_flatten((args, kwargs))``, or None
            where it is shared by all samples. Default: dim 0 for tensors whose first dimension is N.
        out_dims: the batch dimension of each output leaf (default 0).
        forward: ``forward(params, args, kwargs)`` (default ``functional_call(module, params, args, kwargs)``).
    """
    out_dims = list(out_dims) if out_dims is not None else [0] * len(grads)
    n = batch_size(grads, out_dims)
    if forward is None:
        forward = lambda params, a, k: functional_call(module, params, a, k)  # noqa: E731
    flat, spec = tree_flatten((args, kwargs))
    if in_dims is None:
        dims = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else None for t in flat]
    else:
        dims = list(in_dims)
    used = [i for i, g in enumerate(grads) if g is not None]
    params = {name: module.get_parameter(name).detach() for name in names}

    def one_sample(flat_n, grads_n):
        restored = [x if d is None else x.unsqueeze(d) for x, d in zip(flat_n, dims, strict=True)]
        a, k = tree_unflatten(restored, spec)

        def f(p):
            with replaying():
                leaves = [o for o in tree_leaves(forward(p, a, k)) if isinstance(o, Tensor)]
            return [leaves[i] for i in used]

        pullback = vjp(f, params)[1]
        cotangents = [g.unsqueeze(1 + out_dims[i]) for g, i in zip(grads_n, used, strict=True)]  # (V, ..., 1, ...)
        return vmap(lambda cs: pullback(cs)[0])(cotangents)  # {name: (V, *p.shape)}

    per_sample = vmap(one_sample, in_dims=(dims, [1 + out_dims[i] for i in used]))
    result = per_sample(flat, [grads[i] for i in used])
    return {name: value for name, value in result.items()}


_dims: ContextVar[Optional[Tuple[List[Optional[int]], List[int]]]] = ContextVar("jacext_generic_dims", default=None)


@contextmanager
def batch_dims(in_dims: List[Optional[int]], out_dims: List[int]) -> Iterator[None]:
    """The batch dimension of each input tensor (flattened; None: shared by all samples) and of
    each output leaf with a gradient, for the generic rules run inside the block."""
    token = _dims.set((in_dims, out_dims))
    try:
        yield
    finally:
        _dims.reset(token)


def generic(module: nn.Module, args, kwargs, grads) -> Dict[str, Tensor]:
    """Rule for any module without a hand-written one: its own trainable parameters."""
    names = [name for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    dims = _dims.get()
    if dims is None:
        return per_sample_vjp(module, names, args, kwargs, grads)
    in_dims, out_dims = dims
    by_tensor = iter(in_dims)
    flat = [next(by_tensor) if isinstance(t, Tensor) else None for t in tree_flatten((args, kwargs))[0]]
    graded = iter(out_dims)
    return per_sample_vjp(
        module, names, args, kwargs, grads, in_dims=flat, out_dims=[next(graded) if g is not None else 0 for g in grads]
    )
