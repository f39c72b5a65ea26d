"""HuggingFace's Conv1D (GPT-2, GPT): y = x W + b over any leading dimensions, W of shape (in, out).

dy[n, t, o] / dW[i, o] = x[n, t, i]  =>  J_W[n, v] = sum_t x[n, t]^T G[v, n, t]
dy[n, t, o] / db[o]    = 1           =>  J_b[n, v] = sum_t G[v, n, t]

Linear's contraction with the weight transposed, written into its result buffer by one
batched product. Its own backward (dx = G W^T, dW = sum_{n, t} x^T G, db = sum_{n, t} G) is
registered too: ClipGrad then never materialises the per-sample gradients, and from 16 positions
per sample on BatchGrad takes dW from the sum of J_W (N I O additions) instead of autograd's
x^T G (N T I O multiply-adds). Registered by name: jacext does not import transformers.
"""

import torch
from torch import Tensor

from jacext.rules import register, register_backward, register_norms, trainable
from jacext.rules.util import as_run, by_gram, result_buffer, shared, sq_norms_of_products, sq_sums

CONV1D = "transformers.pytorch_utils.Conv1D"


def _positions(module, x: Tensor, g: Tensor):
    """x as (N, T, in) in the dtype the layer ran in and G as (V, N, T, out), once for the rule
    and the backward of a fused call."""

    def compute():
        n = x.shape[0]
        return as_run(x, g).reshape(n, -1, module.nx), g.reshape(g.shape[0], n, -1, module.nf)

    return shared(("conv1d positions", id(module)), compute)


@register(CONV1D, min_dim=lambda m: 2, leading=True, affine=True)
def conv1d(module, args, kwargs, grads):
    x, g = _positions(module, args[0], grads[0])
    (v, n), out = g.shape[:2], {}
    if trainable(module, "weight"):
        jw = result_buffer("weight", (n, v, module.nx, module.nf), x)
        torch.matmul(x.transpose(1, 2).unsqueeze(1), g.transpose(0, 1), out=jw)  # (N, 1, I, T) @ (N, V, T, O)
        out["weight"] = jw
    if trainable(module, "bias"):
        out["bias"] = g.sum(2).transpose(0, 1)
    return out


def _norms_cheaper(module, args, grads) -> bool:
    return by_gram(args[0].shape[1:-1].numel(), module.nf, module.nx)


@register_norms(CONV1D, cheaper=_norms_cheaper)
def conv1d_norms(module, args, kwargs, grads):
    """||J_W[n, v]||^2 = ||sum_t G[v, n, t]^T x[n, t]||^2 (the transpose's), by Gram matrices over
    the positions where cheaper; ||J_b[n, v]||^2 = ||sum_t G[v, n, t]||^2."""
    x, g = _positions(module, args[0], grads[0])
    out = {}
    if trainable(module, "weight"):
        out["weight"] = sq_norms_of_products(g, x).T
    if trainable(module, "bias"):
        out["bias"] = sq_sums(g.sum(2), -1).T
    return out


def _many_positions(module, x: Tensor, y: Tensor) -> bool:
    return x.dim() > 2 and x.shape[1:].numel() >= 16 * module.nx


@register_backward(CONV1D, when=_many_positions, reads=("weight",))
def conv1d_backward(module, x: Tensor, g: Tensor, *, dx_wanted: bool, params: bool, per_sample=None):
    x3, g4 = _positions(module, x, g.unsqueeze(0))
    dx = (g @ as_run(module.weight, g).T) if dx_wanted else None
    grads = {}
    if params:
        if trainable(module, "weight"):
            grads["weight"] = per_sample["weight"].sum(0)[0] if per_sample else x3.flatten(0, 1).T @ g4[0].flatten(0, 1)
        if trainable(module, "bias"):
            grads["bias"] = per_sample["bias"].sum(0)[0] if per_sample else g4[0].sum((0, 1))
    return dx, grads
