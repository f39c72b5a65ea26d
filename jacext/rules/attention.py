"""MultiheadAttention, every option but dropout in train mode: one batched VJP of the core, Linear contractions.

Per sample (batch first; head h of H uses columns h d .. (h + 1) d, d = E / H):

    q = x_q W_q^T + b_q,   k = [x_k W_k^T + b_k; bias_k; 0],   v = [x_v W_v^T + b_v; bias_v; 0]
    P = softmax(q k^T / sqrt(d) + M) per head,   a = P v,   y = a W_o^T + b_o

with the rows bias_k, bias_v where ``add_bias_kv``, the zero rows where ``add_zero_attn``, and M
the additive mask of ``attn_mask`` (2-d, or 3-d per sample and head), ``key_padding_mask`` and
``is_causal`` as torch applies them. The core (q, k, v) -> a has no parameters and keeps the
samples apart, so one batched VJP, written out, gives the cotangents at its inputs for all seeds:

    G_a = G_y W_o,   dP = G_a v^T (+ G of the returned weights),   G_v = P^T G_a,
    dS = P * (dP - rowsum(dP * P)),   G_q = dS k / sqrt(d),   G_k = dS^T q / sqrt(d)

and every parameter's J is a Linear contraction (jacext.rules.linear.weight_products):
J_{W_o} = sum_t G_y[t]^T a[t], J_{W_q} = sum_t G_q[t]^T x_q[t] (W_k, W_v alike; in_proj_weight
stacks the three, one product where query, key and value are one tensor), J_b = sum_t G[t],
J_{bias_k} = G_k at its row. The norm rule sums the squared norms of the same products (Gram
matrices over the positions, jacext.rules.util.sq_norms_of_products).

Its own backward gives the input gradients G_q W_q, G_k W_k, G_v W_v (one product for
self-attention) and those of float masks that require one (dS summed as the mask broadcasts),
so that ClipGrad and BatchGrad fuse its calls (jacext.engine.fused) where the attention weights
need no gradient (``need_weights=False``, as nn.TransformerEncoderLayer calls it). Dropout on the attention
weights in train mode draws a mask inside the attention kernel that jacext cannot replay:
refused as the forward records it.
"""

import inspect
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacext.errors import JacextError
from jacext.rules import register, register_backward, register_norms, register_policy, trainable
from jacext.rules.linear import weight_products
from jacext.rules.util import as_run, result_buffer, shared, sq_norms_of_products, sq_sums
from jacext.state import module_label

T = TypeVar("T", Tensor, Optional[Tensor])

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@dataclass
class _Call:
    """One call, batch first: inputs x_q (N, L, E_q), x_k, x_v (N, S, E_k/E_v) and the additive mask."""

    query: Tensor  # as called (the identity of the inputs decides their gradients)
    key: Tensor
    value: Tensor
    xq: Tensor
    xk: Tensor
    xv: Tensor
    attn_mask: Optional[Tensor]  # as called, where it enters M (not under the is_causal shortcut)
    key_padding_mask: Optional[Tensor]
    mask: Optional[Tensor]  # M, broadcasting to (N, H, L, S')
    average: bool  # the returned weights are the mean over the heads


def _call(module: nn.MultiheadAttention, args, kwargs) -> _Call:
    c = _SIGNATURE.bind(module, *args, **kwargs)
    c.apply_defaults()
    a = c.arguments
    query, key, value = a["query"], a["key"], a["value"]
    xq, xk, xv = (t if module.batch_first else t.transpose(0, 1) for t in (query, key, value))
    (n, t, _), s = xq.shape, xk.shape[1]
    extra = (module.bias_k is not None) + module.add_zero_attn  # key rows beyond the S of the call
    kpm = F._canonical_mask(
        mask=a["key_padding_mask"],
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(a["attn_mask"]),
        other_name="attn_mask",
        target_type=xq.dtype,
    )
    attn_mask = a["attn_mask"]
    if a["is_causal"] and kpm is None and not a["need_weights"]:  # torch's shortcut: causal, attn_mask unused
        future = torch.ones(t, s + extra, dtype=torch.bool, device=xq.device).triu(1)
        mask: Optional[Tensor] = xq.new_zeros(t, s + extra).masked_fill_(future, float("-inf"))
        attn_mask = None
    else:
        mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=xq.dtype,
            check_other=False,
        )
        if mask is not None:
            mask = F.pad(mask.view(n, module.num_heads, t, s) if mask.dim() == 3 else mask, (0, extra))
        if kpm is not None:
            kpm_rows = F.pad(kpm, (0, extra)).view(n, 1, 1, s + extra)
            mask = kpm_rows if mask is None else mask + kpm_rows
    return _Call(query, key, value, xq, xk, xv, attn_mask, a["key_padding_mask"], mask, a["average_attn_weights"])


def _projections(module: nn.MultiheadAttention) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """[W_q, W_k, W_v] and [b_q, b_k, b_v]."""
    if module._qkv_same_embed_dim:
        weights = list(module.in_proj_weight.chunk(3))
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
    b = module.in_proj_bias
    return weights, list(b.chunk(3)) if b is not None else [None] * 3


def _same(a: Tensor, b: Tensor) -> bool:
    """The same values: one tensor, or views of the same memory alike (the record's detached inputs)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


@dataclass
class _Pulled:
    """The core's forward (a, P, and q, k, v per head) and the cotangents (V, N, T, E) of a call."""

    a: Tensor
    gy: Tensor
    gq: Tensor
    gk: Tensor
    gv: Tensor
    gbk: Optional[Tensor]  # (V, N, E) at the bias_k / bias_v rows
    gbv: Optional[Tensor]
    ds: Tensor  # (V, N, H, L, S'): the cotangent of the scores, which is the mask's


def _pull_back(module: nn.MultiheadAttention, c: _Call, grads) -> _Pulled:
    """The core recomputed and pulled back in the dtype the layer ran in, that of its output's
    cotangent (under autocast, lower than its parameters')."""
    n, _, e = c.xq.shape
    h = module.num_heads
    d = e // h

    def run(t: T) -> T:
        return t if t is None else as_run(t, grads[0])

    (wq, wk, wv), (bq, bk, bv) = _projections(module)
    xq, xk, xv = run(c.xq), run(c.xk), run(c.xv)
    if module._qkv_same_embed_dim and _same(c.xq, c.xk) and _same(c.xk, c.xv):
        q, k, v = F.linear(xq, run(module.in_proj_weight), run(module.in_proj_bias)).chunk(3, -1)
    else:
        q, k, v = F.linear(xq, run(wq), run(bq)), F.linear(xk, run(wk), run(bk)), F.linear(xv, run(wv), run(bv))
    if module.bias_k is not None and module.bias_v is not None:
        k = torch.cat([k, run(module.bias_k).expand(n, 1, e)], 1)
        v = torch.cat([v, run(module.bias_v).expand(n, 1, e)], 1)

    def heads(t: Tensor) -> Tensor:  # (..., T, E) -> (..., H, T, d)
        return t.reshape(*t.shape[:-1], h, d).transpose(-3, -2)

    q, k, v = heads(q), heads(k), heads(v)
    if module.add_zero_attn:
        k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
    scale = d**-0.5
    scores = (q * scale) @ k.transpose(-2, -1)
    p = torch.softmax(scores if c.mask is None else scores + run(c.mask), -1)  # (N, H, L, S')
    a = _merge_heads((p @ v).transpose(1, 2))  # (N, L, E)

    gy = grads[0] if module.batch_first else grads[0].transpose(1, 2)  # (V, N, L, E)
    ga = heads(gy @ run(module.out_proj.weight))  # (V, N, H, L, d)
    dp = ga @ v.transpose(-2, -1)
    gw = grads[1] if len(grads) > 1 else None  # the returned attention weights
    if gw is not None:
        dp = dp + (gw.unsqueeze(2) / h if c.average else gw)
    gv = p.transpose(-2, -1) @ ga
    ds = scores_cotangent(p, dp)
    gq = ds @ k * scale
    gk = ds.transpose(-2, -1) @ q * scale
    if module.add_zero_attn:
        gk, gv = gk[..., :-1, :], gv[..., :-1, :]
    gq, gk, gv = (_merge_heads(t.transpose(-3, -2)) for t in (gq, gk, gv))  # (V, N, T, E)
    gbk = gbv = None
    if module.bias_k is not None:
        gbk, gbv, gk, gv = gk[:, :, -1], gv[:, :, -1], gk[:, :, :-1], gv[:, :, :-1]
    return _Pulled(a, gy, gq, gk, gv, gbk, gbv, ds)


def scores_cotangent(p: Tensor, dp: Tensor) -> Tensor:
    """dS = P * (dP - rowsum(dP * P)): the cotangent of the scores S, for P = softmax(S, -1)
    and dP the cotangent of P."""
    return p * (dp - (dp * p).sum(-1, keepdim=True))


# pull-backs by the id of the cotangent they pulled back (dropped with it), then by what else they read
_PULLED: Dict[int, Dict[tuple, _Pulled]] = {}


def _pulled(module: nn.MultiheadAttention, args, kwargs, grads) -> Tuple[_Call, _Pulled]:
    """The call and its pull-back, computed once per cotangent: ClipGrad's input gradient, norms
    and clipped sums of a fused call all read the cotangent the backward caught (the clipped sums
    scale its products per sample), and a fused BatchGrad call's rule and backward share one
    (jacext.rules.util.shared). Which inputs, cotangent and parameters it read is compared by
    memory, layout and version counter: the record's and the node's tensors differ, their values not."""
    c = _call(module, args, kwargs)
    g = grads[0]
    read = (c.xq, c.xk, c.xv, g)
    # not kept: with the attention weights' cotangent too; or under a batched pull-back's vmap
    # (batchnorm="exact"), whose batched cotangent has no memory to compare
    if len(grads) > 1 and grads[1] is not None or not all(map(torch._C._has_storage, read)):
        return c, _pull_back(module, c, grads)
    key = (id(module), *map(_stamp, read), *(p._version for p in module.parameters()))
    root = g if g._base is None else g._base
    memo = _PULLED.get(id(root))
    if memo is None:
        memo = _PULLED[id(root)] = {}
        weakref.finalize(root, _PULLED.pop, id(root), None)
    if key not in memo:
        memo[key] = shared(("multihead attention", id(module)), lambda: _pull_back(module, c, grads))
    return c, memo[key]


# Reshapes by explicit sizes (any may be 0): the legacy vmap of a batched pull-back
# (``is_grads_batched``, batchnorm="exact") has a batching rule for reshape, none for flatten.


def _rows(t: Tensor) -> Tensor:
    """(A, B, ...) -> (A B, ...)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _merge_heads(t: Tensor) -> Tensor:
    """(..., H, d) -> (..., H d)."""
    return t.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1])


def _stamp(t: Tensor) -> tuple:
    return t.data_ptr(), t.shape, t.stride(), t._version


def _products(module: nn.MultiheadAttention, c: _Call, p: _Pulled) -> Dict[str, List[Tuple[Tensor, Tensor]]]:
    """Per trainable weight, its J as products sum_t g[t]^T x[t], (g (V, N, T, O), x (N, T, I)
    in the dtype the layer ran in), stacked along the rows in order."""
    out: Dict[str, List[Tuple[Tensor, Tensor]]] = {}
    if module._qkv_same_embed_dim:
        if trainable(module, "in_proj_weight"):
            if _same(c.xq, c.xk) and _same(c.xk, c.xv):
                out["in_proj_weight"] = [(torch.cat([p.gq, p.gk, p.gv], -1), c.xq)]
            elif _same(c.xk, c.xv):
                out["in_proj_weight"] = [(p.gq, c.xq), (torch.cat([p.gk, p.gv], -1), c.xk)]
            else:
                out["in_proj_weight"] = [(p.gq, c.xq), (p.gk, c.xk), (p.gv, c.xv)]
    else:
        for name, g, x in (("q_proj_weight", p.gq, c.xq), ("k_proj_weight", p.gk, c.xk), ("v_proj_weight", p.gv, c.xv)):
            if trainable(module, name):
                out[name] = [(g, x)]
    if trainable(module, "out_proj.weight"):
        out["out_proj.weight"] = [(p.gy, p.a)]
    return {name: [(g, as_run(x, g)) for g, x in blocks] for name, blocks in out.items()}


def _sums(module: nn.MultiheadAttention, p: _Pulled) -> Dict[str, Tensor]:
    """Per trainable bias, its J (V, N, *shape)."""
    out = {}
    if trainable(module, "in_proj_bias"):
        out["in_proj_bias"] = torch.cat([p.gq.sum(2), p.gk.sum(2), p.gv.sum(2)], -1)
    if trainable(module, "out_proj.bias"):
        out["out_proj.bias"] = p.gy.sum(2)
    for name, g in (("bias_k", p.gbk), ("bias_v", p.gbv)):
        if g is not None and trainable(module, name):
            out[name] = g.reshape(*g.shape[:-1], 1, 1, g.shape[-1])
    return out


def _refuse_dropout(module: nn.MultiheadAttention) -> None:
    if module.training and module.dropout > 0:
        raise JacextError(
            f"MultiheadAttention {module_label(module)} has dropout={module.dropout} in train mode: its mask "
            "is drawn inside the attention kernel, where jacext cannot replay it for per-sample quantities. "
            "Build it with dropout=0.0 (nn.TransformerEncoderLayer's dropout= sets it too; keep the layers' "
            "own nn.Dropout by setting layer.self_attn.dropout = 0.0), or call module.eval()."
        )


register_policy(nn.MultiheadAttention, check=_refuse_dropout, couples=lambda m: False, mode=lambda m: None)


@register(nn.MultiheadAttention, subtree=True, min_dim=lambda m: 3, batch_dim=lambda m: 0 if m.batch_first else 1)
def multihead_attention(module: nn.MultiheadAttention, args, kwargs, grads):
    c, p = _pulled(module, args, kwargs, grads)
    out = {}
    v, n = p.gy.shape[:2]
    for name, blocks in _products(module, c, p).items():
        shape = module.get_parameter(name).shape
        jw = result_buffer(name, (n, v, *shape), as_run(c.xq, p.gy))
        row = 0
        for g, x in blocks:
            weight_products(g, x, jw[:, :, row : row + g.shape[-1]])
            row += g.shape[-1]
        out[name] = jw
    out.update({name: j.transpose(0, 1) for name, j in _sums(module, p).items()})
    return out


@register_norms(nn.MultiheadAttention)
def multihead_attention_norms(module: nn.MultiheadAttention, args, kwargs, grads):
    """||J[n, v]||^2: of a stacked weight, the sum over its blocks."""
    c, p = _pulled(module, args, kwargs, grads)
    out = {}
    for name, blocks in _products(module, c, p).items():
        out[name] = torch.stack([sq_norms_of_products(g, x) for g, x in blocks]).sum(0).T
    out.update({name: sq_sums(j.flatten(2), -1).T for name, j in _sums(module, p).items()})
    return out


def _always(module, x, y) -> bool:
    """The core's backward is the rule's anyway: fused, autograd's is not run a second time."""
    return True


@register_backward(
    nn.MultiheadAttention,
    when=_always,
    reads=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"),
    every_input=True,
)
def multihead_attention_backward(
    module, args, kwargs, g: Tensor, *, dx_wanted: bool, params: bool, per_sample=None, weights=None
):
    """dx_q = G_q W_q, dx_k = G_k W_k, dx_v = G_v W_v (in the input's layout); a float mask's
    gradient is dS summed over what it broadcasts over; dp = sum_n J[n], or sum_n w_n J[n] for
    ``weights`` w (the parameters' gradients for the cotangent w_n G[n])."""
    c, p = _pulled(module, args, kwargs, [g.unsqueeze(0)])
    pairs = []
    if dx_wanted:
        layout = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
        (wq, wk, wv), _ = _projections(module)
        wq, wk, wv = (as_run(w, p.gq) for w in (wq, wk, wv))
        if module._qkv_same_embed_dim and c.query is c.key is c.value:
            w_in = as_run(module.in_proj_weight, p.gq)
            pairs.append((c.query, layout(torch.cat([p.gq[0], p.gk[0], p.gv[0]], -1) @ w_in)))
        else:
            pairs += [(c.query, layout(p.gq[0] @ wq)), (c.key, layout(p.gk[0] @ wk)), (c.value, layout(p.gv[0] @ wv))]
        s = c.xk.shape[1]
        ds = p.ds[0, ..., :s]  # (N, H, L, S): the additive mask's cotangent, rows of bias_k and zeros dropped
        if c.attn_mask is not None and c.attn_mask.requires_grad:
            pairs.append((c.attn_mask, ds.sum((0, 1)) if c.attn_mask.dim() == 2 else _rows(ds)))
        if c.key_padding_mask is not None and c.key_padding_mask.requires_grad:
            pairs.append((c.key_padding_mask, ds.sum((1, 2))))
    grads = {}
    if params:
        if per_sample is not None:
            grads = {name: j.sum(0)[0] for name, j in per_sample.items()}
        else:
            w = weights.view(-1, 1, 1) if weights is not None else None
            for name, blocks in _products(module, c, p).items():
                gs = [(gb[0] if w is None else gb[0] * w, x) for gb, x in blocks]
                grads[name] = torch.cat([_rows(gb).T @ _rows(x) for gb, x in gs])
            for name, j in _sums(module, p).items():
                grads[name] = (j[0] if w is None else j[0] * weights.view(-1, *[1] * (j.dim() - 2))).sum(0)
    return pairs, grads
