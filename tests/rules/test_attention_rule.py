"""MultiheadAttention's hand-written rule, norm rule and own backward against the autograd loops.

Every option (batch_first or not; self-attention, key = value, three different inputs; kdim/vdim;
add_bias_kv, add_zero_attn, bias=False; key_padding_mask bool and float; attn_mask 2-d bool and
float, 3-d; is_causal with and without the shortcut; need_weights averaged and per head; dropout
in eval mode) for BatchGrad, BatchL2Grad, BatchJacobian and ClipGrad's clipped sums, with N equal
to the sequence length. A Linear before the attention checks the input gradients through query,
key and value. Calls with one output tensor are fused: ClipGrad takes the one-backward plan, also
on TransformerEncoders (batch first and not, with masks); dropout in train mode is refused before
the backward.
"""

from typing import Any, Callable, Dict, Tuple

import pytest
import torch
from backpack import backpack
from engine.fused_nets import FUSED, assert_clipped, assert_matches, clipped_reference, expected, twins
from reference import check_jacobian
from torch import nn

import jacext
from jacext.dp import ClipGrad

N = T = 3  # samples and positions: equal, so that a rule that took one for the other would be caught
H = 2


def _kpm(dtype=None):
    """Padding in two samples; as -inf where ``dtype`` is given (beside a float attn_mask: torch
    deprecates mixed types)."""
    kpm = torch.tensor([[False, False, True], [False, True, True], [False, False, False]])
    return kpm if dtype is None else torch.zeros(N, T, dtype=dtype).masked_fill(kpm, float("-inf"))


MASKS: Dict[str, Callable[[torch.dtype], Dict[str, Any]]] = {
    "none": lambda dtype: {},
    "key_padding_bool": lambda dtype: {"key_padding_mask": _kpm()},
    "key_padding_float": lambda dtype: {"key_padding_mask": torch.randn(N, T, dtype=dtype)},
    "attn_2d_bool": lambda dtype: {"attn_mask": torch.ones(T, T, dtype=torch.bool).triu(1)},
    "attn_2d_float": lambda dtype: {"attn_mask": torch.randn(T, T, dtype=dtype)},
    "attn_3d": lambda dtype: {"attn_mask": torch.randn(N * H, T, T, dtype=dtype)},
    "attn_and_padding": lambda dtype: {"attn_mask": torch.randn(T, T, dtype=dtype), "key_padding_mask": _kpm(dtype)},
    "causal": lambda dtype: {  # torch's shortcut: the causal kernel, attn_mask unused
        "attn_mask": nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype),
        "is_causal": True,
        "need_weights": False,
    },
    "causal_padding": lambda dtype: {
        "attn_mask": nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype),
        "is_causal": True,
        "key_padding_mask": _kpm(dtype),
        "need_weights": False,
    },
}

# name: (MultiheadAttention options, form of the call, mask, need_weights / average_attn_weights)
CASES: Dict[str, Tuple[Dict[str, Any], str, str, Dict[str, Any]]] = {
    "self": ({}, "self", "none", {"need_weights": False}),
    "self_seq_first": ({"batch_first": False}, "self", "none", {"need_weights": False}),
    "key_is_value": ({}, "cross", "none", {"need_weights": False}),
    "three_inputs": ({}, "three", "none", {"need_weights": False}),
    "three_inputs_seq_first": ({"batch_first": False}, "three", "attn_3d", {"need_weights": False}),
    "kdim_vdim": ({"kdim": 3, "vdim": 2}, "three", "key_padding_bool", {"need_weights": False}),
    "kdim_vdim_seq_first": ({"kdim": 3, "vdim": 3, "batch_first": False}, "cross", "none", {"need_weights": False}),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, "self", "attn_and_padding", {}),
    "bias_kv_seq_first": ({"add_bias_kv": True, "batch_first": False}, "three", "causal", {}),
    "zero_attn_kdim": ({"add_zero_attn": True, "kdim": 3, "vdim": 3}, "cross", "attn_2d_float", {}),
    "no_bias": ({"bias": False}, "self", "key_padding_float", {"need_weights": False}),
    "attn_2d_bool": ({}, "self", "attn_2d_bool", {"need_weights": False}),
    "causal_shortcut": ({}, "self", "causal", {}),
    "causal_padding": ({"batch_first": False}, "self", "causal_padding", {}),
    "weights_averaged": ({}, "cross", "key_padding_bool", {"need_weights": True}),
    "weights_per_head": ({"add_bias_kv": True}, "self", "attn_3d", {"average_attn_weights": False}),
    "causal_with_weights": ({}, "self", "none", {"need_weights": True, "is_causal": True, "attn_mask": "causal"}),
    "dropout_eval": ({"dropout": 0.5}, "self", "attn_2d_float", {"need_weights": False}),
}


class Net(nn.Module):
    """x (N, T, 4) -> Linear -> tanh -> MultiheadAttention(query, key, value) -> Linear at every
    position, flattened; with the attention weights, flattened, where it returns them."""

    def __init__(self, options, form, call):
        super().__init__()
        self.pre, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.mha = nn.MultiheadAttention(4, H, **options)
        self.form, self.call = form, call
        if self.mha.bias_k is not None:
            with torch.no_grad():
                self.mha.bias_k.normal_()
                self.mha.bias_v.normal_()

    def forward(self, x):
        bf = self.mha.batch_first
        h = torch.tanh(self.pre(x))
        h = h if bf else h.transpose(0, 1)
        t = 1 if bf else 0
        k = v = h if self.form == "self" else h.flip(t)
        if self.form == "three":
            k = 2 * h
        k, v = k[..., : self.mha.kdim], v[..., 4 - self.mha.vdim :]
        y, w = self.mha(h, k, v, **self.call)
        out = self.head(y if bf else y.transpose(0, 1)).flatten(1)
        return out if w is None else torch.cat([out, w.flatten(1)], 1)


def make(case, dtype):
    options, form, mask, call = CASES[case]
    call = {**MASKS[mask](dtype), **call}
    if call.get("attn_mask") == "causal":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype)
    model = Net(options, form, call).to(dtype)
    if "dropout" in options:
        model.eval()
    return model


def watch(model, *names):
    """grad_fn class names of the named submodules' first output tensors, per call."""
    seen: Dict[str, list] = {name: [] for name in names}
    for name in names:
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen[name].append(
                type((out[0] if isinstance(out, tuple) else out).grad_fn).__name__
            )
        )
    return seen


def sq_loss(out, y):
    return (out - y).square().sum()


def fusable(case):
    call = CASES[case][3]
    mask = MASKS[CASES[case][2]](torch.float64)
    return call.get("need_weights", mask.get("need_weights", True)) is False


@pytest.mark.parametrize("case", CASES)
def test_batch_grad_and_l2_are_loop_exact(case, dtype):
    model, plain = twins(make(case, dtype), dtype)
    x = torch.randn(N, T, 4, dtype=dtype)
    y = torch.randn_like(plain(x))
    per_sample, grads = expected(plain, sq_loss, y, x)
    seen = watch(model, "mha")
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        sq_loss(model(x), y).backward()
    assert_matches(model, per_sample, grads, dtype, l2=True)
    assert (seen["mha"] == [FUSED]) == fusable(case)
    assert jacext.backward_plan(model) == ("inline, fused" if fusable(case) else "inline")


@pytest.mark.parametrize("case", CASES)
def test_batch_jacobian_is_loop_exact(case, dtype):
    check_jacobian(make(case, dtype), torch.randn(N, T, 4, dtype=dtype))


@pytest.mark.parametrize("case", CASES)
def test_clip_grad_is_loop_exact(case, dtype):
    model, plain = twins(make(case, dtype), dtype)
    x = torch.randn(N, T, 4, dtype=dtype) * 3
    y = torch.randn_like(plain(x))
    per_sample, _ = expected(plain, sq_loss, y, x)
    bound, clipped, l2 = clipped_reference(per_sample, "sum")
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        sq_loss(model(x), y).backward()
    assert jacext.backward_plan(model) == ("inline, clipping" if fusable(case) else "pull-back")
    assert_clipped(model, clipped, l2, dtype)


def test_fused_call_gives_float_masks_their_gradients(dtype):
    """Masks that require a gradient (not parameters: leaves of the caller) get autograd's."""
    model, plain = twins(make("three_inputs", dtype), dtype)
    x = torch.randn(N, T, 4, dtype=dtype)
    masks = {}
    for name, net in (("jacext", model), ("plain", plain)):
        torch.manual_seed(1)
        attn, kpm = torch.randn(T, T, dtype=dtype, requires_grad=True), torch.randn(N, T, dtype=dtype).requires_grad_()
        net.call = {"attn_mask": attn, "key_padding_mask": kpm, "need_weights": False}
        masks[name] = (attn, kpm)
    y = torch.randn_like(plain(x))
    sq_loss(plain(x), y).backward()
    with backpack(ClipGrad(1.0, loss_reduction="sum")):
        sq_loss(model(x), y).backward()
    assert jacext.backward_plan(model) == "inline, clipping"
    for got, want in zip(masks["jacext"], masks["plain"], strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_dropout_in_train_mode_is_refused_before_the_backward():
    model = jacext.extend(Net({"dropout": 0.1}, "self", {"need_weights": False}).double())
    with backpack(ClipGrad(1.0, loss_reduction="sum")), pytest.raises(jacext.JacextError, match="dropout=0.1"):
        model(torch.randn(N, T, 4, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())


class Classifier(nn.Module):
    """A 2-layer nn.TransformerEncoder, mean over the positions, a Linear head."""

    def __init__(self, batch_first, norm_first=False, masks=False):
        super().__init__()
        self.batch_first, self.masks = batch_first, masks
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (N, T, 8)
        n, t = x.shape[:2]
        h = x if self.batch_first else x.transpose(0, 1)
        kwargs = {}
        if self.masks:
            kpm = torch.zeros(n, t, dtype=x.dtype)
            kpm[0, -2:] = float("-inf")
            kwargs = {"mask": nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype), "is_causal": True}
            kwargs["src_key_padding_mask"] = kpm
        h = self.enc(h, **kwargs)
        return self.head(h.mean(1 if self.batch_first else 0))


ENCODERS = {
    "batch_first": (True, False, False),
    "seq_first": (False, False, False),
    "norm_first_masks": (True, True, True),
    "seq_first_masks": (False, False, True),
}


@pytest.mark.parametrize("n", [3, 5])  # 5: N equal to T
@pytest.mark.parametrize("encoder", ENCODERS)
def test_transformer_encoder_under_clip_grad_in_one_backward(encoder, n, dtype):
    model, plain = twins(Classifier(*ENCODERS[encoder]), dtype)
    x, y = torch.randn(n, 5, 8, dtype=dtype), torch.randint(0, 3, (n,))

    def ce(out, y):
        return nn.functional.cross_entropy(out, y, reduction="sum")

    per_sample, _ = expected(plain, ce, y, x)
    bound, clipped, l2 = clipped_reference(per_sample, "sum")
    seen = watch(model, "enc.layers.0.self_attn", "enc.layers.1.linear1")
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        ce(model(x), y).backward()
    assert seen == {"enc.layers.0.self_attn": [FUSED], "enc.layers.1.linear1": [FUSED]}
    assert jacext.backward_plan(model) == "inline, clipping"
    assert_clipped(model, clipped, l2, dtype)
    with backpack(jacext.BatchGrad()):
        ce(model(x), y).backward()
    assert jacext.backward_plan(model) == "inline, fused"
    scale = max(g.abs().max().item() for g in per_sample.values())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, per_sample[name], rtol=1e-4, atol=1e-5 * scale)
