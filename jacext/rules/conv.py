"""Conv1d/2d/3d: y[n, g, o, s] = sum_{i, k} W[g o, i, k] xpad[n, g i, s * stride + k * dilation] + b[g o].

``xpad`` is the input padded exactly as the module pads it (any ``padding``,
including ``'same'``, and any ``padding_mode``). With P the sliding windows of
``xpad`` (a strided view, no copy):

    J_W[n, v, g o, i, k] = sum_s G[v, n, g o, s] P[n, g i, s, k]
    J_b[n, v, o]         = sum_s G[v, n, o, s]
"""

import torch
import torch.nn.functional as F
from torch import nn

from jacext.rules import register, register_norms, trainable
from jacext.rules.util import (
    channel_sums,
    kernel_letters,
    patches,
    require_batch_dim,
    spatial_letters,
    sq_norms_of_products,
)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(module, args, kwargs, grads):
    x, (g,) = args[0], grads
    d = len(module.kernel_size)
    require_batch_dim(module, x, min_dim=d + 2)
    v, n = g.shape[:2]
    out = {}
    if trainable(module, "weight"):
        p, gg = _grouped_patches(module, x, g)
        s, k = spatial_letters(d), kernel_letters(d)
        jw = torch.einsum(f"vngo{s},ngi{s}{k}->nvgoi{k}", gg, p)
        out["weight"] = jw.reshape(n, v, *module.weight.shape)
    if trainable(module, "bias"):
        out["bias"] = channel_sums(g)
    return out


def _grouped_patches(module, x, g):
    """The input's sliding windows (N, g, Cin/g, *S, *K), padded as the module pads, and
    G as (V, N, g, Cout/g, *S)."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    xpad = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    p = patches(xpad, module.kernel_size, module.stride, module.dilation)
    return p.unflatten(1, (module.groups, -1)), g.unflatten(2, (module.groups, -1))


@register_norms(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_norms(module, args, kwargs, grads):
    """||J_W[n, v]||^2 per group via Gram matrices over positions s (or materialised where cheaper)."""
    x, (g,) = args[0], grads
    d = len(module.kernel_size)
    v, n = g.shape[:2]
    out = {}
    if trainable(module, "weight"):
        p, gg = _grouped_patches(module, x, g)
        groups = module.groups
        p = p.flatten(3, 2 + d).transpose(2, 3).flatten(3).flatten(0, 1)  # (N g, S, Cin/g K)
        gg = gg.flatten(4).transpose(3, 4).flatten(1, 2)  # (V, N g, S, Cout/g)
        out["weight"] = sq_norms_of_products(gg, p).view(v, n, groups).sum(-1).T
    if trainable(module, "bias"):
        out["bias"] = channel_sums(g).square().sum(-1)
    return out
