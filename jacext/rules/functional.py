"""Rules for torch functions whose weight or bias is a tensor without the batch.

A parameter used outside a module call that a hand-written rule covers (timm's LayerNorm
subclass calling ``F.layer_norm(x, shape, self.weight, self.bias)``, a head tied to an
embedding, ``F.linear(h, wte.weight)``, ``h @ emb.weight.t()``) meets the batch in the function
itself (jacext.engine.meets). Where it enters as the function's weight or bias (attention's
mask) and only the function's input (query, key, value) holds the batch, the cotangents of
those arguments per sample are the layer's own rule on the function's arguments:

    F.linear(x, W, b)        J_W[n, v] = sum_t G[v, n, t]^T x[n, t],  J_b[n, v] = sum_t G[v, n, t]
    x @ W                    F.linear(x, W^T): J_W[n, v] = (sum_t G[v, n, t]^T x[n, t])^T
    F.layer_norm, rms_norm,  J_w[n, v] = sum G[v, n] * xhat[n],  J_b[n, v] = sum G[v, n]
    group_norm                 (summed over the dims that w does not have)
    F.embedding(x, W)        J_W[n, v, e] = sum_{t : x[n, t] = e} s[n, t] G[v, n, t]
    F.conv1d, 2d, 3d         J_W[n, v, o, i, k] = sum_s G[v, n, o, s] xpad[n, i, s * stride + k * dilation]
    F.scaled_dot_product_  J_M[n, v] = dS[v, n] summed as the additive mask M broadcasts, with
      attention(q, k, v, M)    dS = P * (dP - rowsum(dP * P)), P = softmax(q k^T scale + M), dP = G v^T

computed by jacext.rules.linear, .norm, .embedding, .conv and .attention (.conv on a module on the meta
device that the call's arguments configure, for the module's padding). A :class:`Function`'s
rule takes the call's arguments by name (tensors detached), its input with the samples first,
x (N, ...), the cotangents of its output, G (V, N, ...), and the names of the arguments asked
for; it returns their contractions, (N, V, *argument.shape).

Elementwise ``x + f``, ``x - f`` (``alpha`` times f) and ``x * f``, f broadcast to x (``x +
self.pos_embed``, ``x * self.gamma``): G_f[v, r] = G[v, r] (times x[r] for a product) summed
over the dims f is broadcast along, per index r of the output's batch dim (:func:`elementwise`).
"""

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jacext.rules.attention import scores_cotangent
from jacext.rules.conv import conv
from jacext.rules.embedding import lookup_jacobian
from jacext.rules.linear import linear_jacobians, positions
from jacext.rules.norm import trailing_xhat
from jacext.rules.util import affine_products

Arguments = Dict[str, Any]
FunctionRule = Callable[[Arguments, Tensor, Tensor, FrozenSet[str]], Dict[str, Tensor]]


@dataclass(frozen=True)
class Function:
    """A torch function with a rule for its weight arguments."""

    names: Tuple[str, ...]  # its arguments in order; the first (the input) holds the batch
    slots: FrozenSet[str]  # the arguments its rule differentiates
    inner: Callable[[Arguments], Optional[int]]  # how many trailing dims of the input it mixes (None: no rule)
    rule: FunctionRule
    defaults: Dict[str, Any] = field(default_factory=dict)
    leading: bool = True  # the dims before those alike: the batch may be any of them, folded with another
    batched: FrozenSet[str] = frozenset()  # other arguments that may hold the batch, at the input's dim


def bind(names: Tuple[str, ...], defaults: Dict[str, Any], args, kwargs) -> Optional[Arguments]:
    """A call's arguments by name, ``defaults`` filled in (None: not a call of the signature ``names``)."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    bound = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
    return bound if all(name in bound for name in names) else None


def _linear(a: Arguments, x: Tensor, g: Tensor, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
    return linear_jacobians(positions(x, g), "weight" in wanted, "bias" in wanted)


def _linear_inner(a: Arguments) -> Optional[int]:
    w, b = a["weight"], a["bias"]
    matrix = isinstance(w, Tensor) and w.dim() == 2  # (a vector weight drops the output's last dim)
    return 1 if matrix and (b is None or (isinstance(b, Tensor) and b.shape == w.shape[:1])) else None


def _product(other: str) -> Function:
    """``x @ W`` for a matrix W (``other``), as F.linear(x, W^T)."""

    def rule(a: Arguments, x: Tensor, g: Tensor, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        return {other: linear_jacobians(positions(x, g), True, False)["weight"].transpose(-1, -2)}

    def inner(a: Arguments) -> Optional[int]:
        w = a[other]
        return 1 if isinstance(w, Tensor) and w.dim() == 2 and a["input"].dim() >= 2 else None

    return Function(("input", other), frozenset({other}), inner, rule)


def _shape(a: Arguments) -> torch.Size:
    s = a["normalized_shape"]
    return torch.Size([s] if isinstance(s, int) else s)


def _trailing(rms: bool) -> FunctionRule:
    def rule(a: Arguments, x: Tensor, g: Tensor, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        shape = _shape(a)
        xhat = trailing_xhat(x, shape, a["eps"], rms)
        return affine_products(g, xhat, shape, False, "weight" in wanted, "bias" in wanted)

    return rule


def _group_norm(a: Arguments, x: Tensor, g: Tensor, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
    xhat = F.group_norm(x, a["num_groups"], eps=a["eps"])
    return affine_products(g, xhat, x.shape[1:2], True, "weight" in wanted, "bias" in wanted)


def _embedding(a: Arguments, x: Tensor, g: Tensor, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
    e, d = a["weight"].shape
    padding = a["padding_idx"]
    table = SimpleNamespace(
        num_embeddings=e,
        embedding_dim=d,
        padding_idx=padding + e if padding is not None and padding < 0 else padding,
        scale_grad_by_freq=a["scale_grad_by_freq"],
    )
    return {"weight": lookup_jacobian(table, x, g)}


def _conv(a: Arguments, x: Tensor, g: Tensor, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
    w = a["weight"]
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[w.dim() - 3]
    layer = cls(
        x.shape[1],
        w.shape[0],
        tuple(w.shape[2:]),
        a["stride"],
        a["padding"],
        a["dilation"],
        a["groups"],
        bias="bias" in wanted,
        device="meta",
    )
    layer.weight.requires_grad_("weight" in wanted)
    return conv(layer, (x,), {}, [g])


def _batched_conv(a: Arguments) -> Optional[int]:
    w = a["weight"]
    return a["input"].dim() - 1 if isinstance(w, Tensor) and 3 <= w.dim() == a["input"].dim() <= 5 else None


def _attention(a: Arguments, x: Tensor, g: Tensor, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
    k, v, mask = a["key"], a["value"], a["attn_mask"]
    scale = x.shape[-1] ** -0.5 if a["scale"] is None else a["scale"]
    p = torch.softmax((x * scale) @ k.transpose(-2, -1) + mask, -1)
    ds = scores_cotangent(p, g @ v.transpose(-2, -1))  # (V, N, ..., L, S)
    return {"attn_mask": broadcast_sums(ds, mask.shape, 0)}


def _additive_mask(a: Arguments) -> Optional[int]:
    """2 (L, E) where the rule applies: an additive mask without an entry per sample, no
    dropout, no causal mask, no grouped heads."""
    q, m = a["query"], a["attn_mask"]
    plain = a["dropout_p"] == 0 and not a["is_causal"] and not a["enable_gqa"] and q.dim() >= 3
    additive = isinstance(m, Tensor) and m.is_floating_point() and (m.dim() < q.dim() or m.shape[0] == 1)
    return 2 if plain and additive else None


_NORM = frozenset({"weight", "bias"})
FUNCTIONS: Dict[str, Function] = {
    "linear": Function(("input", "weight", "bias"), _NORM, _linear_inner, _linear, {"bias": None}),
    "matmul": _product("other"),
    "mm": _product("mat2"),
    "layer_norm": Function(
        ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable"),
        _NORM,
        lambda a: len(_shape(a)),
        _trailing(rms=False),
        {"weight": None, "bias": None, "eps": 1e-5, "cudnn_enable": True},
    ),
    "rms_norm": Function(
        ("input", "normalized_shape", "weight", "eps"),
        frozenset({"weight"}),
        lambda a: len(_shape(a)),
        _trailing(rms=True),
        {"weight": None, "eps": None},
    ),
    "group_norm": Function(
        ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled"),
        _NORM,
        lambda a: a["input"].dim() - 1 if a["input"].dim() >= 2 else None,
        _group_norm,
        {"weight": None, "bias": None, "eps": 1e-5, "cudnn_enabled": True},
        leading=False,
    ),
    "embedding": Function(
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        frozenset({"weight"}),
        lambda a: 0,
        _embedding,
        {"padding_idx": None, "max_norm": None, "norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False},
    ),
    **{
        f"conv{d}d": Function(
            ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
            _NORM,
            _batched_conv,
            _conv,
            {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
            leading=False,
        )
        for d in (1, 2, 3)
    },
    "scaled_dot_product_attention": Function(
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        frozenset({"attn_mask"}),
        _additive_mask,
        _attention,
        {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False},
        leading=False,
        batched=frozenset({"key", "value"}),
    ),
}  # by name, as the meets know operations (jacext.engine.meets.op_name)

ELEMENTWISE = {"add", "sub", "mul"}  # (input, other, alpha=1)


def elementwise(name: str, args: Arguments, free: str, g: Tensor, d: int) -> Tensor:
    """G_f (R, V, *f.shape) of ``name``'s argument ``free`` (f, broadcast to the output without
    an entry per sample: size 1 or absent at the output's batch dim ``d``), per index r along
    ``d``, for G (V, *out)."""
    f = args[free]
    if name == "mul":
        h = g * args["other" if free == "input" else "input"]
    else:
        c = 1 if free == "input" else (-1 if name == "sub" else 1) * args["alpha"]
        h = g if c == 1 else g * c
    return broadcast_sums(h, f.shape, d)


def broadcast_sums(h: Tensor, shape, d: int) -> Tensor:
    """h (V, *out) summed over the dims along which a tensor of ``shape`` (without an entry per
    sample: size 1 or absent at out's dim ``d``) broadcasts to out, per index r along ``d``:
    (R, V, *shape)."""
    m = h.dim() - 1
    aligned = (1,) * (m - len(shape)) + tuple(shape)  # the shape aligned with the output's
    summed = [1 + j for j in range(m) if j != d and aligned[j] == 1 and h.shape[1 + j] != 1]
    if summed:
        h = h.sum(summed, keepdim=True)
    return h.movedim(1 + d, 0).reshape(h.shape[1 + d], h.shape[0], *shape)
