"""BatchNorm1d/2d/3d in eval mode: y = xhat * w + b, xhat = (x - running_mean) / sqrt(running_var + eps).

    J_w[n, v, c] = sum_s G[v, n, c, s] xhat[n, c, s],   J_b[n, v, c] = sum_s G[v, n, c, s]

In train mode (or without running statistics) each output depends on the whole
batch through the batch statistics, so per-sample quantities are not defined by
a local rule; jacext refuses rather than return per-sample contributions.
"""

from torch import nn

from jacext.errors import JacextError
from jacext.rules import register
from jacext.rules.util import affine_jacobians, require_batch_dim, running_stats_xhat


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
    xhat = running_stats_xhat(module, x)
    return affine_jacobians(module, g, xhat, channel_dim=True)
