"""Conv1d/2d/3d: y[n, g, o, s] = sum_{i, k} W[g o, i, k] xpad[n, g i, s * stride + k * dilation] + b[g o].

``xpad`` is the input padded exactly as the module pads it (any ``padding``,
including ``'same'``, and any ``padding_mode``). With P the sliding windows of
``xpad``:

    J_W[n, v, g o, i, k] = sum_s G[v, n, g o, s] P[n, g i, s, k]
    J_b[n, v, o]         = sum_s G[v, n, o, s]

Two ways to compute J_W, chosen per call by the number of output positions S:

* many positions (more than 256): the weight gradient of one convolution whose
  groups are the samples (and the module's groups): input ``xpad`` as
  (1, N Cin, *L), output cotangent G as (1, N g V Cout/g, *S), weight
  (N g V Cout/g, Cin/g, *K); torch's own convolution backward, without unfolding
  P (2.3x faster than unfold and matmul on the benchmark CNN's second conv);
* few positions (deep layers of a ResNet): P unfolded to (N g, Cin/g K, S) and one
  batched matrix product with G, written straight into the result (1.6-2.3x
  faster than the grouped convolution on ResNet-18's layers at 32x32).

Its parameter gradients (torch's convolution backward on ``xpad``; db = sum G) are registered
for jacext.fused: from 16 output positions on, BatchGrad sums J_W over the samples instead
(N |W| additions against N S |W| multiply-adds).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacext.rules import register, register_backward, register_norms, trainable
from jacext.rules.util import as_run, channel_sums, patches, result_buffer, sq_norms_of_products, sq_sums


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, min_dim=lambda m: len(m.kernel_size) + 2, holomorphic=True, affine=True)
def conv(module, args, kwargs, grads):
    (g,) = grads
    x = as_run(args[0], g)
    out = {}
    if trainable(module, "weight"):
        out["weight"] = _weight_jacobian(module, x, g)
    if trainable(module, "bias"):
        out["bias"] = channel_sums(g)
    return out


def _many_positions(module, x: Tensor, y: Tensor) -> bool:
    return y.shape[2:].numel() >= 16


@register_backward(nn.Conv1d, nn.Conv2d, nn.Conv3d, when=_many_positions)
def conv_backward(module, x: Tensor, g: Tensor, *, dx_wanted: bool, params: bool, per_sample=None):
    grads = {}
    if params and trainable(module, "weight"):
        if per_sample is not None:
            grads["weight"] = per_sample["weight"].sum(0)[0]
        else:
            weight = as_run(module.weight, g)
            grads["weight"] = _weight_grad(module, g, _padded(module, as_run(x, g)), weight, module.groups)
    if params and trainable(module, "bias"):
        grads["bias"] = per_sample["bias"].sum(0)[0] if per_sample else g.sum([0, *range(2, g.dim())])
    return None, grads


def _weight_jacobian(module, x: Tensor, g: Tensor) -> Tensor:
    """J_W (N, V, *W.shape), by the formulation that suits the number of positions."""
    if g[0, 0, 0].numel() > 256:
        return _weight_jacobian_grouped(module, x, g)
    return _weight_jacobian_unfolded(module, x, g)


def _weight_jacobian_unfolded(module, x: Tensor, g: Tensor) -> Tensor:
    """J_W as a batched product of G (N g, V Cout/g, S) with the unfolded P (N g, S, Cin/g K)."""
    v, n = g.shape[:2]
    groups, (c_out, *rest) = module.groups, module.weight.shape
    d = len(module.kernel_size)
    p = patches(_padded(module, x), module.kernel_size, module.stride, module.dilation)  # (N, Cin, *S, *K)
    p = p.permute(0, 1, *range(2 + d, 2 + 2 * d), *range(2, 2 + d)).reshape(n * groups, -1, g[0, 0, 0].numel())
    gg = g.unflatten(2, (groups, -1)).permute(1, 2, 0, 3, *range(4, g.dim() + 1))  # (N, g, V, Cout/g, *S)
    gg = gg.reshape(n * groups, v * (c_out // groups), -1)
    if groups == 1 or v == 1:  # the product's layout is J_W's
        jw = result_buffer("weight", (n, v, c_out, *rest), x)
        torch.bmm(gg, p.transpose(1, 2), out=jw.view(n * groups, v * (c_out // groups), -1))
        return jw
    jw = torch.bmm(gg, p.transpose(1, 2)).view(n, groups, v, c_out // groups, *rest)
    return jw.transpose(1, 2).reshape(n, v, c_out, *rest)


def _weight_jacobian_grouped(module, x: Tensor, g: Tensor) -> Tensor:
    """J_W as the weight gradient of a convolution grouped by sample."""
    v, n = g.shape[:2]
    groups, (c_out, c_in_group, *kernel) = module.groups, module.weight.shape
    xpad = _padded(module, x)
    gg = g.unflatten(2, (groups, -1)).permute(1, 2, 0, 3, *range(4, g.dim() + 1))  # (N, g, V, Cout/g, *S)
    folded = gg.reshape(1, n * groups * v * (c_out // groups), *g.shape[3:])
    weight = x.new_empty(n * groups * v * (c_out // groups), c_in_group, *kernel)  # only its shape is read
    jw = _weight_grad(module, folded, xpad.reshape(1, -1, *xpad.shape[2:]), weight, n * groups)
    jw = jw.view(n, groups, v, c_out // groups, c_in_group, *kernel)
    return jw.transpose(1, 2).reshape(n, v, c_out, c_in_group, *kernel)  # a copy only if V > 1 and groups > 1


def _weight_grad(module, g: Tensor, xpad: Tensor, weight: Tensor, groups: int) -> Tensor:
    """The weight gradient of a convolution of the padded input ``xpad`` with the module's
    stride and dilation into ``groups`` groups (torch's convolution backward); ``weight``
    gives its shape."""
    d = len(module.kernel_size)
    zeros = [0] * d
    mask = [False, True, False]
    return torch.ops.aten.convolution_backward(
        g, xpad, weight, None, module.stride, zeros, module.dilation, False, zeros, groups, mask
    )[1]


def _padded(module, x: Tensor) -> Tensor:
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)


def _grouped_patches(module, x, g):
    """The input's sliding windows (N, g, Cin/g, *S, *K), padded as the module pads, and
    G as (V, N, g, Cout/g, *S)."""
    p = patches(_padded(module, x), module.kernel_size, module.stride, module.dilation)
    return p.unflatten(1, (module.groups, -1)), g.unflatten(2, (module.groups, -1))


@register_norms(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_norms(module, args, kwargs, grads):
    """||J_W[n, v]||^2 per group via Gram matrices over positions s where that is cheaper
    (S (Cout/g + Cin/g K) < Cout/g Cin/g K), else from J_W itself (one layer at a time)."""
    (g,) = grads
    x = as_run(args[0], g)
    d = len(module.kernel_size)
    v, n = g.shape[:2]
    out = {}
    if trainable(module, "weight"):
        groups, (c_out, c_in_k) = module.groups, (module.weight.shape[0], module.weight[0].numel())
        positions = g[0, 0, 0].numel()
        if positions * (c_out // groups + c_in_k) < c_out // groups * c_in_k:
            p, gg = _grouped_patches(module, x, g)
            p = p.flatten(3, 2 + d).transpose(2, 3).flatten(3).flatten(0, 1)  # (N g, S, Cin/g K)
            gg = gg.flatten(4).transpose(3, 4).flatten(1, 2)  # (V, N g, S, Cout/g)
            out["weight"] = sq_norms_of_products(gg, p).view(v, n, groups).sum(-1).T
        else:
            out["weight"] = sq_sums(_weight_jacobian(module, x, g).flatten(2), -1)
    if trainable(module, "bias"):
        out["bias"] = sq_sums(channel_sums(g), -1)
    return out
