"""ClipGrad in one backward pass (the "inline, clipping" plan), and where it pulls back first.

ClipGrad alone, where every call has a hand-written rule, one tensor input and one output: every
call is fused and a ClipGate computes the clipped sums inside the one backward (no pull-back);
otherwise (a Bilinear, a layer on the generic rule) the tape pulls back first. p.grad is the
loop's sum of clipped per-sample gradients: convolutions, normalisations, Embeddings (sparse,
padding_idx, scale_grad_by_freq, tied, max_norm), modules called twice, retain_graph, empty batches.
"""

from functools import partial
from typing import Any, Callable

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, overall_scale
from torch import nn

import jacext
from jacext.dp import ClipGrad

from .fused_nets import CONVS, FUSED, ConvNet, assert_clipped, ce_loss, clipped_reference, expected, twins, watch


class ClipConvNet(nn.Module):
    """Conv2d -> BatchNorm2d (eval mode) -> ReLU(inplace=True) -> the 16 positions as a sequence ->
    Conv1d -> GroupNorm -> LayerNorm over the channels -> Linear at every position, called twice ->
    mean over the positions -> head."""

    def __init__(self):
        super().__init__()
        self.conv2, self.bn, self.relu = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        self.conv1, self.gn = nn.Conv1d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.norm, self.mid, self.head = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 3)
        with torch.no_grad():  # statistics and affine parameters that are not the identity
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            for m in (self.bn, self.gn, self.norm):
                m.weight.normal_()
                m.bias.normal_()
        self.bn.eval()

    def forward(self, x):  # (N, 2, 6, 6)
        h = self.relu(self.bn(self.conv2(x))).flatten(2)  # (N, 4, 16)
        h = self.norm(self.gn(self.conv1(h)).transpose(1, 2))  # (N, 16, 4)
        return self.head(self.mid(torch.tanh(self.mid(h))).mean(1))


class ClipTokenNet(nn.Module):
    """Embedding (options ``emb``) -> LayerNorm -> Linear called twice -> a head at every position,
    optionally tied to the Embedding's weight; output (N, T, 30)."""

    def __init__(self, tied=False, **emb):
        super().__init__()
        self.emb, self.norm = nn.Embedding(30, 6, **emb), nn.LayerNorm(6)
        self.mid, self.head = nn.Linear(6, 6), nn.Linear(6, 30, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.mid(torch.tanh(self.mid(self.norm(self.emb(x))))))


class ClipMeetNet(nn.Module):
    """Parameters meeting the batch outside their modules' calls, held there: positions
    ``pos(arange(T))`` added, a class token concatenated, a loose gain; LayerNorm, Linear called
    twice, a head tied functionally to the Embedding's weight; output (N, T, 30)."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(30, 6), nn.Embedding(7, 6)
        self.norm, self.mid = nn.LayerNorm(6), nn.Linear(6, 6)
        self.cls, self.gain = nn.Parameter(torch.randn(1, 1, 6)), nn.Parameter(torch.randn(6))

    def forward(self, x):
        n, t = x.shape
        h = torch.cat([self.cls.expand(n, -1, -1), self.emb(x) + self.pos(torch.arange(t))], 1)
        h = self.mid(torch.tanh(self.mid(self.norm(h)))) * self.gain
        return nn.functional.linear(h[:, 1:], self.emb.weight)


EMBEDDINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "sparse": {"sparse": True},
    "padding_idx": {"padding_idx": 0},
    "scale_grad_by_freq": {"padding_idx": 3, "scale_grad_by_freq": True},
    "sparse_padding_idx": {"sparse": True, "padding_idx": 0},  # torch: no scale_grad_by_freq when sparse
}


CLIP_NETS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "conv": (ClipConvNet, ["conv2", "bn", "conv1", "gn", "norm", "mid", "head"]),
    **{
        f"{tie}{name}": (partial(ClipTokenNet, tie == "tied_", **emb), ["emb", "norm", "mid", "head"])
        for name, emb in EMBEDDINGS.items()
        for tie in ("", "tied_")
    },
    "meets": (ClipMeetNet, ["emb", "norm", "mid"]),
}


def clip_data(net, n, dtype):
    if net == "conv":
        return torch.randn(n, 2, 6, 6, dtype=dtype) * 3, torch.randint(0, 3, (n,))
    x = torch.randint(0, 10, (n, 7))
    x[: min(n, 2), :3] = torch.tensor([0, 3, 3])  # padding indices, and repeats within and across samples
    return x, torch.randint(0, 30, (n, 7))


CLIP_LOSSES = {"sum": ce_loss, "mean": lambda out, y: ce_loss(out, y) / out.shape[0]}


@pytest.mark.parametrize("reduction", CLIP_LOSSES)
@pytest.mark.parametrize("net", CLIP_NETS)
def test_clip_grad_in_one_backward_is_loop_exact(net, reduction, dtype):
    torch.manual_seed(0)
    make, names = CLIP_NETS[net]
    model, plain = twins(make(), dtype)
    x, y = clip_data(net, 5, dtype)
    lossfunc = CLIP_LOSSES[reduction]
    per_sample, grads = expected(plain, lossfunc, y, x)
    bound, clipped, l2 = clipped_reference(per_sample, reduction)
    seen = watch(model, *names)
    with backpack(ClipGrad(bound, loss_reduction=reduction)):
        lossfunc(model(x), y).backward()
    assert seen == {name: [FUSED] * (2 if name == "mid" else 1) for name in names}
    assert jacext.backward_plan(model) == "inline, clipping"
    assert_clipped(model, clipped, l2, dtype, layouts=grads)


@pytest.mark.parametrize("conv", CONVS)
def test_conv_variants_under_clip_grad_in_one_backward(conv, dtype):
    """Every call of ConvNet fused, whatever its positions: the convs' clipped sums from their own
    weight gradient (torch's convolution backward on the input padded as the module pads it)."""
    torch.manual_seed(0)
    make, shape = CONVS[conv]
    model, plain = twins(ConvNet(make(), shape), dtype)
    x, y = torch.randn(5, *shape, dtype=dtype), torch.randint(0, 3, (5,))
    per_sample, _ = expected(plain, ce_loss, y, x)
    bound, clipped, l2 = clipped_reference(per_sample, "sum")
    seen = watch(model, "conv", "tail", "head")
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        ce_loss(model(x), y).backward()
    assert seen == {"conv": [FUSED], "tail": [FUSED], "head": [FUSED]}
    assert jacext.backward_plan(model) == "inline, clipping"
    assert_clipped(model, clipped, l2, dtype)


class Scale(nn.Module):
    """A layer without a hand-written rule: the generic rule serves it."""

    def __init__(self, features):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x * self.scale


class Unfusable(nn.Module):
    """Linear at 16 positions -> tanh -> a call that cannot hang from FusedGrads (nn.Bilinear of two
    inputs, or a layer with the generic rule) -> mean -> head."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.lin, self.head = kind, nn.Linear(4, 4), nn.Linear(4, 3)
        self.odd = nn.Bilinear(4, 4, 4) if kind == "bilinear" else Scale(4)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        h = self.odd(h, x) if self.kind == "bilinear" else self.odd(h)
        return self.head(h.mean(1))


@pytest.mark.parametrize("reduction", CLIP_LOSSES)
@pytest.mark.parametrize("kind", ["bilinear", "generic_rule"])
def test_clip_grad_with_a_call_that_cannot_be_fused_pulls_back_first(kind, reduction, dtype):
    torch.manual_seed(0)
    model, plain = twins(Unfusable(kind), dtype)
    x, y = torch.randn(5, 16, 4, dtype=dtype), torch.randint(0, 3, (5,))
    lossfunc = CLIP_LOSSES[reduction]
    per_sample, _ = expected(plain, lossfunc, y, x)
    bound, clipped, l2 = clipped_reference(per_sample, reduction)
    seen = watch(model, "lin", "odd")
    with backpack(ClipGrad(bound, loss_reduction=reduction)):
        lossfunc(model(x), y).backward()
    assert seen["lin"] == [FUSED] and seen["odd"] != [FUSED]  # the Linear is fused, but not every call
    # (Scale's loose parameter meets the batch: held there, the tape still clips inline)
    assert jacext.backward_plan(model) == ("pull-back" if kind == "bilinear" else "inline, clipping")
    assert_clipped(model, clipped, l2, dtype)


@pytest.mark.parametrize("net", ["conv", "tied_plain", "sparse", "meets"])
def test_clip_grad_with_retain_graph_and_a_second_backward(net, dtype):
    """Both backward passes clip inside themselves: p.grad accumulates twice the clipped sum,
    per_sample_l2 is one backward's."""
    torch.manual_seed(0)
    make, _ = CLIP_NETS[net]
    model, plain = twins(make(), dtype)
    x, y = clip_data(net, 5, dtype)
    per_sample, _ = expected(plain, ce_loss, y, x)
    bound, clipped, l2 = clipped_reference(per_sample, "sum")
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        loss = ce_loss(model(x), y)
        loss.backward(retain_graph=True)
        plans = [jacext.backward_plan(model)]
        assert_clipped(model, clipped, l2, dtype)
        loss.backward()
        plans.append(jacext.backward_plan(model))
    assert plans == ["inline, clipping"] * 2
    assert_clipped(model, clipped, l2, dtype, grad_factor=2.0)


@pytest.mark.parametrize("reduction", CLIP_LOSSES)
@pytest.mark.parametrize("net", ["conv", "tied_plain", "scale_grad_by_freq", "meets"])
def test_clip_grad_on_an_empty_batch_between_full_ones(net, reduction, dtype):
    """N = 0: zero gradients and empty norms (as tests/errors/test_batch_sizes.py expects), also with the
    results of a full batch on the parameters; the next full batch is exact again."""
    torch.manual_seed(0)
    make, _ = CLIP_NETS[net]
    model, plain = twins(make(), dtype)
    plans = []
    for n in (5, 0, 5):
        x, y = clip_data(net, n, dtype)
        lossfunc = CLIP_LOSSES[reduction] if n else ce_loss  # no mean over no sample
        model.zero_grad()
        if n:
            per_sample, _ = expected(plain, lossfunc, y, x)
            bound, clipped, l2 = clipped_reference(per_sample, reduction)
        with backpack(ClipGrad(bound, loss_reduction=reduction)):
            lossfunc(model(x), y).backward()
        plans.append(jacext.backward_plan(model))
        if n:
            assert_clipped(model, clipped, l2, dtype)
        else:
            for p in model.parameters():
                assert p.per_sample_l2.shape == (0,) and torch.equal(p.grad, torch.zeros_like(p))
    assert plans == ["inline, clipping"] * 3


def test_clip_grad_on_an_empty_batch_keeps_a_sparse_gradient_sparse():
    torch.manual_seed(0)
    model, plain = twins(ClipTokenNet(sparse=True), torch.float64)
    x, y = clip_data("sparse", 0, torch.float64)
    ce_loss(plain(x), y).backward()
    with backpack(ClipGrad(1.0, loss_reduction="sum")):
        ce_loss(model(x), y).backward()
    assert model.emb.weight.grad.layout == plain.emb.weight.grad.layout == torch.sparse_coo


class TwiceMaxNorm(nn.Module):
    """An Embedding with max_norm (renormalising its weight in place at every call) called twice."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(20, 4, max_norm=1.0), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.emb(x[:, 0]) + self.emb(x[:, 1]))


def test_clip_grad_with_an_embedding_with_max_norm_called_twice(dtype):
    torch.manual_seed(0)
    model, plain = twins(TwiceMaxNorm(), dtype)
    x, y = torch.randint(0, 20, (5, 2)), torch.randint(0, 3, (5,))
    with torch.no_grad():  # the renormalisation of the rows looked up, done once for both models
        model(x), plain(x)
    per_sample, _ = expected(plain, ce_loss, y, x)
    bound, clipped, l2 = clipped_reference(per_sample, "sum")
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        ce_loss(model(x), y).backward()
    assert_clipped(model, clipped, l2, dtype)


class TwiceWithBilinear(nn.Module):
    """A Bilinear (two inputs: not fused, so ClipGrad pulls back first), then modules called
    twice, whose fused nodes the second call's graph reaches through its input."""

    def __init__(self, inner):
        super().__init__()
        self.first, self.bilinear, self.inner, self.head = nn.Linear(3, 4), nn.Bilinear(4, 4, 4), inner, nn.Linear(4, 2)

    def forward(self, x):
        h = self.first(x)
        h = self.bilinear(h, h)
        return self.head(self.inner(self.inner(h)))


@pytest.mark.parametrize("inner", ["prelu", "layer_norm", "linear"])
@pytest.mark.parametrize("bilinear", [True, False])
def test_clip_grad_with_modules_called_twice_on_both_paths(inner, bilinear, dtype):
    """p.grad is the clipped loop sum, with the separate pull-back (a Bilinear in the model) and
    in one backward: a fused node's parameter gradients never come from autograd on its call's
    graph, which would reach the first call's node too and count its contribution twice."""
    torch.manual_seed(0)
    inner_module = {"prelu": nn.PReLU(), "layer_norm": nn.LayerNorm(4), "linear": nn.Linear(4, 4)}[inner]
    model = TwiceWithBilinear(inner_module).to(dtype)
    if not bilinear:
        model.bilinear = nn.Identity()
        model.forward = lambda x: model.head(model.inner(model.inner(model.first(x))))
    x, y = torch.randn(6, 3, dtype=dtype), torch.randint(0, 2, (6,))
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    per_sample = loop_grad_batch(model, lossfunc, y, x)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in per_sample.values()]).sum(0).sqrt()
    bound = norms.median().item()
    w = (bound / (norms + 1e-6)).clamp(max=1)
    assert (w < 1).any() and (w == 1).any()
    jacext.extend(model)
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        lossfunc(model(x), y).backward()
    clipped = {n: (g * w.view(-1, *[1] * (g.dim() - 1)).to(dtype)).sum(0) for n, g in per_sample.items()}
    scale = overall_scale(clipped)
    for name, p in model.named_parameters():
        assert_close(p.grad, clipped[name], dtype, f"clipped grad of {name}", scale)


class TwoRegimes(nn.Module):
    """A Linear whose per-sample norms come from Gram matrices (2 positions, 16 x 16: the norm rule
    is cheaper) and one whose norm rule would materialise the products (32 positions, 4 x 4: the
    inline plan materialises its results and clips them by their blocks), then a head."""

    def __init__(self):
        super().__init__()
        self.gram, self.products, self.head = nn.Linear(16, 16), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # (N, 2, 16) and (N, 32, 4), as one (N, 2, 16 + 64) input
        a, b = x[:, :, :16], x[:, :, 16:].reshape(x.shape[0], -1, 4)
        return self.head(torch.tanh(self.gram(a)).mean(1)[:, :4] + torch.tanh(self.products(b)).mean(1))


@pytest.mark.parametrize("budget", ["default", "none"])
@pytest.mark.parametrize("reduction", CLIP_LOSSES)
def test_clip_grad_by_norm_rules_and_by_materialised_results(budget, reduction, dtype, monkeypatch):
    """Both ways to the clipped sum of a Linear agree with the loop: by its norm rule and its own
    gradient of the rescaled cotangent, and by its materialised results (where the norm rule would
    not be cheaper, within the plan's budget of bytes; with none, every layer takes its norm rule)."""
    from jacext.engine import plan
    from jacext.engine.results import Results

    if budget == "none":
        monkeypatch.setattr(plan.InlineClipping, "blocks_budget", 0)
    chosen: list = []
    original = Results._materialises_instead
    monkeypatch.setattr(
        Results, "_materialises_instead", lambda self, rec, g: chosen.append(original(self, rec, g)) or chosen[-1]
    )
    torch.manual_seed(0)
    model, plain = twins(TwoRegimes(), dtype)
    x, y = torch.randn(5, 2, 80, dtype=dtype), torch.randint(0, 3, (5,))
    lossfunc = CLIP_LOSSES[reduction]
    per_sample, _ = expected(plain, lossfunc, y, x)
    bound, clipped, l2 = clipped_reference(per_sample, reduction)
    with backpack(ClipGrad(bound, loss_reduction=reduction)):
        lossfunc(model(x), y).backward()
    assert jacext.backward_plan(model) == "inline, clipping"
    # head (one position: norms), products (materialised), gram (norms); none consulted without a budget
    assert chosen == ([False, True, False] if budget == "default" else [])
    assert_clipped(model, clipped, l2, dtype)
