"""MultiheadAttention, with every option: the generic per-sample VJP of its own forward.

    y = softmax((x_q W_q + b_q)(x_k W_k + b_k)^T / sqrt(d) + mask) (x_v W_v + b_v) W_o + b_o  (per head)

Sample n's contraction J[n, v] = vjp(theta -> MHA(theta, q[n], k[n], v[n], masks[n]), G[v, n])
covers in_proj_weight / q,k,v_proj_weight, in_proj_bias, bias_k, bias_v and out_proj
(whose parameters MultiheadAttention uses in its own forward, not by calling out_proj).
The batch dimension of query/key/value is 1 unless batch_first; a 3-d attn_mask of shape
(N * num_heads, L, S) is split per sample.
"""

import inspect

from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from jacext.errors import JacextError
from jacext.rules import register
from jacext.rules.generic import per_sample_vjp


@register(nn.MultiheadAttention, subtree=True, min_dim=lambda m: 3, batch_dim=lambda m: 0 if m.batch_first else 1)
def multihead_attention(module, args, kwargs, grads):
    if module.training and module.dropout > 0:
        raise JacextError(
            "MultiheadAttention with dropout > 0 in train mode draws a random mask that jacext cannot "
            "observe; use dropout=0 or eval mode for per-sample quantities."
        )
    call = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    batch = 0 if module.batch_first else 1
    dims = {id(call[name]): batch for name in ("query", "key", "value")}
    if call.get("key_padding_mask") is not None:
        dims[id(call["key_padding_mask"])] = 0
    mask = call.get("attn_mask")
    if mask is not None and mask.dim() == 3:  # (N * heads, L, S) -> (N, heads, L, S)
        call["attn_mask"] = mask = mask.unflatten(0, (-1, module.num_heads))
        dims[id(mask)] = 0

    def forward(params, a, k):
        # need_weights=True takes the explicit-softmax path, which vmap batches natively
        # (the fused kernel has no batching rule); the output leaves keep their order
        k = {**k, "need_weights": True}
        if k.get("attn_mask") is not None and k["attn_mask"].dim() == 4:
            k["attn_mask"] = k["attn_mask"].flatten(0, 1)
        return functional_call(module, params, a, k)

    names = [name for name, p in module.named_parameters() if p.requires_grad]
    flat = tree_flatten(((), dict(call)))[0]
    in_dims = [dims.get(id(t)) if isinstance(t, Tensor) else None for t in flat]
    return per_sample_vjp(module, names, (), dict(call), grads, in_dims=in_dims, out_dims=[batch, 0], forward=forward)
