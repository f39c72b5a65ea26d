"""The fused Linear under BatchGrad (optionally with BatchL2Grad) on the transformer-like model.

* A Linear with >= 16 positions per sample gets its output through ``FusedGrads``, whose backward
  runs the rule and fills p.grad with the sum of the per-sample gradients it materialises.
* Where the Linear's output cotangent is the same at every position (the backward of a sum or
  mean over the positions), the rule contracts one position; G equal only in places does not.
* Parameters used twice (a module called twice, tied weights), frozen or missing parameters, an
  in-place operation on the fused output, a single sample and an empty batch.

Every result is compared with the autograd loop (``loop_grad_batch``) and p.grad with an
identical model that jacext never extended.
"""

import pytest
import torch
from backpack import backpack
from torch import nn

import jacext
import jacext.rules.linear as linear_rules

from .fused_nets import EXTS, FUSED, Tiny, assert_matches, ce_loss, data, expected, sq_loss, twins, watch


@pytest.mark.parametrize("exts", EXTS)
@pytest.mark.parametrize("loss", ["ce", "sq"])
@pytest.mark.parametrize("pool", ["mean", "sum", "max", "none"])
def test_small_transformer_is_loop_exact(pool, loss, exts, dtype, contractions):
    torch.manual_seed(0)
    model, plain = twins(Tiny(pool), dtype)
    lossfunc = ce_loss if loss == "ce" else sq_loss
    x, y = data(5, pool=pool, loss=loss, dtype=dtype)
    per_sample, grads = expected(plain, lossfunc, y, x)
    seen = watch(model, "up", "down", "head")
    with backpack(*EXTS[exts]()):
        lossfunc(model(x), y).backward()
    # the head runs per position only without pooling: only then does it have 16 positions
    assert seen["up"] == seen["down"] == [FUSED] and (seen["head"] == [FUSED]) == (pool == "none")
    assert sorted(contractions) == sorted(["up", "down"] + (["head"] if pool == "none" else []))
    assert_matches(model, per_sample, grads, dtype, l2="L2" in exts)


@pytest.mark.parametrize("pool, constant", [("mean", True), ("sum", True), ("max", False), ("none", False)])
def test_constant_cotangent_is_detected_where_the_positions_are_pooled(pool, constant, monkeypatch):
    """down's output cotangent is the same at every position after a sum (stride 0) or a mean
    (equal values); the shortcut must fire exactly there (up's cotangent, after the GELU, varies)."""
    torch.manual_seed(0)
    calls = []
    original = linear_rules._constant_over_positions

    def spy(g):
        result = original(g)
        calls.append((g.shape[-1], result))
        return result

    monkeypatch.setattr(linear_rules, "_constant_over_positions", spy)
    model, plain = twins(Tiny(pool), torch.float64)
    x, y = data(5, pool=pool)
    per_sample, grads = expected(plain, ce_loss, y, x)
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        ce_loss(model(x), y).backward()
    down, up = [c for f, c in calls if f == 8], [c for f, c in calls if f == 16]
    assert down and up  # asked in the fused backward and in the rule
    assert all(c == constant for c in down) and not any(up)
    assert_matches(model, per_sample, grads, torch.float64, l2=True)


@pytest.mark.parametrize("weights", ["all_positions", "first_two_positions", "first_sample_only"])
def test_cotangent_equal_only_in_places_is_not_taken_for_constant(weights, dtype, monkeypatch):
    """G equal at the first two positions but not after, or constant over the positions for one
    sample only, must not take the one-position shortcut; G equal everywhere (by value) must."""
    torch.manual_seed(0)
    taken = []
    original = linear_rules._constant_over_positions

    def spy(g):
        taken.append((g.stride(2) == 0, original(g)))  # (seen from the strides, constant)
        return taken[-1][1]

    monkeypatch.setattr(linear_rules, "_constant_over_positions", spy)
    model, plain = twins(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), dtype)
    x = torch.randn(4, 20, 8, dtype=dtype)
    c = torch.randn(8, dtype=dtype)
    if weights == "all_positions":
        w = c.expand(4, 20, 8).clone()  # equal values, not an expanded tensor
    elif weights == "first_two_positions":
        w = torch.zeros(4, 20, 8, dtype=dtype)
        w[:, :2] = c
    else:  # and the others equal at the first two positions, so that only a look at all tells
        w = torch.randn(4, 20, 8, dtype=dtype)
        w[:, :2], w[0] = c, c

    def lossfunc(out, w):
        return (out * w).sum()

    per_sample, grads = expected(plain, lossfunc, w, x)
    seen = watch(model, "2")
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        lossfunc(model(x), w).backward()
    assert seen["2"] == [FUSED]
    # layer 2's rule compares the values, its backward shares what the rule found; then layer 0's
    # (its G, after the tanh, varies)
    assert taken == [(False, weights == "all_positions"), (False, False)]
    assert_matches(model, per_sample, grads, dtype, l2=True)


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lin(torch.tanh(self.lin(self.emb(x)))).mean(1))


class TiedHead(nn.Module):
    """A language-model head sharing its weight with the Embedding, at every position."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


@pytest.mark.parametrize("exts", EXTS)
@pytest.mark.parametrize("net", ["shared_module", "tied_weights"])
def test_parameters_used_twice_are_loop_exact(net, exts, dtype):
    torch.manual_seed(0)
    model, plain = twins(SharedLinear() if net == "shared_module" else TiedHead(), dtype)
    name = "lin" if net == "shared_module" else "head"
    seen = watch(model, name)
    for _ in range(2):
        x = torch.randint(0, 50, (5, 20))
        y = torch.randint(0, 3, (5,)) if net == "shared_module" else torch.randint(0, 50, (5, 20))
        per_sample, grads = expected(plain, ce_loss, y, x)
        model.zero_grad()
        with backpack(*EXTS[exts]()):
            ce_loss(model(x), y).backward()
        assert seen[name] == [FUSED] * (2 if net == "shared_module" else 1)
        seen[name].clear()
        assert_matches(model, per_sample, grads, dtype, l2="L2" in exts)


@pytest.mark.parametrize("case", ["frozen_weight", "frozen_bias", "no_bias"])
def test_fused_linear_with_frozen_or_missing_parameters(case, dtype):
    torch.manual_seed(0)
    net = Tiny("none", up_bias=case != "no_bias")
    if case == "frozen_weight":
        net.up.weight.requires_grad_(False)
    elif case == "frozen_bias":
        net.up.bias.requires_grad_(False)
    model, plain = twins(net, dtype)
    seen = watch(model, "up")
    for _ in range(2):
        x, y = data(5, pool="none")
        per_sample, grads = expected(plain, ce_loss, y, x)
        model.zero_grad()
        with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
            ce_loss(model(x), y).backward()
        assert seen["up"] == [FUSED]
        seen["up"].clear()
        assert_matches(model, per_sample, grads, dtype, l2=True)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.up, self.head = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.up(self.emb(x))
        h.relu_()  # in place on the fused node's output
        return self.head(h.sum(1))


def test_in_place_operation_on_the_fused_output(dtype):
    torch.manual_seed(0)
    model, plain = twins(InPlace(), dtype)
    x, y = data(5)
    per_sample, grads = expected(plain, ce_loss, y, x)
    seen = watch(model, "up")
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        ce_loss(model(x), y).backward()
    assert seen["up"] == [FUSED]
    assert_matches(model, per_sample, grads, dtype, l2=True)


@pytest.mark.parametrize("pool", ["mean", "none"])
def test_single_sample(pool, dtype):
    torch.manual_seed(0)
    model, plain = twins(Tiny(pool), dtype)
    x, y = data(1, pool=pool)
    per_sample, grads = expected(plain, ce_loss, y, x)
    seen = watch(model, "up", "down")
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        ce_loss(model(x), y).backward()
    assert seen == {"up": [FUSED], "down": [FUSED]}
    assert_matches(model, per_sample, grads, dtype, l2=True)


@pytest.mark.parametrize("pool", ["mean", "none"])
def test_empty_batch_between_full_ones(pool, dtype):
    """N = 0 gives empty results and zero gradients (as tests/errors/test_batch_sizes.py expects), also
    with the results of a full batch on the parameters; the next full batch is exact again."""
    torch.manual_seed(0)
    model, plain = twins(Tiny(pool), dtype)
    seen = watch(model, "up", "down")
    for n in (5, 0, 5):
        x, y = data(n, pool=pool)
        if n:  # the loop has no sample to stack
            per_sample, grads = expected(plain, ce_loss, y, x)
        model.zero_grad()
        with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
            ce_loss(model(x), y).backward()
        assert seen == {"up": [FUSED], "down": [FUSED]}
        seen["up"].clear()
        seen["down"].clear()
        if n == 0:
            for p in model.parameters():
                assert p.grad_batch.shape == (0, *p.shape) and p.batch_l2.shape == (0,)
                assert torch.equal(p.grad, torch.zeros_like(p))
        else:
            assert_matches(model, per_sample, grads, dtype, l2=True)
