"""Embedding: y[n, t] = W[x[n, t]]; EmbeddingBag: y[n] = sum, mean or max of the rows W[x[i]] of bag n.

Both rules scatter G into the rows of W that sample n looked up. Every entry i
(index x[i], sample n(i)) carries a coefficient

    s[i] = 0 if x[i] = padding_idx, else 1 / count(x[i]) with scale_grad_by_freq, else 1

where count(e) is the number of occurrences of e in the module's whole input,
all samples together. That is torch's batch-level definition: its backward
divides by counts over the batch, so with ``scale_grad_by_freq`` a sample's
Jacobian depends on the other samples' indices, and the per-sample Jacobians
sum to torch's gradient of the batch.

Embedding (sample n holds the entries x[n, t]):

    J_W[n, v, e] = sum_{t : x[n, t] = e} s[n, t] G[v, n, t]

Its squared norms (BatchL2Grad, dp.ClipGrad) sum these rows per distinct pair (n, e) and
square them, without forming J_W: ||J_W[n, v]||^2 = sum_e ||J_W[n, v, e]||^2.

EmbeddingBag: sample n is bag n, row n of a 2-D input or
``input[offsets[n] : offsets[n + 1]]`` of a 1-D input (with
``include_last_offset`` the last offset is ignored and the last bag runs to the
end of the input, as torch's kernel does). Entries at padding_idx are dropped
from their bag, also from the mean's count |bag n|. For sum and mean, with
c[i] = per_sample_weights[i] (sum), 1 / |bag n| (mean) or 1 (sum without weights):

    y[n] = sum_{i in bag n} c[i] W[x[i]]  =>  J_W[n, v, e] = sum_{i in bag n : x[i] = e} c[i] s[i] G[v, n]

For max, y[n, d] = W[r, d] with r = r(n, d) the row of bag n holding the
maximum, the first in the bag where several do, as torch's kernels choose
(recomputed from W and the indices when the backward runs, so W must
not be changed in between), so J_W[n, v, r(n, d), d] = G[v, n, d]
and zero elsewhere; empty bags give y[n] = 0 and J = 0. torch refuses
scale_grad_by_freq and per_sample_weights with max.

``max_norm`` renormalises W in place without gradient before the lookup, so the
rules are unchanged (the max is taken over the renormalised W).

Embedding's gradient summed over the batch is torch's own (``embedding_backward``), registered
for jacext.fused (ClipGrad's clipped sums).
"""

import torch
from torch import Tensor, nn

from jacext.rules import register, register_backward, register_norms, trainable
from jacext.rules.util import for_squares, index_add_result, sq_sums


@register(nn.EmbeddingBag, min_dim=lambda m: 1)
@register(nn.Embedding, min_dim=lambda m: 1, leading=True)  # a lookup per entry: every dim alike
def embedding(module, args, kwargs, grads):
    (g,) = grads
    if not trainable(module, "weight"):
        return {}
    if isinstance(module, nn.EmbeddingBag):
        return {"weight": _embedding_bag(module, args, kwargs, g)}
    return {"weight": lookup_jacobian(module, args[0], g)}


def lookup_jacobian(table, x: Tensor, g: Tensor) -> Tensor:
    """J_W (N, V, E, D) of y = W[x] for indices x (N, ...) and G (V, N, ..., D); ``table`` has
    the lookup's ``num_embeddings``, ``embedding_dim``, ``padding_idx`` (non-negative or None)
    and ``scale_grad_by_freq`` (an nn.Embedding, or the arguments of F.embedding)."""
    v, n = g.shape[:2]
    idx = x.reshape(-1).long()
    sample = torch.arange(n, device=idx.device).repeat_interleave(x.shape[1:].numel())
    src = g.reshape(v, -1, table.embedding_dim).transpose(0, 1)  # (L, V, D)
    return _scatter_rows(table, n, sample, idx, _scaled(table, idx, src))


@register_norms(nn.Embedding)
def embedding_norms(module, args, kwargs, grads):
    """||J_W[n, v]||^2 = sum_e ||R[n, v, e]||^2, R[n, v, e] = sum_{t : x[n, t] = e} s[n, t] G[v, n, t].

    The rows R are summed first, one per distinct pair (n, x[n, t]) (at most N T of them, found
    by sorting), and then squared; the (N, V, E, D) Jacobian is never formed. Expanding the
    square into sum_{t, u} s[n, t] s[n, u] G[v, n, t] . G[v, n, u] instead would lose, in
    float32, the norm of rows of a repeated index that nearly cancel.
    """
    (g,) = grads
    if not trainable(module, "weight"):
        return {}
    x = args[0]
    v, n = g.shape[:2]
    idx = x.reshape(-1).long()
    sample = torch.arange(n, device=idx.device).repeat_interleave(x.shape[1:].numel())
    src = for_squares(_scaled(module, idx, g.reshape(v, -1, module.embedding_dim).transpose(0, 1)))  # (L, V, D)
    slot, owner = _distinct_pairs(sample, idx, module.num_embeddings)
    rows = torch.zeros_like(src).index_add_(0, slot, src)  # R: row slot[i] sums the entries of i's pair
    sq = sq_sums(rows, -1)  # (L, V); zero in the slots no pair uses
    return {"weight": sq.new_zeros(n, v).index_add_(0, owner, sq)}


@register_backward(nn.Embedding)
def embedding_backward(module, x, g, *, dx_wanted: bool, params: bool, per_sample=None):
    if not (params and trainable(module, "weight")):
        return None, {}
    padding = -1 if module.padding_idx is None else module.padding_idx
    grad = torch.ops.aten.embedding_backward(
        g, x, module.num_embeddings, padding, module.scale_grad_by_freq, module.sparse
    )
    return None, {"weight": grad}


def _embedding_bag(module, args, kwargs, g):
    x = args[0] if args else kwargs["input"]
    offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
    weights = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
    v, n, d = g.shape
    idx = x.reshape(-1).long()
    if offsets is None:  # (N, B): row n is bag n
        sample = torch.arange(n, device=idx.device).repeat_interleave(x.shape[1])
    else:
        starts = offsets[:-1] if module.include_last_offset else offsets
        sample = torch.bucketize(torch.arange(idx.numel(), device=idx.device), starts.long(), right=True) - 1
    keep = _kept(module, idx)
    if module.mode == "max":
        return _max_rows(module, n, sample, idx, keep, g)
    coef = _coefficients(module, idx, keep, g.dtype)
    if weights is not None:
        coef = coef * weights.reshape(-1)
    if module.mode == "mean":
        size = g.new_zeros(n).index_add_(0, sample, keep.to(g.dtype))
        coef = coef / size.clamp(min=1)[sample]
    src = g.transpose(0, 1)[sample] * coef[:, None, None]  # (L, V, D)
    return _scatter_rows(module, n, sample, idx, src)


def _kept(module, idx):
    """Entries that are not padding_idx."""
    if module.padding_idx is None:
        return torch.ones_like(idx, dtype=torch.bool)
    return idx != module.padding_idx


def _scaled(module, idx, src):
    """src[i] (L, V, D) times its entry's coefficient s[i]; src itself where every s[i] is 1."""
    if module.padding_idx is None and not module.scale_grad_by_freq:
        return src
    return src * _coefficients(module, idx, _kept(module, idx), src.dtype)[:, None, None]


def _coefficients(module, idx, keep, dtype):
    """s[i]: 0 at padding_idx, else 1 / (count of idx[i] in the whole input) with scale_grad_by_freq, else 1."""
    s = keep.to(dtype)
    if module.scale_grad_by_freq:
        s = s / torch.bincount(idx, minlength=module.num_embeddings)[idx]
    return s


def _distinct_pairs(sample, idx, e):
    """Per entry i, the slot (in [0, L)) of its pair (sample[i], idx[i]), equal for equal pairs;
    per slot, the sample that owns it (0 for unused slots). Sorting, not unique: no host sync."""
    key, order = (sample * e + idx).sort()
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    seg = first.cumsum(0) - 1  # slot of each sorted entry
    slot = torch.empty_like(seg).scatter_(0, order, seg)
    owner = torch.zeros_like(seg).scatter_(0, seg, key // e)
    return slot, owner


def _scatter_rows(module, n, sample, idx, src):
    """J[n, v, e] = sum_{i : sample[i] = n, idx[i] = e} src[i, v], of shape (N, V, E, D)."""
    _, v, d = src.shape
    e = module.num_embeddings
    slot = (sample[:, None] * v + torch.arange(v, device=idx.device)) * e + idx[:, None]  # (L, V)
    return index_add_result("weight", (n * v * e, d), slot.reshape(-1), src.reshape(-1, d)).view(n, v, e, d)


def _max_rows(module, n, sample, idx, keep, g):
    """J[n, v, r(n, d), d] = G[v, n, d] with r(n, d) the row of bag n holding the maximum of column d."""
    v, _, d = g.shape
    vals = module.weight.detach()[idx].masked_fill(~keep[:, None], float("-inf"))  # (L, D)
    bag = sample[:, None].expand(-1, d)
    top = vals.new_full((n, d), float("-inf")).scatter_reduce_(0, bag, vals, "amax")
    # one row per (bag, column): of the bag's entries holding the maximum, the first, as torch's
    # kernels take it (ties: rows renormalised to max_norm); -1 for empty bags
    at = torch.arange(len(idx), device=idx.device)[:, None].expand(-1, d)
    hit = torch.where((vals == top[sample]) & keep[:, None], at, len(idx))
    first = torch.full((n, d), len(idx), device=idx.device).scatter_reduce_(0, bag, hit, "amin")
    rows = torch.cat([idx, idx.new_full((1,), -1)])[first]
    src = g.transpose(0, 1) * (rows >= 0)[:, None, :]  # (N, V, D)
    jw = g.new_zeros(n, v, module.num_embeddings, d)
    return jw.scatter_(2, rows.clamp(min=0)[:, None, None, :].expand(n, v, 1, d), src[:, :, None, :])
