"""PReLU: y = max(0, x) + a * min(0, x), one slope a, or one per channel (dim 1 of the input).

J_a[n, v, c] = sum_s G[v, n, c, s] min(0, x[n, c, s])   (summed over all entries for one slope)
"""

from torch import nn

from jacext.rules import register, trainable
from jacext.rules.util import as_run


@register(nn.PReLU, min_dim=lambda m: 2 if m.num_parameters > 1 else 0, forward_ad=True)
def prelu(module, args, kwargs, grads):
    (g,) = grads
    x = as_run(args[0], g)
    if not trainable(module, "weight"):
        return {}
    v, n = g.shape[:2]
    negative = (g * x.clamp(max=0)).reshape(v, n, *x.shape[1:])
    if module.num_parameters == 1:
        ja = negative.reshape(v, n, -1).sum(-1, keepdim=True)
    else:
        ja = negative.reshape(v, n, module.num_parameters, -1).sum(-1)
    return {"weight": ja.transpose(0, 1)}
