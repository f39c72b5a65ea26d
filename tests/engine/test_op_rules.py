"""Layer functions whose weight or bias is a parameter used outside a module with a rule (timm's
LayerNorm subclass, a head tied to the embedding, ``h @ W``): their own rules at the meet
(jacext.rules.functional), against the loop, with N equal to the length. The generic VJP of the
meet raises in these tests, so they cannot pass on it."""

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian, overall_scale
from torch import nn

import jacext
from jacext.dp import ClipGrad
from jacext.engine.meets import Meet

N = T = 5
D, E, C = 4, 7, 3


class LayerNorm(nn.LayerNorm):  # as timm's: a subclass, without a rule of its own
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class Embedding(nn.Embedding):
    def forward(self, x):  # a negative padding index, as F.embedding accepts it
        return F.embedding(x, self.weight, self.padding_idx - self.num_embeddings, None, 2.0, self.scale_grad_by_freq)


LAYOUTS = {  # (N, T, ...) to the op's input, and the op's output back
    "batch first": (lambda h: h, lambda z: z),
    "seq first": (lambda h: h.transpose(0, 1), lambda z: z.transpose(0, 1)),
    "folded": (lambda h: h.reshape(N * T, *h.shape[2:]), lambda z: z.reshape(N, T, *z.shape[1:])),
    "folded seq first": (
        lambda h: h.transpose(0, 1).reshape(T * N, *h.shape[2:]),
        lambda z: z.reshape(T, N, *z.shape[1:]).transpose(0, 1),
    ),
}


class Net(nn.Module):
    """Tokens, a Linear, then ``op`` with a loose parameter, on the layout ``layout``, and a head."""

    def __init__(self, op, layout):
        super().__init__()
        self.op, self.layout = op, layout
        embedding = Embedding(E, D, padding_idx=E - 1, scale_grad_by_freq=True) if op == "embedding" else None
        self.tok = embedding or nn.Embedding(E, D)
        self.fc = nn.Linear(D, D)
        self.norm = {"layer_norm": LayerNorm(D), "rms_norm": RMSNorm(D), "group_norm": GroupNorm(2, D)}.get(op)
        self.bias = nn.Parameter(torch.randn(E)) if op == "linear" else None  # the root's own: used loose
        self.w = nn.Parameter(torch.randn(D, E)) if op == "matmul" else None
        self.v = nn.Parameter(torch.randn(D)) if op in {"add", "sub", "mul", "alpha"} else None
        self.s = nn.Parameter(torch.randn(())) if op == "scalar bias" else None
        self.pos = nn.Parameter(torch.randn(T, D)) if op == "position" else None
        self.cls = nn.Parameter(torch.randn(D)) if op == "cls" else None
        width = E if op in {"linear", "tied", "scaled", "matmul", "matmul_t", "flipped", "left", "scalar bias"} else D
        width = 2 * D if op == "cls" and layout.startswith("folded") else width
        self.head = nn.Linear(width, C)

    def forward(self, ids):
        there, back = LAYOUTS[self.layout]
        if self.op == "embedding":
            h = back(self.tok(there(ids)))
        else:
            h = torch.tanh(self.fc(self.tok(ids)))
            h = back(self.apply_op(there(h)))
        return self.head(torch.tanh(h)).mean(1)

    def apply_op(self, z):
        op, wte = self.op, self.tok.weight
        if op == "group_norm":  # (N, C, L)
            return self.norm(z.transpose(1, 2)).transpose(1, 2)
        if self.norm is not None:
            return self.norm(z)
        if op == "linear":
            return F.linear(z, wte, self.bias)
        if op == "tied":
            return F.linear(z, wte)
        if op == "scaled":  # a tensor computed from the parameter: its VJP through that graph
            return F.linear(z, wte * 2)
        if op == "matmul":
            return z @ self.w
        if op == "matmul_t":
            return z @ wte.t()
        if op == "add":
            return z + self.v
        if op == "sub":
            return self.v - z
        if op == "mul":
            return z * self.v
        if op == "alpha":
            return torch.add(z, self.v, alpha=0.5)
        if op == "position":  # one entry per position, the samples broadcast
            return z + (self.pos if self.layout == "batch first" else self.pos[:, None])
        if op == "cls":  # a token expanded to the batch, joined to the positions (or, folded, the features)
            if self.layout.startswith("folded"):
                return torch.cat([z, self.cls.expand(z.shape[0], D)], dim=-1)
            if self.layout == "batch first":
                return torch.cat([self.cls.expand(z.shape[0], 1, D), z], dim=1)
            return torch.cat([self.cls.expand(1, z.shape[1], D), z])
        if op == "flipped":  # samples reversed: not a fold the rules know
            return F.linear(z.flip(0), wte).flip(0)
        if op == "scalar bias":  # broadcast to the outputs
            return F.linear(z, wte, self.s)
        if op == "left":  # the parameter as the product's first factor
            return (wte @ z.transpose(-1, -2)).transpose(-1, -2)
        raise AssertionError(op)


@pytest.fixture
def generic(monkeypatch):
    """The meets that took the generic VJP (by operation); raises unless ``allowed`` names it."""
    taken, allowed = [], set()
    original = Meet._by_vjp

    def spy(self, leaf_grads, n):
        name = getattr(self.func, "__name__", str(self.func))
        taken.append(name)
        if name not in allowed:
            raise AssertionError(f"the generic VJP of {name} ran")
        return original(self, leaf_grads, n)

    monkeypatch.setattr(Meet, "_by_vjp", spy)
    return taken, allowed


class Attention(nn.Module):
    """Attention with a relative position bias as its additive mask (BEiT, Swin): a table of
    the parameter's own shape, or one looked up by offset (then ``scale`` given too)."""

    def __init__(self, indexed):
        super().__init__()
        self.indexed, self.heads = indexed, 2
        self.tok, self.qkv, self.head = nn.Embedding(E, D), nn.Linear(D, 3 * D), nn.Linear(D, C)
        self.table = nn.Parameter(torch.randn(2 * T - 1, self.heads) if indexed else torch.randn(self.heads, T, T))
        self.register_buffer("offsets", torch.arange(T)[:, None] - torch.arange(T)[None] + T - 1)

    def forward(self, ids):
        q, k, v = self.qkv(self.tok(ids)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        if self.indexed:
            mask = self.table[self.offsets].permute(2, 0, 1)[None]
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        else:
            h = F.scaled_dot_product_attention(q, k, v, self.table)
        return self.head(torch.tanh(h.transpose(1, 2).flatten(2))).mean(1)


class Conv(nn.Module):
    """A convolution's parameters used by its parent: as they are, or standardised (timm's StdConv2d)."""

    def __init__(self, d, standardised, **options):
        super().__init__()
        self.d, self.standardised, self.options = d, standardised, options
        self.inner = (nn.Conv1d, nn.Conv2d)[d - 1](4, 6, 3, **options)  # its weights, called by its parent
        self.head = nn.Linear(6 * T**d, C)

    def forward(self, x):
        w = self.inner.weight
        if self.standardised:
            mean = w.mean((1, *range(2, w.dim())), keepdim=True)
            w = (w - mean) / w.var((1, *range(2, w.dim())), keepdim=True).add(1e-5).sqrt()
        conv = (F.conv1d, F.conv2d)[self.d - 1]
        h = conv(x, w, self.inner.bias, self.inner.stride, self.inner.padding, self.inner.dilation, self.inner.groups)
        return self.head(torch.tanh(h).flatten(1))


def _check(model, dtype, x=None):
    """BatchGrad, BatchL2Grad and BatchJacobian (pull-back), BatchGrad alone (inline) and ClipGrad
    against the loops, for the input x (default: token ids)."""
    if x is None:
        x = torch.randint(0, E, (N, T))
        x[0, :2] = E - 1  # (the padding index, where the embedding has one)
    y = torch.randint(0, C, (N,))
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    grads, jacobians = loop_grad_batch(model, lossfunc, y, x), loop_jacobian(model, x)
    scale, scale_jac = overall_scale(grads), overall_scale(jacobians)
    jacext.extend(model)
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad(), jacext.BatchJacobian()):
        lossfunc(model(x), y).backward()
    assert jacext.backward_plan(model) == "pull-back"
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, grads[name], dtype, name, scale)
        assert_close(p.batch_l2, grads[name].reshape(N, -1).square().sum(1), dtype, name, scale**2)
        assert_close(p.jacobian, jacobians[name], dtype, name, scale_jac)
    with backpack(jacext.BatchGrad()):
        lossfunc(model(x), y).backward()
    assert jacext.backward_plan(model).startswith("inline")
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, grads[name], dtype, f"inline {name}", scale)
    norms = sum(g.reshape(N, -1).square().sum(1) for g in grads.values()).sqrt()
    bound = float(norms.median())
    weights = (bound / (norms + 1e-6)).clamp(max=1)
    model.zero_grad()
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():  # (the embedding's model does not use fc)
        clipped = p.grad if p.grad is not None else torch.zeros_like(p)
        assert_close(clipped, torch.einsum("n,n...->...", weights, grads[name]), dtype, f"clipped {name}", scale)


OPS = ["layer_norm", "rms_norm", "linear", "tied", "scaled", "matmul", "matmul_t", "embedding",
       "add", "sub", "mul", "alpha", "cls"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", OPS)
def test_function_rules_against_the_loop(op, layout, dtype, generic):
    torch.manual_seed(0)
    _check(Net(op, layout).to(dtype), dtype)
    assert generic[0] == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op, layout", [("group_norm", "batch first"), ("position", "batch first"),
                                        ("position", "seq first")])
def test_rules_of_other_layouts_against_the_loop(op, layout, dtype, generic):
    torch.manual_seed(0)
    _check(Net(op, layout).to(dtype), dtype)
    assert generic[0] == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d, standardised, options", [
    (1, False, {"padding": 1}),
    (2, False, {"padding": "same", "dilation": 2, "groups": 2}),
    (2, True, {"padding": 1, "bias": False}),
])
def test_convolution_rules_against_the_loop(d, standardised, options, dtype, generic):
    torch.manual_seed(0)
    model = Conv(d, standardised, **options).to(dtype)
    _check(model, dtype, torch.randn(N, 4, *[T] * d, dtype=dtype))
    assert generic[0] == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("indexed", [False, True])
def test_attention_mask_rule_against_the_loop(indexed, dtype, generic):
    torch.manual_seed(0)
    _check(Attention(indexed).to(dtype), dtype)
    assert generic[0] == []


@pytest.mark.parametrize("op, generic_at", [("flipped", "linear"), ("left", "matmul"), ("scalar bias", "linear")])
def test_calls_the_rules_do_not_cover_take_the_generic_vjp(op, generic_at, generic):
    """Samples in another order than a fold's; the parameter as the first factor of a product; a
    scalar as F.linear's bias."""
    taken, allowed = generic
    allowed.add(generic_at)
    torch.manual_seed(0)
    _check(Net(op, "batch first").double(), torch.float64)
    assert set(taken) == {generic_at}
