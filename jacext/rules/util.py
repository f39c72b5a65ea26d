"""Small helpers shared by the rules."""

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any, Callable, ContextManager, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from jacext.engine.memory import ResultSlot
from jacext.errors import JacextError
from jacext.rules import trainable

_DESTINATIONS: ContextVar[Optional[Dict[str, ResultSlot]]] = ContextVar("jacext_destinations", default=None)
_SHARED: ContextVar[Optional[Dict[Any, Any]]] = ContextVar("jacext_shared", default=None)
Autocast = Optional[Tuple[str, torch.dtype]]  # (device type, dtype) of an enabled autocast, or None
_FORWARD_AUTOCAST: ContextVar[Autocast] = ContextVar("jacext_forward_autocast", default=None)


@contextmanager
def writing_into(destinations: Dict[str, ResultSlot]):
    """While a rule runs: where the tape wants its results, by parameter name."""
    token = _DESTINATIONS.set(destinations)
    try:
        yield
    finally:
        _DESTINATIONS.reset(token)


@contextmanager
def sharing():
    """While one call's rule and its own backward run on the same cotangent (BatchGrad's fused
    calls, jacext.fused): what both compute from their inputs is computed once (:func:`shared`)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def shared(key, compute: Callable[[], Any]) -> Any:
    """``compute()``, once per ``key`` while :func:`sharing` is open (else every time); ``key``
    names one value of one call, such as ``("linear positions", id(module))``."""
    values = _SHARED.get()
    if values is None:
        return compute()
    if key not in values:
        values[key] = compute()
    return values[key]


def result_buffer(name: str, shape, like: Tensor) -> Tensor:
    """Where a rule may write its whole ``(N, V, *p.shape)`` result for parameter ``name``: the
    tape's slot for it (a previous result nobody else holds, reused), else a fresh tensor.
    Optional: a rule that returns a fresh tensor instead is just as correct, only slower for
    large results, whose memory is then allocated anew at every backward."""
    slot = _slot(name, shape, like)
    return slot.take(shape) if slot is not None else like.new_empty(shape)


def index_add_result(name: str, shape, index: Tensor, src: Tensor) -> Tensor:
    """Parameter ``name``'s whole result, of ``shape`` (R, D): zero but for rows
    ``out[index[i]] += src[i]``. Written into the tape's slot where there is one, which then
    clears only the rows its previous result wrote (:meth:`ResultSlot.index_add`)."""
    slot = _slot(name, shape, src)
    return slot.index_add(shape, index, src) if slot is not None else src.new_zeros(shape).index_add_(0, index, src)


def _slot(name: str, shape, like: Tensor) -> Optional[ResultSlot]:
    slot = (_DESTINATIONS.get() or {}).get(name)
    if slot is not None and slot.shape.numel() == torch.Size(shape).numel() and slot.like.dtype == like.dtype:
        return slot
    return None


def autocast_state(device_type: str) -> Autocast:
    """The autocast in effect for ``device_type`` now: ``(device_type, dtype)``, or None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return device_type, torch.get_autocast_dtype(device_type)
    return None


def autocast_as(state: Autocast, device_type: str) -> ContextManager:
    """Autocast for ``device_type`` as ``state``, entered only where it differs from the autocast
    in effect now (entering costs about 10 us)."""
    if state == autocast_state(device_type):
        return nullcontext()
    if state is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=state[1])


@contextmanager
def running_rule(device_type: str, forward: Autocast):
    """While a call's rule runs: without autocast (a contraction in float32 must stay in float32;
    autocast would round it, and overflow its squares in float16), ``forward`` (the call's
    :func:`autocast_state` at forward time) kept for :func:`replaying`."""
    token = _FORWARD_AUTOCAST.set(forward)
    try:
        with autocast_as(None, device_type):
            yield
    finally:
        _FORWARD_AUTOCAST.reset(token)


def replaying() -> ContextManager:
    """For a rule that runs its layer's forward again (the generic rule, MultiheadAttention, the
    recurrent layers): the autocast that call's forward ran under, so that autocast casts the
    recorded inputs and the parameters as it did then."""
    state = _FORWARD_AUTOCAST.get()
    return nullcontext() if state is None else autocast_as(state, state[0])


def as_run(x: Tensor, g: Tensor) -> Tensor:
    """A floating input or parameter ``x`` in the dtype its layer ran in, that of the cotangent G
    of its output (autograd gives G the output's dtype): what autocast cast it to in the forward
    (Linear under bfloat16 autocast: x and W rounded to bfloat16; a layer autocast runs in
    float32: x upcast). ``x`` itself where the dtypes agree or it is not floating (indices)."""
    return x.to(g.dtype) if x.is_floating_point() and x.dtype != g.dtype else x


def for_squares(t: Tensor) -> Tensor:
    """``t`` in at least float32, for the squared norms of its per-sample gradients: in float16 a
    square overflows (above 2^8, a GradScaler-scaled gradient soon) long before the gradient does,
    and an infinite norm would clip the sample to zero without a non-finite gradient to show it."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def require_batch_dim(module: nn.Module, x: Tensor, min_dim: int) -> None:
    """Raise a clear error if ``x`` has no leading batch dimension."""
    if x.dim() < min_dim:
        raise JacextError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)} without a batch "
            f"dimension; per-sample quantities need inputs of shape (N, ...) with at least "
            f"{min_dim} dimensions. Add one with x.unsqueeze(0)."
        )


def channel_sums(g: Tensor) -> Tensor:
    """J of a per-channel bias: G (V, N, C, *S) summed over the positions, as (N, V, C)."""
    return g.flatten(3).sum(-1).transpose(0, 1)


def spatial_letters(d: int) -> str:
    """Einsum letters for ``d`` spatial dimensions."""
    return "xyz"[:d]


def kernel_letters(d: int) -> str:
    """Einsum letters for ``d`` kernel dimensions."""
    return "abc"[:d]


def patches(x: Tensor, kernel_size, stride, dilation) -> Tensor:
    """Sliding windows of the last ``len(kernel_size)`` dims of ``x`` as a strided view.

    ``x`` of shape ``(..., L_1, ..., L_d)`` becomes ``(..., O_1, ..., O_d, K_1, ..., K_d)``
    with ``out[..., o, k] = x[..., o * stride + k * dilation]`` (no copy).
    """
    d = len(kernel_size)
    first = x.dim() - d
    for j, (k, s, dil) in enumerate(zip(kernel_size, stride, dilation, strict=True)):
        x = x.unfold(first + j, dil * (k - 1) + 1, s)[..., ::dil]
    return x


def affine_jacobians(module: Any, g: Tensor, xhat: Tensor, channel_dim: bool) -> dict:
    """:func:`affine_products` for a normalisation layer's trainable weight and bias."""
    shape: torch.Size = (module.weight if module.weight is not None else module.bias).shape
    return affine_products(g, xhat, shape, channel_dim, trainable(module, "weight"), trainable(module, "bias"))


def affine_products(g: Tensor, xhat: Tensor, shape, channel_dim: bool, weight: bool, bias: bool) -> dict:
    """J of y = xhat * w + b (w, b of ``shape``), from the normalised input ``xhat``: those asked for.

    ``channel_dim=True``: w, b have one entry per channel (dim 1 of the input), so
    J_w[n, v, c] = sum_s G[v, n, c, s] xhat[n, c, s]. Otherwise w, b have the shape of the
    trailing dims (LayerNorm, RMSNorm): J_w[n, v, e] = sum_t G[v, n, t, e] xhat[n, t, e].
    J_b is the same contraction with xhat = 1.
    """
    v, n = g.shape[:2]
    if channel_dim:  # (V, N, C, S): contract the positions s
        c = shape.numel()
        g, xhat, summed = g.reshape(v, n, c, -1), xhat.reshape(n, c, -1), 3
    else:  # (V, N, T, E): contract the leading positions t
        e = shape.numel()
        g, xhat, summed = g.reshape(v, n, -1, e), xhat.reshape(n, -1, e), 2
    out = {}
    if weight:  # a product and a sum: einsum's batched product costs 3x here
        out["weight"] = (g * xhat).sum(summed).transpose(0, 1).reshape(n, v, *shape)
    if bias:
        out["bias"] = g.sum(summed).transpose(0, 1).reshape(n, v, *shape)
    return out


def sq_sums(t: Tensor, dim) -> Tensor:
    """The sum of the squares of ``t`` over ``dim``, in at least float32 (:func:`for_squares`),
    in one pass: the norm, squared (on the CPU 2.4x faster than ``square().sum()``: 18 against
    43 us for 256 x 784 float32 values, one thread)."""
    return torch.linalg.vector_norm(for_squares(t), dim=dim).square()


def running_stats_xhat(module: Any, x: Tensor) -> Tensor:
    """(x - running_mean) / sqrt(running_var + eps), statistics per channel (dim 1)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)


PRODUCTS = 32 * 2**20  # bytes of per-sample products that sq_norms_of_products holds at once


def by_gram(t: int, o: int, i: int) -> bool:
    """Whether :func:`sq_norms_of_products` of T positions, O outputs and I inputs avoids the
    (O, I) products (Gram matrices, or one position)."""
    return t == 1 or 2 * t * (o + i) < o * i


def sq_norms_of_products(g: Tensor, x: Tensor) -> Tensor:
    """||sum_t g[v, b, t] x[b, t]^T||^2 of shape (V, B), for g (V, B, T, O) and x (B, T, I).

    With Gram matrices over positions, sum_{t, s} (g_t . g_s)(x_t . x_s), where T (O + I) <
    O I / 2; else from the (V, B, O, I) products, ``PRODUCTS`` bytes of them at a time. Both by
    batched matrix products (an einsum took 1.4-2.5x as long: B = 16, T = 64, O, I in 128 and
    512, one CPU thread); the products win up to half the Gram's multiply-adds (B = 16, T = 64,
    O = 512, I = 128: 1.2 against 1.6 ms), the Gram below (T = 17, O = 576, I = 192: 0.64
    against 1.74 ms, and by orders of magnitude where the products outgrow the caches). In at
    least float32 (:func:`for_squares`), from g and x in the dtype their layer ran in.
    """
    g, x = for_squares(g), for_squares(x)
    v, b, t, o = g.shape
    i = x.shape[2]
    if t == 1:
        return sq_sums(g, (2, 3)) * sq_sums(x, (1, 2))
    if by_gram(t, o, i):
        return (torch.matmul(g, g.transpose(2, 3)) * torch.bmm(x, x.transpose(1, 2))).sum((2, 3))
    per = max(1, PRODUCTS // (v * o * i * g.element_size()))
    parts = [
        torch.linalg.vector_norm(torch.matmul(g[:, s : s + per].transpose(2, 3), x[s : s + per]), dim=(2, 3))
        for s in range(0, b, per)
    ]
    return torch.cat(parts, 1).square() if len(parts) > 1 else parts[0].square()
