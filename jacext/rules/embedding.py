"""Embedding: y[n, t] = W[x[n, t]].

    J_W[n, v, e] = sum_{t : x[n, t] = e} G[v, n, t]   (rows of padding_idx stay zero)

``max_norm`` renormalises W in place without gradient, so the rule is unchanged.
"""

import torch
from torch import nn

from jacext.errors import JacextError
from jacext.rules import register, trainable
from jacext.rules.util import require_batch_dim


@register(nn.Embedding)
def embedding(module, args, kwargs, grads):
    x, (g,) = args[0], grads
    if not trainable(module, "weight"):
        return {}
    if module.scale_grad_by_freq:
        raise JacextError(
            "Embedding(scale_grad_by_freq=True) scales gradients by batch-wide index counts, which "
            "has no per-sample meaning yet in jacext; construct the Embedding without it."
        )
    require_batch_dim(module, x, min_dim=1)
    v, n = g.shape[:2]
    idx = x.reshape(n, 1, -1, 1)  # (N, 1, T, 1)
    src = g.reshape(v, n, -1, module.embedding_dim).transpose(0, 1)  # (N, V, T, D)
    if module.padding_idx is not None:
        src = src * (idx != module.padding_idx).to(src.dtype)
    jw = torch.zeros(n, v, *module.weight.shape, dtype=g.dtype, device=g.device)
    jw.scatter_add_(2, idx.expand(n, v, -1, module.embedding_dim), src)
    return {"weight": jw}
