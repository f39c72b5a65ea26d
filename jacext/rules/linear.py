"""Linear: y = x W^T + b over any leading dimensions.

dy[n, t, o] / dW[o, i] = x[n, t, i]  =>  J_W[n, v] = sum_t G[v, n, t]^T x[n, t]
dy[n, t, o] / db[o]    = 1           =>  J_b[n, v] = sum_t G[v, n, t]

J_W is written straight into its result buffer: an outer product for one position,
one batched matrix product otherwise.
"""

import torch
from torch import nn

from jacext.rules import register, register_norms, trainable
from jacext.rules.util import result_buffer, sq_norms_of_products


@register(nn.Linear, min_dim=lambda m: 2)
def linear(module: nn.Linear, args, kwargs, grads):
    x, (g,) = args[0], grads
    n = x.shape[0]
    x = x.reshape(n, -1, module.in_features)  # (N, T, in)
    g = g.reshape(g.shape[0], n, -1, module.out_features)  # (V, N, T, out)
    out = {}
    if trainable(module, "weight"):
        v, t, o, i = g.shape[0], x.shape[1], module.out_features, module.in_features
        jw = result_buffer("weight", (n, v, o, i), x)
        if t == 1:
            torch.mul(g[:, :, 0].transpose(0, 1).unsqueeze(-1), x.reshape(n, 1, 1, i), out=jw)
        else:
            gt = g[0].transpose(1, 2) if v == 1 else g.permute(1, 0, 3, 2).reshape(n, v * o, t)  # (N, V O, T)
            torch.bmm(gt, x, out=jw.view(n, v * o, i))
        out["weight"] = jw
    if trainable(module, "bias"):
        out["bias"] = g.sum(2).transpose(0, 1)
    return out


@register_norms(nn.Linear)
def linear_norms(module: nn.Linear, args, kwargs, grads):
    """||J_W[n, v]||^2 via Gram matrices over the positions t, ||J_b[n, v]||^2 = ||sum_t G[v, n, t]||^2."""
    x, (g,) = args[0], grads
    n = x.shape[0]
    g = g.reshape(g.shape[0], n, -1, module.out_features)
    out = {}
    if trainable(module, "weight"):
        out["weight"] = sq_norms_of_products(g, x.reshape(n, -1, module.in_features)).T
    if trainable(module, "bias"):
        out["bias"] = g.sum(2).square().sum(-1).T
    return out
