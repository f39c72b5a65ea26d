"""Bilinear: y[n, t, o] = sum_{i, j} x1[n, t, i] W[o, i, j] x2[n, t, j] + b[o] over any leading dims t.

J_W[n, v, o, i, j] = sum_t G[v, n, t, o] x1[n, t, i] x2[n, t, j],   J_b[n, v] = sum_t G[v, n, t]
"""

import torch
from torch import nn

from jacext.rules import register, trainable
from jacext.rules.util import as_run


@register(nn.Bilinear, min_dim=lambda m: 2, leading=True)
def bilinear(module, args, kwargs, grads):
    (g,) = grads
    x1, x2 = (as_run(x, g) for x in args[:2])
    n, v = x1.shape[0], g.shape[0]
    x1, x2 = x1.reshape(n, -1, module.in1_features), x2.reshape(n, -1, module.in2_features)
    g = g.reshape(v, n, -1, module.out_features)
    out = {}
    if trainable(module, "weight"):
        out["weight"] = torch.einsum("vnto,nti,ntj->nvoij", g, x1, x2)
    if trainable(module, "bias"):
        out["bias"] = g.sum(2).transpose(0, 1)
    return out
