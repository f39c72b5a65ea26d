"""Batched values written into tensors made without the batch (a factory of the batch's shape:
``new_zeros(x.shape)``, ``zeros_like(x)``, ``torch.zeros(N, T)``), factory tensors of that shape
that never receive batched values (attention masks), and layers that read batched inputs only
for their shape: BatchGrad, BatchL2Grad, BatchJacobian and ClipGrad against the loops, with N
equal to the length."""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian
from torch import nn

import jacext
from jacext.dp import ClipGrad

N = T = 6
V, D, C = 9, 4, 3
PAD, START = 1, 2


def _check(model, x, dtype):
    """BatchGrad + BatchL2Grad (inline), BatchJacobian (pull-back) and ClipGrad against the loops."""
    y = torch.randint(0, C, (N,))
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    grads, jacobians = loop_grad_batch(model, lossfunc, y, x), loop_jacobian(model, x)
    scale = max(g.abs().max() for g in grads.values())
    jacext.extend(model)
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, grads[name], dtype, name, scale)
        assert_close(p.batch_l2, grads[name].flatten(1).square().sum(1), dtype, name, scale**2)
    with backpack(jacext.BatchJacobian()):
        out = model(x)
        out.backward(torch.ones_like(out))
    for name, p in model.named_parameters():
        assert_close(p.jacobian, jacobians[name], dtype, name)
    norms = sum(g.flatten(1).square().sum(1) for g in grads.values()).sqrt()
    bound = float(norms.median())
    weights = (bound / (norms + 1e-6)).clamp(max=1)
    model.zero_grad()
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        expected = torch.einsum("n,n...->...", weights.to(dtype), grads[name])
        assert_close(p.grad if p.grad is not None else torch.zeros_like(p), expected, dtype, name, scale)


def _ids():
    ids = torch.randint(3, V, (N, T))
    ids[::2, -2:] = -100  # ignored labels, as the loss would skip them
    return ids


class ShiftRight(nn.Module):
    """HuggingFace's shift_tokens_right of batched labels into a fresh tensor, then embedded:
    the decoder's inputs carry the batch of the labels."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.tok, self.pos, self.head = nn.Embedding(V, D), nn.Embedding(T, D), nn.Linear(D, C)

    def forward(self, labels):
        if self.how == "new_zeros":
            shifted = labels.new_zeros(labels.shape)
        elif self.how == "zeros_like":
            shifted = torch.zeros_like(labels)
        else:  # a factory of the batch's sizes, from numbers
            shifted = torch.zeros(labels.shape[0], labels.shape[1], dtype=labels.dtype)
        if self.how == "copy_":
            shifted[:, 1:].copy_(labels[:, :-1])
        else:
            shifted[:, 1:] = labels[:, :-1].clone()
        shifted[:, 0] = START
        shifted.masked_fill_(shifted == -100, PAD)
        h = self.tok(shifted) + self.pos(torch.arange(labels.shape[1]))
        return self.head(h).mean(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("how", ["new_zeros", "zeros_like", "zeros", "copy_"])
def test_ids_shifted_into_a_fresh_tensor(how, dtype):
    torch.manual_seed(0)
    _check(ShiftRight(how).to(dtype), _ids(), dtype)


class Masked(nn.Module):
    """A mask of the batch's sizes, multiplying the batch and through a layer of its own whose
    output meets the batch: the same for all samples (written, but not with batched values), or
    per sample, at places that batched ids choose."""

    def __init__(self, per_sample):
        super().__init__()
        self.per_sample = per_sample
        self.tok, self.gate, self.head = nn.Embedding(V, D), nn.Linear(1, D), nn.Linear(D, C)

    def forward(self, ids):
        mask = torch.ones(ids.shape[0], ids.shape[1], dtype=self.gate.weight.dtype)
        if self.per_sample:
            mask[ids == PAD] = 0
        else:
            mask[:, -1] = 0
        h = self.tok(ids) * mask[..., None] + self.gate(mask[..., None])
        return self.head(h).mean(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per sample"])
def test_factory_mask_of_the_batch_sizes(per_sample, dtype):
    torch.manual_seed(0)
    ids = torch.randint(0, V, (N, T))
    ids[1, 2:] = PAD
    _check(Masked(per_sample).to(dtype), ids, dtype)


class ShapePositions(nn.Embedding):
    """BART's learned positions: the batched ids only for their shape, (1, T, D) from arange."""

    def forward(self, ids):
        return super().forward(torch.arange(ids.shape[1]))[None]


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return 2 * w

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class FunctionPositions(nn.Module):
    """Positions through an autograd.Function (a call the generic rule differentiates), the
    batched ids read for their shape only: the call has no batch, whatever its input has."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(T, D))

    def forward(self, ids, with_batch=False):
        pos = _Twice.apply(self.weight)[: ids.shape[1]][None]
        return (pos, pos * ids[..., None]) if with_batch else pos


class Positions(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.tok, self.head = nn.Embedding(V, D), nn.Linear(D, C)
        self.pos = ShapePositions(T, D) if how == "embedding" else FunctionPositions()

    def forward(self, ids):
        return self.head(self.tok(ids) + self.pos(ids)).mean(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("how", ["embedding", "function"])
def test_layer_reading_the_batch_for_its_shape(how, dtype):
    torch.manual_seed(0)
    _check(Positions(how).to(dtype), torch.randint(0, V, (N, T)), dtype)


def test_call_returning_outputs_with_and_without_the_batch_is_refused():
    class Both(Positions):
        def forward(self, ids):
            pos, scaled = self.pos(ids, with_batch=True)
            return self.head(self.tok(ids) + pos + scaled).mean(1)

    model = jacext.extend(Both("function"))
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match=r"module 'pos'.*\(1, 6, 4\)"):
        model(torch.randint(0, V, (N, T)))


class Part(nn.Module):
    """Batched values written into some rows of a fresh tensor along the batch dimension."""

    def __init__(self, into, rows):
        super().__init__()
        self.into, self.rows = into, rows
        self.lin, self.head = nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, x):
        h = self.lin(x)
        buf = h.new_zeros(h.shape)
        buf[self.into] = h[self.rows]
        return self.head(buf).mean(1)


@pytest.mark.parametrize("into", ["some", "all"])
def test_write_into_rows_of_the_batch_dimension(into):
    """Each sample written into its own row (the others constant, each its own row's sample)."""
    torch.manual_seed(0)
    rows = slice(1, 3) if into == "some" else torch.randperm(N)
    _check(Part(rows, rows).double(), torch.randn(N, T, D, dtype=torch.float64), torch.float64)


def test_write_into_rows_of_other_samples_is_refused():
    model = jacext.extend(Part(torch.tensor([3, 1]), torch.tensor([0, 2])))
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="module 'head'.*rows of others"):
        model(torch.randn(N, T, D))


class Seq2Seq(nn.Module):
    """An encoder output and the logits computed from it, both returned with the samples first
    (HuggingFace's encoder_last_hidden_state), and a loss computed inside from the logits alone
    or from both."""

    def __init__(self, both=False):
        super().__init__()
        self.both = both
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.enc, self.head = nn.Linear(D, D), nn.Linear(D, C)

    def forward(self, ids, y=None):
        hidden = torch.tanh(self.enc(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))))
        logits = self.head(hidden).mean(1)
        out = {"logits": logits, "hidden": hidden}
        if y is not None:
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            out["loss"] = loss + hidden.square().sum() if self.both else loss
        return out


@pytest.mark.parametrize("inside", [True, False], ids=["loss inside", "loss outside"])
def test_output_leaf_reached_through_another(inside):
    """The backward from the logits reaches the encoder output's original too: one start of the
    plan, not two (ClipGrad clips inline here, positions meeting the batch through HeldFree)."""
    torch.manual_seed(0)
    model = Seq2Seq().double()
    ids, y = torch.randint(0, V, (N, T)), torch.randint(0, C, (N,))
    lossfunc = nn.CrossEntropyLoss(reduction="sum")

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids)["logits"]

    grads = loop_grad_batch(Logits(), lossfunc, y, ids)
    grads = {name.removeprefix("model."): g for name, g in grads.items()}
    norms = sum(g.flatten(1).square().sum(1) for g in grads.values()).sqrt()
    bound = float(norms.median())
    weights = (bound / (norms + 1e-6)).clamp(max=1)
    jacext.extend(model)

    def loss():
        return model(ids, y)["loss"] if inside else lossfunc(model(ids)["logits"], y)

    with backpack(jacext.BatchGrad()):
        loss().backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, grads[name], torch.float64, name)
    model.zero_grad()
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        loss().backward()
    assert jacext.backward_plan(model) == "inline, clipping"
    for name, p in model.named_parameters():
        assert_close(p.grad, torch.einsum("n,n...->...", weights, grads[name]), torch.float64, name)


def test_loss_inside_reaching_two_output_leaves_clips_inline():
    """A loss computed inside from the logits and the encoder output: ClipGrad's inline plan
    catches every layer's cotangent as the one backward passes, exact against the loop."""
    torch.manual_seed(0)
    model = Seq2Seq(both=True).double()
    ids, y = torch.randint(0, V, (N, T)), torch.randint(0, C, (N,))
    per_sample = []
    for n in range(N):
        model.zero_grad()
        model(ids[n : n + 1], y[n : n + 1])["loss"].backward()
        per_sample.append({name: p.grad.clone() for name, p in model.named_parameters()})
    norms = torch.stack([sum(g.square().sum() for g in grads.values()) for grads in per_sample]).sqrt()
    bound = float(norms.median())
    weights = (bound / (norms + 1e-6)).clamp(max=1)
    model.zero_grad()
    jacext.extend(model)
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        model(ids, y)["loss"].backward()
    assert jacext.backward_plan(model) == "inline, clipping"
    for name, p in model.named_parameters():
        expected = sum(w * grads[name] for w, grads in zip(weights, per_sample, strict=True))
        assert_close(p.grad, expected, torch.float64, name)


def test_loss_inside_reaching_two_output_leaves_is_refused_by_the_pull_back():
    """The same under create_graph=True, where ClipGrad pulls back first: each output leaf would
    start the pull-back, so it refuses."""
    model = jacext.extend(Seq2Seq(both=True))
    with backpack(ClipGrad(1.0, loss_reduction="sum")), pytest.raises(jacext.JacextError, match="several per-sample"):
        model(torch.randint(0, V, (N, T)), torch.randint(0, C, (N,)))["loss"].backward(create_graph=True)
    assert all(p.grad is None for p in model.parameters())
