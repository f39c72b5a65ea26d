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

from jacext.rules import register, trainable
from jacext.rules.util import channel_sums, kernel_letters, patches, require_batch_dim, spatial_letters


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(module, args, kwargs, grads):
    x, (g,) = args[0], grads
    d = len(module.kernel_size)
    require_batch_dim(module, x, min_dim=d + 2)
    v, n = g.shape[:2]
    out = {}
    if trainable(module, "weight"):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        xpad = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        p = patches(xpad, module.kernel_size, module.stride, module.dilation)
        p = p.unflatten(1, (module.groups, -1))  # (N, g, Cin/g, *S, *K)
        gg = g.unflatten(2, (module.groups, -1))  # (V, N, g, Cout/g, *S)
        s, k = spatial_letters(d), kernel_letters(d)
        jw = torch.einsum(f"vngo{s},ngi{s}{k}->nvgoi{k}", gg, p)
        out["weight"] = jw.reshape(n, v, *module.weight.shape)
    if trainable(module, "bias"):
        out["bias"] = channel_sums(g)
    return out
