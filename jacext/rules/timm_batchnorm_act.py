"""timm's BatchNormAct2d: y = act(drop(z)), z = xhat * w + b, xhat = (x - mean) / sqrt(var + eps) per channel.

The cotangent of z is the VJP of the elementwise act o drop at z, recomputed from the input
(by the same F.batch_norm as the forward), then BatchNorm2d's contraction:

    G_z[v, n] = vjp(act o drop, z[n], G[v, n])
    J_w[n, v, c] = sum_s G_z[v, n, c, s] xhat[n, c, s],   J_b[n, v, c] = sum_s G_z[v, n, c, s]

BatchNorm's train-mode choice (``jacext.extend(model, batchnorm=...)``, jacext.rules.batchnorm)
applies as to BatchNorm2d. A drop layer in train mode draws a mask the recomputation would not
see: refused as the forward records it. Registered by name: jacext does not import timm.
"""

import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from jacext.errors import JacextError
from jacext.rules import register, register_policy
from jacext.rules.batchnorm import couples_samples, recording_mode, require_choice, uses_batch_statistics
from jacext.rules.util import affine_jacobians, as_run, running_stats_xhat
from jacext.state import module_label

BATCHNORM_ACT = "timm.layers.norm_act.BatchNormAct2d"


def _check(module) -> None:
    require_choice(module)
    if module.drop.training and not isinstance(module.drop, nn.Identity):
        raise JacextError(
            f"{module_label(module)} ({type(module).__name__}) runs its drop layer "
            f"({type(module.drop).__name__}) in train mode, whose random mask jacext's rule cannot "
            "recompute. Put it in eval mode (module.drop.eval()) while jacext records."
        )


register_policy(BATCHNORM_ACT, check=_check, couples=couples_samples, mode=recording_mode)


@register(BATCHNORM_ACT, min_dim=lambda m: 4)
def batchnorm_act(module, args, kwargs, grads):
    (g,) = grads
    x = as_run(args[0], g)
    _check(module)
    w = module.weight.detach() if module.weight is not None else None
    b = module.bias.detach() if module.bias is not None else None
    if uses_batch_statistics(module):  # batchnorm="exact"
        xhat = F.batch_norm(x, None, None, training=True, eps=module.eps)
        z = F.batch_norm(x, None, None, w, b, training=True, eps=module.eps)
    else:
        xhat = running_stats_xhat(module, x)
        z = F.batch_norm(x, module.running_mean, module.running_var, w, b, training=False, eps=module.eps)
    # the clone: timm's activations work in place, which torch.func refuses on its own input
    pullback = vjp(lambda t: module.act(module.drop(t.clone())), z)[1]
    (gz,) = vmap(pullback)(g)
    return affine_jacobians(module, gz, xhat, channel_dim=True)
