"""The building blocks of the fuzz tests: modules, hypothesis strategies for random models, and
the helpers that run them against the autograd loops of ``tests/reference.py``.

Blocks (``BLOCKS``): Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, BatchNorm1d/2d/3d (eval),
LayerNorm and RMSNorm over the last one to three dims, GroupNorm, InstanceNorm1d/2d/3d, PReLU,
Bilinear, MultiheadAttention, RNN/LSTM/GRU and their cells, custom modules served by the generic
rule, activations, pooling, reshapes, residual additions, modules called twice, tied weights and
unused parameters. Model strategies put a stem, random blocks and a head together, on float inputs
(vectors, sequences, 1-, 2- and 3-d images) or tokens (Embedding, EmbeddingBag).
"""

import copy
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from reference import (
    assert_close,
    loop_grad_batch,
    loop_jacobian,
    overall_scale,
    squared_norms,
    tolerances,
    trainable,
)
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import jacext

MAX_N = 3  # largest batch size
MAX_SIDE = 5  # largest length of a spatial or sequence dimension a block produces
MAX_SIDE_3D = 3  # the same in 3-d images
MAX_WIDTH = 4  # largest number of channels or features a block produces
MAX_OUTPUTS = 8  # largest number of output coordinates per sample (the oracle's cost)
DTYPES = st.sampled_from([torch.float64, torch.float32])
SEEDS = st.integers(0, 2**16)
# eps of the normalisations: with torch's 1e-5, float32 rounding in groups of (nearly) equal values
# (repeated tokens) is amplified by 1 / sqrt(eps) beyond the oracle's float32 tolerance
EPS = st.sampled_from([1e-3, 0.1])
# the devices to run on: CUDA where available (the CUDA cases skip without it)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
FUZZ = bool(os.environ.get("JACEXT_FUZZ"))
REDUCTIONS = st.sampled_from(["mean", "sum"])
# the extensions of a second backward pass, in any order (BatchL2Grad without BatchGrad: norm rules)
SECOND = st.permutations([jacext.BatchJacobian, jacext.BatchGrad, jacext.BatchL2Grad]).flatmap(
    lambda order: st.integers(1, 3).map(lambda k: tuple(order[:k]))
)
# warnings of torch the random models may trigger (oneDNN on the CPU, cuDNN after a deepcopy)
WARNINGS = [
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning"),
    pytest.mark.filterwarnings("ignore:RNN module weights are not part of single contiguous chunk:UserWarning"),
]


def examples(bounded):
    """At most ``bounded`` examples in the ``ci`` profile (``make test``), the profile's number
    with JACEXT_FUZZ=1 (``make fuzz``)."""
    return settings() if FUZZ else settings(max_examples=bounded)


# ---------------------------------------------------------------- modules the strategies assemble


class Swap(nn.Module):
    """x.transpose(1, 2): channels <-> positions. Copied to contiguous memory where the dims after
    the two are all of size 1: those strides also pass for channels last, and torch's CPU
    batch_norm backward then misreads a contiguous cotangent, so the autograd loop of a BatchNorm
    next would be wrong (tests/rules/test_batchnorm.py, channels_last_compatible_strides)."""

    def forward(self, x):
        x = x.transpose(1, 2)
        return x.contiguous() if x.dim() > 3 and math.prod(x.shape[3:]) == 1 else x


class Mean(nn.Module):
    """The average over dimension 1."""

    def forward(self, x):
        return x.mean(1)


class Squeeze(nn.Module):
    """(N, 1) -> (N,): a scalar output per sample."""

    def forward(self, x):
        return x.squeeze(-1)


class Residual(nn.Module):
    """x + inner(x)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


class Spare(nn.Module):
    """Owns a Linear that its forward never calls: its parameters get zeros."""

    def __init__(self, width):
        super().__init__()
        self.unused = nn.Linear(width, width)

    def forward(self, x):
        return x


class Twice(nn.Module):
    """One module called twice: inner(tanh(inner(x)))."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.tanh(self.inner(x)))


class Tied(nn.Module):
    """Two Linear layers sharing one weight, each with its own bias: second(tanh(first(x)))."""

    def __init__(self, width, bias):
        super().__init__()
        self.first, self.second = nn.Linear(width, width, bias=bias), nn.Linear(width, width, bias=bias)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class Pair(nn.Module):
    """Bilinear of x and tanh of its first in2_features features."""

    def __init__(self, bilinear):
        super().__init__()
        self.bilinear = bilinear

    def forward(self, x):
        return self.bilinear(x, torch.tanh(x[..., : self.bilinear.in2_features]))


class Squared(nn.Module):
    """Not quasi-linear (the generic rule serves it): y = x (W * W)^T + sin(b) over the last dim."""

    def __init__(self, inp, out):
        super().__init__()
        self.W = nn.Parameter(torch.randn(out, inp))
        self.b = nn.Parameter(torch.randn(out))

    def forward(self, x):
        return x @ (self.W * self.W).T + torch.sin(self.b)


class Gate(nn.Module):
    """Elementwise over the last dim, with a buffer (generic rule): y = x sigmoid(a) + c (x - shift)^2."""

    def __init__(self, width):
        super().__init__()
        self.a, self.c = nn.Parameter(torch.randn(width)), nn.Parameter(torch.randn(width))
        self.register_buffer("shift", torch.randn(width))

    def forward(self, x):
        return x * torch.sigmoid(self.a) + self.c * (x - self.shift) ** 2


class Lookup(nn.Module):
    """Generic rule, called with a tensor shared by all samples: y = x * w + tanh(x table^T) table."""

    def __init__(self, width):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width))

    def forward(self, x, table):
        return x * self.w + torch.tanh(x @ table.T) @ table


class WithTable(nn.Module):
    """Holds the table (a buffer of MAX_N + 1 rows, so that its first dim is never the batch
    size: test_generic_rule_with_a_shared_argument_whose_first_dim_is_n) and calls a Lookup."""

    def __init__(self, width):
        super().__init__()
        self.lookup = Lookup(width)
        self.register_buffer("table", torch.randn(MAX_N + 1, width))

    def forward(self, x):
        return self.lookup(x, self.table)


class Scaled(nn.Module):
    """A 0-dim parameter of its own (generic rule) around a child with a rule: alpha * tanh(child(x))."""

    def __init__(self, child):
        super().__init__()
        self.child = child
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.alpha * torch.tanh(self.child(x))


class Attend(nn.Module):
    """MultiheadAttention on (N, L, E), returning (N, L, E) or, with need_weights, the attention
    weights appended along the last dim.

    cross: key and value are the reversed sequence cut to kdim and vdim features. mask: None,
    "causal" (bool (L, S)), "padding" (a key_padding_mask from the data, the first key never
    masked) or "per_sample" (a differentiable float attn_mask (N * heads, L, S) from the data).
    """

    def __init__(self, mha, cross, mask, need_weights, average):
        super().__init__()
        self.mha, self.cross, self.mask, self.need_weights, self.average = mha, cross, mask, need_weights, average

    def extra_repr(self):
        return f"cross={self.cross}, mask={self.mask!r}, need_weights={self.need_weights}, average={self.average}"

    def forward(self, x):
        key, value = (x.flip(1)[..., : self.mha.kdim], x.flip(1)[..., : self.mha.vdim]) if self.cross else (x, x)
        call = dict(need_weights=self.need_weights, average_attn_weights=self.average)
        if self.mask == "causal":
            call["attn_mask"] = torch.ones(x.shape[1], key.shape[1], dtype=torch.bool, device=x.device).triu(1)
        elif self.mask == "padding":
            first = torch.zeros_like(key[:, :1, 0], dtype=torch.bool)
            call["key_padding_mask"] = torch.cat([first, key[:, 1:, 0] > 0.5], 1)
        elif self.mask == "per_sample":
            mask = -F.softplus(x[..., :1] - key[..., :1].transpose(1, 2))
            call["attn_mask"] = mask.repeat_interleave(self.mha.num_heads, 0)
        if not self.mha.batch_first:
            x, key, value = x.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self.mha(x, key, value, **call)
        out = out if self.mha.batch_first else out.transpose(0, 1)
        if weights is None:
            return out
        if weights.dim() == 4:  # per head: (N, H, L, S) -> (N, L, H * S)
            weights = weights.transpose(1, 2).flatten(2)
        return torch.cat([out, weights], -1)


class Recurrent(nn.Module):
    """RNN, LSTM or GRU on (N, T, F), returning the output sequence (N, T, directions * H).

    packed: sample n's length is its number of steps with x[n, t, 0] > -0.5 (at least 1); the
    sequence is packed (unsorted) and padded back to T. state: initial states from the data,
    h0 = tanh(x[:, 0, 0]) and c0 = tanh(x[:, -1, 0]) broadcast (expanded, not contiguous).
    """

    def __init__(self, rnn, packed, state):
        super().__init__()
        self.rnn, self.packed, self.state = rnn, packed, state

    def extra_repr(self):
        return f"packed={self.packed}, state={self.state}"

    def initial_state(self, x):
        rnn = self.rnn
        layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
        h0 = torch.tanh(x[:, 0, 0])[None, :, None].expand(layers, -1, rnn.proj_size or rnn.hidden_size)
        if isinstance(rnn, nn.LSTM):
            return h0, torch.tanh(x[:, -1, 0])[None, :, None].expand(layers, -1, rnn.hidden_size)
        return h0

    def forward(self, x):
        hx = self.initial_state(x) if self.state else None
        if self.packed:
            lengths = (x[..., 0] > -0.5).sum(1).clamp(min=1).cpu()
            out, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False), hx)
            return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
        out, _ = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1), hx)
        return out if self.rnn.batch_first else out.transpose(0, 1)


class Unrolled(nn.Module):
    """A cell applied ``steps`` times to the same input, the hidden states concatenated."""

    def __init__(self, cell, steps):
        super().__init__()
        self.cell, self.steps = cell, steps

    def extra_repr(self):
        return f"steps={self.steps}"

    def forward(self, x):
        state, outs = None, []
        for _ in range(self.steps):
            state = self.cell(x, state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.cat(outs, -1)


class Bag(nn.Module):
    """EmbeddingBag on tokens (N, B). form "2d": row n is bag n; "offsets" and "last_offset": the
    1-D input of every sample's tokens >= 0 with offsets (token -1 is absent, so bags may be empty).
    weighted: per_sample_weights cos(token) (mode "sum")."""

    def __init__(self, bag, form, weighted):
        super().__init__()
        self.bag, self.form, self.weighted = bag, form, weighted

    def extra_repr(self):
        return f"form={self.form!r}, weighted={self.weighted}"

    def forward(self, x):
        offsets = None
        if self.form != "2d":
            keep = x >= 0
            counts = keep.sum(1)
            x, offsets = x[keep], torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            offsets = offsets if self.bag.include_last_offset else offsets[:-1]
        weights = torch.cos(x.to(self.bag.weight.dtype)) if self.weighted else None
        return self.bag(x, offsets, weights)


# ---------------------------------------------------------------- strategies: one block at a time


def out_shape(module, shape, tokens=False):
    """The per-sample output shape of ``module`` for per-sample input shape ``shape``."""
    x = torch.zeros(1, *shape, dtype=torch.long) if tokens else torch.zeros(1, *shape)
    with torch.no_grad():
        return tuple(module(x).shape[1:])


def divisors(c):
    return [g for g in range(1, c + 1) if c % g == 0]


def pad_ok(mode, pad, size):
    """Whether torch pads a dim of length ``size`` by ``pad`` on a side in padding ``mode``."""
    return {"reflect": pad < size, "circular": pad <= size}.get(mode, True)


def side_cap(shape):
    """The longest spatial dim a block may produce on per-sample input ``shape``: MAX_SIDE, or
    MAX_SIDE_3D for 3-d images (three such dims multiply)."""
    return MAX_SIDE_3D if len(shape) == 4 else MAX_SIDE


def conv_options(size, mode, cap=MAX_SIDE):
    """(kernel, stride, dilation, padding) along one dim of length ``size``, padded in ``mode``,
    with an output of length at least 1 and at most ``cap`` or ``size``."""
    return [
        (k, s, d, p)
        for p in range(3) for k in (1, 2, 3) for s in (1, 2) for d in (1, 2)
        if pad_ok(mode, p, size) and d * (k - 1) < size + 2 * p
        and (size + 2 * p - d * (k - 1) - 1) // s < max(cap, size)
    ]


def same_options(size, mode):
    """(kernel, dilation) for padding="same" along one dim of length ``size``, padded in ``mode``
    (the right side gets the larger half)."""
    return [(k, d) for k in (1, 2, 3) for d in (1, 2) if pad_ok(mode, d * (k - 1) - d * (k - 1) // 2, size)]


def conv_transpose_options(size, cap=MAX_SIDE):
    """(kernel, stride, dilation, padding, output_padding) along one dim of length ``size`` with
    an output of length at least 1 and at most ``cap`` or ``size``."""
    return [
        (k, s, d, p, o)
        for p in range(3) for k in (1, 2, 3) for s in (1, 2) for d in (1, 2) for o in range(max(s, d))
        if 1 <= (size - 1) * s - 2 * p + d * (k - 1) + o + 1 <= max(cap, size)
    ]


def channels(draw, cin, same):
    """Output channels and groups of a convolution: groups divide both."""
    groups = draw(st.sampled_from(divisors(cin)))
    cout = cin if same else groups * draw(st.integers(1, max(1, MAX_WIDTH // groups)))
    return cout, groups


@st.composite
def conv(draw, shape, same):
    """Conv1d/2d/3d with per-dim kernel, stride, dilation and padding (int, "same", "valid"), any padding_mode."""
    d, cap = len(shape) - 1, side_cap(shape)
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding = "same" if same else draw(st.sampled_from(["int", "int", "same", "valid"]))
    if padding == "same":
        picks = [draw(st.sampled_from(same_options(size, mode))) for size in shape[1:]]
        kernel, dilation = zip(*picks, strict=True)
        stride = (1,) * d
    elif padding == "valid":
        valid = [[o for o in conv_options(size, "zeros", cap) if o[3] == 0] for size in shape[1:]]
        picks = [draw(st.sampled_from(options)) for options in valid]
        kernel, stride, dilation, _ = zip(*picks, strict=True)
    else:
        picks = [draw(st.sampled_from(conv_options(size, mode, cap))) for size in shape[1:]]
        kernel, stride, dilation, padding = zip(*picks, strict=True)
    cout, groups = channels(draw, shape[0], same)
    layer = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1](
        shape[0], cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=draw(st.booleans()), padding_mode=mode,
    )
    return nn.Sequential(layer, nn.ReLU(inplace=True)) if draw(st.booleans()) else layer


@st.composite
def conv_transpose(draw, shape, same):
    """ConvTranspose1d/2d/3d with per-dim kernel, stride, dilation, padding and output_padding."""
    picks = [draw(st.sampled_from(conv_transpose_options(size, side_cap(shape)))) for size in shape[1:]]
    kernel, stride, dilation, padding, output_padding = zip(*picks, strict=True)
    cout, groups = channels(draw, shape[0], same=False)
    return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[len(shape) - 2](
        shape[0], cout, kernel, stride=stride, padding=padding, output_padding=output_padding,
        dilation=dilation, groups=groups, bias=draw(st.booleans()),
    )


@st.composite
def linear(draw, shape, same):
    """Linear over the last dim (any leading dims), on inputs (N, F) optionally followed by an
    in-place ReLU (on more dims its output is a view, which jacext refuses to see changed in place:
    test_in_place_op_on_an_output_that_is_a_view)."""
    layer = nn.Linear(shape[-1], shape[-1] if same else draw(st.integers(1, MAX_WIDTH)), bias=draw(st.booleans()))
    return nn.Sequential(layer, nn.ReLU(inplace=True)) if len(shape) == 1 and draw(st.booleans()) else layer


BATCHNORM_FOR = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}  # by len(shape)


@st.composite
def batchnorm(draw, shape, same):
    """BatchNorm1d/2d/3d in eval mode (random running statistics are set by ``randomize``)."""
    return BATCHNORM_FOR[len(shape)](
        shape[0], eps=draw(EPS), affine=draw(st.booleans())
    ).eval()


@st.composite
def groupnorm(draw, shape, same):
    """GroupNorm with groups of at least two values (torch refuses one for a single sample)."""
    groups = [g for g in divisors(shape[0]) if math.prod(shape) // g >= 2]
    return nn.GroupNorm(draw(st.sampled_from(groups)), shape[0], eps=draw(EPS), affine=draw(st.booleans()))


@st.composite
def instancenorm(draw, shape, same):
    """InstanceNorm1d/2d/3d with affine parameters; with running statistics, in train or eval mode."""
    norm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[len(shape) - 2](
        shape[0], eps=draw(EPS), affine=True, track_running_stats=draw(st.booleans())
    )
    return norm.train(draw(st.booleans()))


@st.composite
def trailing_norm(draw, shape, same):
    """LayerNorm or RMSNorm over the last one to three dims (LayerNorm over at least two values:
    over one it outputs its bias, and in float32 rounding noise)."""
    normalized = shape[-draw(st.integers(1, min(3, len(shape)))) :]
    if math.prod(normalized) >= 2 and draw(st.booleans()):
        return nn.LayerNorm(normalized, eps=draw(EPS), elementwise_affine=draw(st.booleans()), bias=draw(st.booleans()))
    return nn.RMSNorm(normalized, eps=draw(EPS))


@st.composite
def prelu(draw, shape, same):
    """PReLU with one slope or one per channel (dim 1 of the input)."""
    return nn.PReLU(draw(st.sampled_from([1, shape[0]])))


@st.composite
def bilinear(draw, shape, same):
    """Bilinear (of x and tanh of some of its features) over the last dim."""
    out = shape[-1] if same else draw(st.integers(1, MAX_WIDTH))
    return Pair(nn.Bilinear(shape[-1], draw(st.integers(1, shape[-1])), out, bias=draw(st.booleans())))


@st.composite
def custom(draw, shape, same):
    """Modules without a hand-written rule: the generic rule serves them."""
    kind = draw(st.sampled_from(["squared", "gate", "lookup", "scaled"]))
    out = shape[-1] if same else draw(st.integers(1, MAX_WIDTH))
    if kind == "squared":
        return Squared(shape[-1], out)
    if kind == "gate":
        return Gate(shape[-1])
    if kind == "lookup":
        return WithTable(shape[-1])
    return Scaled(nn.Linear(shape[-1], out))


ACTIVATIONS = [
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity,
    lambda: nn.Softmax(dim=-1), lambda: nn.LogSoftmax(dim=-1), lambda: nn.Dropout(0.5).eval(),
]


@st.composite
def activation(draw, shape, same):
    """A parameter-free module acting elementwise or on the last dim."""
    return draw(st.sampled_from(ACTIVATIONS))()


@st.composite
def pool(draw, shape, same):
    """Pooling or padding over the spatial dims (1-, 2- or 3-d)."""
    d = len(shape) - 2
    adaptive = (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d)[d]
    options: list[Callable[[], nn.Module]] = [lambda: adaptive(1)]
    if min(shape[1:]) >= 2:
        options += [lambda: (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[d](2)]
        options += [lambda: (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[d](2)]
        if max(shape[1:]) + 2 <= side_cap(shape) + (d == 2):
            options += [lambda: (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)[d](1)]
    return draw(st.sampled_from(options))()


@st.composite
def attention(draw, shape, same, empty):
    """MultiheadAttention with random heads, kdim/vdim, bias_k/v, zero attention, masks and weights
    (torch cannot reshape the masks of an empty batch)."""
    width = shape[1]
    cross = draw(st.booleans())
    need_weights = not same and draw(st.booleans())
    mha = nn.MultiheadAttention(
        width, draw(st.sampled_from(divisors(width))), batch_first=draw(st.booleans()),
        kdim=draw(st.integers(1, width)) if cross else None, vdim=draw(st.integers(1, width)) if cross else None,
        add_bias_kv=draw(st.booleans()), add_zero_attn=draw(st.booleans()), bias=draw(st.booleans()),
    )
    mask = None if empty else draw(st.sampled_from([None, "causal", "padding", "per_sample"]))
    return Attend(mha, cross, mask, need_weights, draw(st.booleans()))


@st.composite
def recurrent(draw, shape, same, empty):
    """RNN (tanh or relu), LSTM (with projections) or GRU, deep, bidirectional, packed or not,
    with initial states or not."""
    kind = draw(st.sampled_from(["rnn_tanh", "rnn_relu", "lstm", "gru"]))
    options = dict(
        hidden_size=draw(st.integers(1, 2)) if kind != "lstm" else draw(st.integers(2, 3)),
        num_layers=draw(st.integers(1, 2)),
        bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()), bias=draw(st.booleans()),
    )
    rnn: nn.RNNBase
    if kind == "lstm":
        rnn = nn.LSTM(shape[-1], proj_size=draw(st.integers(0, options["hidden_size"] - 1)), **options)
    elif kind == "gru":
        rnn = nn.GRU(shape[-1], **options)
    else:
        rnn = nn.RNN(shape[-1], nonlinearity=kind[4:], **options)
    return Recurrent(rnn, packed=not empty and draw(st.booleans()), state=draw(st.booleans()))


@st.composite
def cell(draw, shape, same):
    """RNNCell, LSTMCell or GRUCell unrolled for one or two steps."""
    make = draw(st.sampled_from([nn.RNNCell, nn.LSTMCell, nn.GRUCell]))
    return Unrolled(make(shape[0], draw(st.integers(1, 2)), bias=draw(st.booleans())), draw(st.integers(1, 2)))


@st.composite
def reshape(draw, shape, same):
    """Flatten, a transpose or a mean over dim 1."""
    return draw(st.sampled_from([nn.Flatten, Swap, Mean]))()


@st.composite
def residual(draw, shape, same, empty, nesting):
    """x + block(x), the block keeping the shape."""
    return Residual(draw(block(shape, True, empty, nesting - 1)))


@st.composite
def twice(draw, shape, same, empty, nesting):
    """A block that keeps the shape, called twice."""
    return Twice(draw(block(shape, True, empty, nesting - 1)))


def spare(shape, same):
    """Parameters the forward pass does not use."""
    return st.builds(Spare, st.just(shape[-1]))


@st.composite
def tied(draw, shape, same):
    """Two Linear layers with one weight."""
    return Tied(shape[-1], draw(st.booleans()))


# name -> (strategy, applies to the per-sample shape, keeps the shape possible, works for N = 0)
BLOCKS = {
    "linear": (linear, lambda s: True, True, True),
    "conv": (conv, lambda s: len(s) in (2, 3, 4), True, True),
    "conv_transpose": (conv_transpose, lambda s: len(s) in (2, 3, 4), False, True),
    "batchnorm": (batchnorm, lambda s: len(s) <= 4, True, True),
    "groupnorm": (groupnorm, lambda s: math.prod(s) >= 2, True, True),
    "instancenorm": (instancenorm, lambda s: len(s) in (2, 3, 4) and math.prod(s[1:]) >= 2, True, False),
    "trailing_norm": (trailing_norm, lambda s: True, True, True),
    "prelu": (prelu, lambda s: True, True, True),
    "bilinear": (bilinear, lambda s: True, True, True),
    "custom": (custom, lambda s: True, True, True),
    "activation": (activation, lambda s: True, True, True),
    "pool": (pool, lambda s: len(s) in (2, 3, 4), False, True),
    "attention": (attention, lambda s: len(s) == 2, True, True),
    "recurrent": (recurrent, lambda s: len(s) == 2, False, True),
    "cell": (cell, lambda s: len(s) == 1, False, True),
    "reshape": (reshape, lambda s: len(s) >= 2, False, True),
    "residual": (residual, lambda s: True, True, True),
    "twice": (twice, lambda s: True, True, True),
    "tied": (tied, lambda s: True, True, True),
    "spare": (spare, lambda s: True, True, True),
}
NESTING = {"residual", "twice"}


@st.composite
def block(draw, shape, same=False, empty=False, nesting=2, names=tuple(BLOCKS)):
    """One block for the per-sample input ``shape``, of one of the kinds ``names``; ``same``: one
    that keeps the shape; ``empty``: one that accepts an empty batch; ``nesting``: how deep
    residual and twice may nest."""
    names = [
        name for name in names
        if BLOCKS[name][1](shape) and (BLOCKS[name][2] or not same) and (BLOCKS[name][3] or not empty)
        and (nesting > 0 or name not in NESTING)
    ]
    name = draw(st.sampled_from(names))
    strategy = BLOCKS[name][0]
    if name in NESTING:
        return draw(strategy(shape, same, empty, nesting))
    if name in ("attention", "recurrent"):
        return draw(strategy(shape, same, empty))
    return draw(strategy(shape, same))


# ---------------------------------------------------------------- strategies: whole models


@dataclass
class Case:
    """A model and how to feed it: float inputs of per-sample shape ``shape``, or tokens in
    [low, vocab) (low = -1 marks absent tokens of a bag); ``frozen``: the positions in
    ``model.parameters()`` of the parameters to freeze; ``tied``: the last Linear's weight is
    the embedding matrix."""

    model: nn.Module
    shape: Tuple[int, ...]
    frozen: Tuple[int, ...]
    vocab: int = 0
    low: int = 0
    tied: bool = False

    def inputs(self, n, dtype, device="cpu"):
        if self.vocab:
            return torch.randint(self.low, self.vocab, (n, *self.shape)).to(device)
        return torch.randn(n, *self.shape, dtype=dtype).to(device)


@st.composite
def body(draw, shape, empty, layers):
    """Up to ``layers`` random blocks after one another."""
    modules = []
    for _ in range(draw(st.integers(0, layers))):
        module = draw(block(shape, empty=empty))
        shape = out_shape(module, shape)
        modules.append(module)
    return modules, shape


@st.composite
def head(draw, shape):
    """The output layer: Linear to C outputs, over the last dim or the flattened sample;
    with C = 1 possibly squeezed to an output of shape (N,)."""
    c = draw(st.integers(1, 3))
    if len(shape) >= 2 and math.prod(shape[:-1]) * c <= MAX_OUTPUTS and draw(st.booleans()):
        return [nn.Linear(shape[-1], c)]
    flat = [nn.Flatten()] if len(shape) >= 2 else []
    squeeze = [Squeeze()] if c == 1 and draw(st.booleans()) else []
    return flat + [nn.Linear(math.prod(shape), c)] + squeeze


# per-sample input shapes: the range of each dim (positions >= 2, as InstanceNorm needs)
SHAPES = {
    "vector": [(1, 4)],
    "sequence": [(1, 4), (1, 4)],
    "image1d": [(1, 3), (2, 5)],
    "image2d": [(1, 3), (1, 4), (2, 4)],
    "image3d": [(1, 2), (1, 3), (1, 3), (2, 3)],
}
# the kinds of the first block, with the input shapes they come on
STEMS = {
    "linear": ["vector", "sequence"],
    "bilinear": ["vector", "sequence"],
    "custom": ["vector", "sequence"],
    "tied": ["vector", "sequence"],
    "cell": ["vector"],
    "prelu": ["vector", "image1d", "image2d", "image3d"],
    "batchnorm": ["vector", "image1d", "image2d", "image3d"],
    "groupnorm": ["image1d", "image2d", "image3d"],
    "instancenorm": ["image1d", "image2d", "image3d"],
    "trailing_norm": ["sequence", "image2d", "image3d"],
    "attention": ["sequence"],
    "recurrent": ["sequence"],
    "conv": ["image1d", "image2d", "image3d"],
    "conv_transpose": ["image1d", "image2d", "image3d"],
    "residual": list(SHAPES),
    "twice": list(SHAPES),
}


def frozen(model):
    """Up to two parameters to freeze, none of the last layer (so that the output depends on a
    trainable parameter)."""
    last = [m for m in model if any(True for _ in m.parameters())][-1]
    keep = {id(p) for p in last.parameters()}
    candidates = [i for i, p in enumerate(model.parameters()) if id(p) not in keep]
    return st.lists(st.sampled_from(candidates), max_size=2, unique=True).map(tuple) if candidates else st.just(())


@st.composite
def float_models(draw, stem=None, empty=False):
    """Float inputs, a first block of kind ``stem`` (default: any), more random blocks, a head."""
    kind = stem or draw(st.sampled_from([name for name in STEMS if BLOCKS[name][3] or not empty]))
    shape = tuple(draw(st.integers(*r)) for r in SHAPES[draw(st.sampled_from(STEMS[kind]))])
    first = draw(block(shape, empty=empty, names=(kind,)))
    modules, end = draw(body(out_shape(first, shape), empty, layers=3))
    model = nn.Sequential(first, *modules, *draw(head(end)))
    return Case(model, shape, draw(frozen(model)))


def sparse_or_freq(draw, bag_max=False):
    """sparse gradients, scale_grad_by_freq or neither (torch combines neither with the other
    nor with EmbeddingBag's max mode)."""
    option = None if bag_max else draw(st.sampled_from(["sparse", "scale_grad_by_freq", None]))
    return {option: True} if option else {}


@st.composite
def embedding(draw, vocab):
    """Embedding with random padding_idx, max_norm, scale_grad_by_freq and sparse gradients."""
    return nn.Embedding(
        vocab, draw(st.integers(1, 3)), padding_idx=draw(st.none() | st.integers(0, vocab - 1)),
        max_norm=draw(st.sampled_from([None, 0.8])), **sparse_or_freq(draw),
    )


@st.composite
def embedding_bag(draw, vocab):
    """EmbeddingBag (sum, mean, max) on a 2-D input or with offsets, random options."""
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    form = draw(st.sampled_from(["2d", "offsets", "last_offset"]))
    bag = nn.EmbeddingBag(
        vocab, draw(st.integers(1, 3)), mode=mode, padding_idx=draw(st.none() | st.integers(0, vocab - 1)),
        max_norm=draw(st.sampled_from([None, 0.8])), include_last_offset=form == "last_offset",
        **sparse_or_freq(draw, bag_max=mode == "max"),
    )
    return Bag(bag, form, weighted=mode == "sum" and draw(st.booleans()))


@st.composite
def token_models(draw, stem, tied, empty=False):
    """Tokens through an Embedding (N, T) or (N, A, B) or an EmbeddingBag (N, B) (``stem``),
    random blocks and a head: a Linear, or with ``tied`` a Linear whose weight is the embedding
    matrix (logits over the vocabulary)."""
    vocab = draw(st.integers(2, 5))
    lookup = draw({"embedding": embedding, "bag": embedding_bag}[stem](vocab))
    low = -1 if isinstance(lookup, Bag) and lookup.form != "2d" else 0
    ranks = [1] if isinstance(lookup, Bag) else [1, 2]  # tokens (N, T) or (N, A, B)
    tokens = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.sampled_from(ranks))))
    shape = out_shape(lookup, tokens, tokens=True)
    modules, end = draw(body(shape, empty, layers=2))
    if not tied:
        model = nn.Sequential(lookup, *modules, *draw(head(end)))
        return Case(model, tokens, draw(frozen(model)), vocab, low)
    width = shape[-1]
    if math.prod(end[:-1]) * vocab > MAX_OUTPUTS:
        modules.append(nn.Flatten())
        end = (math.prod(end),)
    if end[-1] != width:
        modules.append(nn.Linear(end[-1], width))
    logits = nn.Linear(width, vocab, bias=draw(st.booleans()))
    logits.weight = (lookup.bag if isinstance(lookup, Bag) else lookup).weight
    model = nn.Sequential(lookup, *modules, logits)
    return Case(model, tokens, draw(frozen(model)), vocab, low, tied=True)


# ---------------------------------------------------------------- the check


def prepare(model, frozen, device, dtype):
    """``model`` on ``device`` in ``dtype``, :func:`randomize`d, the parameters at the indices
    ``frozen`` frozen."""
    model = model.to(device, dtype)
    randomize(model)
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i not in frozen)
    return model


def randomize(model):
    """Parameters away from their constant initialisations (norm weights, PReLU slopes), random
    running statistics; from torch's current seed."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_().div_(math.sqrt(p[0].numel()) if p.dim() > 1 else 1.0)
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


def plain_grads(model, loss):
    gs = torch.autograd.grad(loss, [p for _, p in trainable(model)], allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.to_dense() for g, (_, p) in zip(gs, trainable(model), strict=True)]


def loss_for(out, reduction):
    """Cross-entropy for outputs (N, C >= 2), else MSE; the target and the loss function."""
    if out.dim() == 2 and out.shape[1] >= 2:
        return torch.randint(0, out.shape[1], (out.shape[0],)).to(out.device), nn.CrossEntropyLoss(reduction=reduction)
    return torch.randn(out.shape, dtype=out.dtype).to(out.device), nn.MSELoss(reduction=reduction)


def expected_results(model, lossfunc, y, x, out_shape):
    """The oracle's per-sample Jacobians and gradients (empty for an empty batch)."""
    if x.shape[0]:
        return loop_jacobian(model, x), loop_grad_batch(model, lossfunc, y, x)
    params = trainable(model)
    return (
        {name: p.new_zeros(*out_shape, *p.shape) for name, p in params},
        {name: p.new_zeros(0, *p.shape) for name, p in params},
    )


JACEXT_EXTENSIONS = (jacext.BatchJacobian, jacext.BatchGrad, jacext.BatchL2Grad)
# the least scale of the absolute floor of a comparison (reference.assert_close: atol * scale).
# Where every expected entry is zero in exact arithmetic (a normalisation of equal values, as
# repeated tokens give), both sides are rounding noise, amplified up to 1 / sqrt(eps) by the
# normalisations; the largest expected entry would put the floor at the noise itself.
NOISE_SCALE = {torch.float64: 1e-4, torch.float32: 1e-1}


def scale_of(values, dtype, power=1):
    """The scale of the absolute floor for comparing ``values`` ({name: tensor}) of quantities of
    degree ``power`` in the gradients (2: squared norms)."""
    return max(overall_scale(values), NOISE_SCALE[dtype] ** power)


# float32: jacext's error from the float64 loop may be this many times the float32 loop's own
ORACLE_NOISE = 2.0


def as_float64(t):
    return t.double() if t.is_floating_point() else t


@dataclass
class Oracle:
    """What jacext must give for one model, input and loss, from the loops of ``tests/reference.py``:
    ``fields`` (savefield -> {name: value}) for BatchJacobian, BatchGrad and BatchL2Grad, ``plain``
    (the gradients without jacext, in ``trainable`` order) and the largest entry of each field
    (the absolute floor of the comparisons).

    In float32 the loop itself rounds: where normalisations follow one another (BatchNorm over two
    samples, RMSNorm over one value), each amplifies rounding by up to 1 / sqrt(eps), and the
    float32 loop can be further from the exact values than the float32 tolerance (found by the
    fuzzer: 2.1e-4 from the float64 loop at a largest entry of 1.0, where the floor is 1e-5;
    jacext's float32 result was 5.3e-5 from it). A float32 result that misses the float32 loop
    is then compared with the same loop in float64 (``in_float64``: the model and inputs as they
    are, in float64), with the floor raised by ``ORACLE_NOISE`` times the float32 loop's own
    error there: jacext in float32 must be as exact as autograd in float32, not more."""

    fields: dict
    plain: list
    scales: dict
    out_shape: torch.Size
    in_float64: Optional[Callable[[], "Oracle"]] = None

    @classmethod
    def of(cls, model, lossfunc, y, x):
        out = model(x)
        plain = plain_grads(model, lossfunc(out, y))
        jac, grad = expected_results(model, lossfunc, y, x, out.shape)
        fields = {"jacobian": jac, "grad_batch": grad, "batch_l2": {k: squared_norms(g) for k, g in grad.items()}}
        dtype = out.dtype
        scales = {field: scale_of(values, dtype, 2 if field == "batch_l2" else 1) for field, values in fields.items()}
        in_float64 = None
        if dtype == torch.float32:
            twin = copy.deepcopy(model)
            exact: list = []  # computed once, on demand

            def in_float64():
                if not exact:
                    twin.double()
                    for p in twin.parameters():  # complex64 to complex128
                        p.data = p.data.to(torch.promote_types(p.dtype, torch.float64))
                    exact.append(cls.of(twin, lossfunc, as_float64(y), as_float64(x)))
                return exact[0]

        return cls(fields, plain, scales, out.shape, in_float64)

    def assert_close(self, got, field, name, dtype, what):
        """``got`` is the oracle's ``field`` of parameter ``name``, to the precision above."""
        expected = self.fields[field][name]
        try:
            assert_close(got, expected, dtype, what, self.scales[field])
        except AssertionError:
            if self.in_float64 is None:
                raise
            exact = self.in_float64().fields[field]
            noise = max(((self.fields[field][k].double() - v).abs().max().item() for k, v in exact.items()
                         if v.numel()), default=0.0)
            rtol, atol = tolerances(dtype)
            floor = atol * self.scales[field] + ORACLE_NOISE * noise
            torch.testing.assert_close(
                as_float64(got), exact[name], rtol=rtol, atol=floor,
                msg=lambda m: f"{what} (against the float64 loop, the float32 loop's error {noise:.2e}): {m}",
            )

    def check(self, model, extensions, dtype, grad=True):
        """The attributes the jacext extensions among ``extensions`` stored, and (``grad``) p.grad."""
        for (name, p), g in zip(trainable(model), self.plain, strict=True):
            for e in extensions:
                if isinstance(e, JACEXT_EXTENSIONS) and e.savefield in self.fields:
                    what = f"{extensions}: p.{e.savefield} of {name}"
                    self.assert_close(getattr(p, e.savefield), e.savefield, name, dtype, what)
            if grad:
                got = torch.zeros_like(p) if p.grad is None else p.grad.to_dense()
                assert_close(got, g, dtype, f"{extensions}: p.grad of {name}", self.scales["grad_batch"])

    def check_jacobian_function(self, model, x, dtype):
        """jacext.jacobian, also with flat=True."""
        got = jacext.jacobian(model, x)
        for name, value in got.items():
            self.assert_close(value, "jacobian", name, dtype, f"jacext.jacobian of {name}")
        n, c = self.out_shape[0], self.out_shape[1:].numel()
        flat = torch.cat([got[name].reshape(n, c, p.numel()) for name, p in trainable(model)], 2)
        assert torch.equal(jacext.jacobian(model, x, flat=True), flat)
