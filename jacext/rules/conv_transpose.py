"""ConvTranspose1d/2d/3d: y[n, g o, s * stride + k * dilation - padding] += x[n, g i, s] W[g i, o, k] (+ b).

Padding the cotangent G by ``padding`` on the left (and to the full length,
cropping where negative, on the right; this also covers ``output_padding`` and a
forward ``output_size``) gives Gpad with Gpad[..., s * stride + k * dilation] =
G[..., s * stride + k * dilation - padding]. With P its sliding windows:

    J_W[n, v, g i, o, k] = sum_s x[n, g i, s] P[v, n, g o, s, k]
    J_b[n, v, o]         = sum_s G[v, n, o, s]
"""

import torch
import torch.nn.functional as F
from torch import nn

from jacext.rules import register, trainable
from jacext.rules.util import as_run, channel_sums, kernel_letters, patches, spatial_letters


@register(
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    min_dim=lambda m: len(m.kernel_size) + 2, holomorphic=True, affine=True,
)
def conv_transpose(module, args, kwargs, grads):
    (g,) = grads
    x = as_run(args[0], g)
    d = len(module.kernel_size)
    v, n = g.shape[:2]
    out = {}
    if trainable(module, "weight"):
        pads = []
        for j in reversed(range(d)):  # F.pad lists the last dimension first
            full = module.stride[j] * (x.shape[2 + j] - 1) + module.dilation[j] * (module.kernel_size[j] - 1) + 1
            left = module.padding[j]
            pads += [left, full - left - g.shape[3 + j]]
        gpad = F.pad(g, pads)
        p = patches(gpad, module.kernel_size, module.stride, module.dilation)
        p = p.unflatten(2, (module.groups, -1))  # (V, N, g, Cout/g, *S, *K)
        xg = x.unflatten(1, (module.groups, -1))  # (N, g, Cin/g, *S)
        s, k = spatial_letters(d), kernel_letters(d)
        jw = torch.einsum(f"ngi{s},vngo{s}{k}->nvgio{k}", xg, p)
        out["weight"] = jw.reshape(n, v, *module.weight.shape)
    if trainable(module, "bias"):
        out["bias"] = channel_sums(g)
    return out
