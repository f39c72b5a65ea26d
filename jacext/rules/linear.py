"""Linear: y = x W^T + b over any leading dimensions.

dy[n, t, o] / dW[o, i] = x[n, t, i]  =>  J_W[n, v] = sum_t G[v, n, t]^T x[n, t]
dy[n, t, o] / db[o]    = 1           =>  J_b[n, v] = sum_t G[v, n, t]

J_W is written straight into its result buffer: an outer product for one position,
one batched matrix product otherwise. Where G is the same at every position (the backward of
a mean or sum over the positions: an expanded tensor, or on the CPU equal values, checked
exactly), sum_t G[t]^T x[t] = G[0]^T sum_t x[t], one position.

Its own backward (dx = G W, dW = sum_{n, t} G^T x, db = sum_{n, t} G) is registered too: from
16 positions per sample on, summing J_W over the samples (N O I additions) is cheaper than
autograd's G^T X (N T O I multiply-adds); it uses the same shortcut for a G constant over the
positions.
"""

import torch
from torch import Tensor, nn

from jacext.rules import register, register_backward, register_norms, register_ntk_factors, trainable
from jacext.rules.util import as_run, by_gram, result_buffer, shared, sq_norms_of_products, sq_sums


def _positions(module: nn.Linear, x: Tensor, g: Tensor):
    """:func:`positions`, once for the rule and the backward of a fused call."""
    return shared(("linear positions", id(module)), lambda: positions(x, g))


def positions(x: Tensor, g: Tensor):
    """x (N, ..., in) as (N, T, in) and G (V, N, ..., out) as (V, N, T, out); and the pair for
    J_W, with T = 1 where G is constant over the positions."""
    n, t = x.shape[0], x.shape[1:-1].numel()
    x = as_run(x, g).reshape(n, t, x.shape[-1])  # in the dtype the layer ran in
    g = g.reshape(g.shape[0], n, t, g.shape[-1])
    if _constant_over_positions(g):
        return x, g, x.sum(1, keepdim=True), g[:, :, :1]
    return x, g, x, g


def _constant_over_positions(g: Tensor) -> bool:
    """G (V, N, T, out) equal at every t. Compared by value on the CPU only (first two
    positions, then all), where the comparison does not wait for a device, and not inside a
    torch.func transform (the tape's batched pull-back), which cannot branch on values."""
    if g.shape[2] < 2:
        return False
    if g.stride(2) == 0:
        return True
    functorch = torch._C._functorch
    if g.device.type != "cpu" or functorch.is_functorch_wrapped_tensor(g) or functorch.is_legacy_batchedtensor(g):
        return False
    first = g[:, :, :1]
    return torch.equal(first, g[:, :, 1:2]) and torch.equal(g, first.expand_as(g))


@register(nn.Linear, min_dim=lambda m: 2, leading=True, holomorphic=True, affine=True)
def linear(module: nn.Linear, args, kwargs, grads):
    xg = _positions(module, args[0], grads[0])
    return linear_jacobians(xg, trainable(module, "weight"), trainable(module, "bias"))


def linear_jacobians(positions, weight: bool, bias: bool):
    """J_W (N, V, out, in) and J_b (N, V, out), those asked for, from :func:`positions`."""
    x, g, xw, gw = positions
    out = {}
    if weight:
        (v, n, _, o), i = gw.shape, x.shape[2]
        out["weight"] = weight_products(gw, xw, result_buffer("weight", (n, v, o, i), x))
    if bias:
        out["bias"] = g.sum(2).transpose(0, 1)
    return out


def weight_products(g: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """out[n, v] = sum_t g[v, n, t]^T x[n, t] for g (V, N, T, O), x (N, T, I), written into
    ``out`` (N, V, O, I), which may be a slice of a larger result (rows of a stacked weight):
    an outer product for one position, one batched matrix product otherwise."""
    v, n, t, o = g.shape
    i = x.shape[2]
    if t == 1:
        _outer_products(g[:, :, 0].transpose(0, 1), x.reshape(n, i), out)
    elif v == 1:
        torch.bmm(g[0].transpose(1, 2), x, out=out[:, 0])
    elif out.is_contiguous():
        torch.bmm(g.permute(1, 0, 3, 2).reshape(n, v * o, t), x, out=out.view(n, v * o, i))
    else:
        torch.matmul(g.permute(1, 0, 3, 2), x.unsqueeze(1), out=out)
    return out


STREAMED = 128 * 2**20  # bytes of J_W from which the CPU writes it as a batched product


def _outer_products(g: Tensor, x: Tensor, jw: Tensor) -> None:
    """jw[n, v] = g[n, v] x[n]^T for g (N, V, O), x (N, I), into jw (N, V, O, I). An elementwise
    product, except on the CPU for results larger than the caches, which a batched product
    with one-term sums writes 3-10 % faster (measured here from about 100 MiB: 411 MiB in 46.3
    against 49.7 ms); smaller ones, written into the cache, take 20-30 % longer that way."""
    n, v, o = g.shape
    i = x.shape[1]
    if jw.device.type == "cpu" and jw.numel() * jw.element_size() >= STREAMED and jw.is_contiguous():
        rows = x[:, None, None, :].expand(n, v, 1, i).reshape(n * v, 1, i)
        torch.bmm(g.reshape(n * v, o, 1), rows, out=jw.view(n * v, o, i))
    else:
        torch.mul(g.unsqueeze(-1), x.reshape(n, 1, 1, i), out=jw)


def _norms_cheaper(module: nn.Linear, args, grads) -> bool:
    return by_gram(args[0].shape[1:-1].numel(), module.out_features, module.in_features)


@register_norms(nn.Linear, cheaper=_norms_cheaper)
def linear_norms(module: nn.Linear, args, kwargs, grads):
    """||J_W[n, v]||^2 via Gram matrices over the positions t, ||J_b[n, v]||^2 = ||sum_t G[v, n, t]||^2."""
    _, g, xw, gw = _positions(module, args[0], grads[0])
    out = {}
    if trainable(module, "weight"):
        out["weight"] = sq_norms_of_products(gw, xw).T
    if trainable(module, "bias"):
        out["bias"] = sq_sums(g.sum(2), -1).T
    return out


def _many_positions(module: nn.Linear, x: Tensor, y: Tensor) -> bool:
    return x.dim() > 2 and x.shape[1:].numel() >= 16 * module.in_features


@register_backward(nn.Linear, when=_many_positions, reads=("weight",))
def linear_backward(module: nn.Linear, x: Tensor, g: Tensor, *, dx_wanted: bool, params: bool, per_sample=None):
    x3, g4, xw, gw = _positions(module, x, g.unsqueeze(0))
    dx = None
    if dx_wanted:  # written out whole: an expanded dx slows the elementwise backward before it
        dx = (gw[0] @ as_run(module.weight, g)).expand(x3.shape).contiguous().view(x.shape)
    grads = {}
    if params:
        if trainable(module, "weight"):
            many = gw.shape[2] > 1  # else the product is cheaper than the sum
            grads["weight"] = (
                per_sample["weight"].sum(0)[0] if many and per_sample else gw[0].flatten(0, 1).T @ xw.flatten(0, 1)
            )
        if trainable(module, "bias"):
            grads["bias"] = per_sample["bias"].sum(0)[0] if per_sample else g4[0].sum((0, 1))
    return dx, grads


@register_ntk_factors(nn.Linear)
def linear_ntk_factors(module: nn.Linear, args, grads, n: int):
    """The weight as the pair (X, G), X (n, T, in) the input and G (C, n, T, out) the output's
    cotangents: J_W[c, n] = sum_t G[c, n, t]^T X[n, t] is never built; the bias as its dense
    block sum_t G[c, n, t]."""
    c = grads[0].shape[0]
    x = args[0].reshape(n, -1, module.in_features)
    g = grads[0].reshape(c, n, -1, module.out_features)
    out = {}
    if trainable(module, "weight"):
        out["weight"] = (x, g)
    if trainable(module, "bias"):
        out["bias"] = g.sum(2)
    return out
