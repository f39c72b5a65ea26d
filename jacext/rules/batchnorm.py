"""BatchNorm1d/2d/3d in eval mode: y = xhat * w + b, xhat = (x - running_mean) / sqrt(running_var + eps).

    J_w[n, v, c] = sum_s G[v, n, c, s] xhat[n, c, s],   J_b[n, v, c] = sum_s G[v, n, c, s]

In train mode (or without running statistics) each output depends on the whole
batch through the batch statistics, so per-sample quantities are not defined by
a local rule; jacext refuses rather than return per-sample contributions.
"""

import torch
from torch import nn

from jacext.errors import JacextError
from jacext.rules import register, trainable
from jacext.rules.util import require_batch_dim


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batchnorm(module, args, kwargs, grads):
    x, (g,) = args[0], grads
    if module.training or module.running_mean is None:
        raise JacextError(
            f"{type(module).__name__} normalises with batch statistics (train mode or "
            "track_running_stats=False), so each sample's output depends on the whole batch and "
            "per-sample Jacobians are not separable. Put the module in eval mode (module.eval()) "
            "to use its running statistics, or use a per-sample normalisation (GroupNorm, LayerNorm)."
        )
    require_batch_dim(module, x, min_dim=2)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    v, n, c = g.shape[:3]
    g = g.reshape(v, n, c, -1)  # (V, N, C, S)
    out = {}
    if trainable(module, "weight"):
        xhat = (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
        out["weight"] = torch.einsum("vncs,ncs->nvc", g, xhat.reshape(n, c, -1))
    if trainable(module, "bias"):
        out["bias"] = g.sum(-1).transpose(0, 1)
    return out
