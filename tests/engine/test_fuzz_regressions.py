"""Bugs the fuzzer (tests/fuzz) found: in the batch tracker (jacext/engine/batch.py), and
results of an earlier batch left in place by a refusal at forward time (jacext/engine/hooks.py).

A leak between models: tests run models one after the other, as a hypothesis worker runs its
examples, from an empty cache of the tracker's probes (``BatchTracker._probed``, shared by
every model of the process). A batch of one sample, whose probes cannot tell the batch's
dimension from others. Each model's Jacobians are compared with the loop of
``tests/reference.py``, its per-sample gradients with the loop too.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import jacext
from jacext.dp import ClipGrad
from jacext.engine.batch import BatchTracker


@pytest.fixture(autouse=True)
def _empty_probe_cache(monkeypatch):
    monkeypatch.setattr(BatchTracker, "_probed", {})


def check(model, x):
    expected = loop_jacobian(model, x)
    for name, value in jacext.jacobian(model, x).items():
        assert_close(value, expected[name], torch.float64, name)
    loss = nn.MSELoss(reduction="sum")
    y = torch.randn(model(x).shape, dtype=torch.float64)
    expected = loop_grad_batch(model, loss, y, x)
    jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        loss(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], torch.float64, name)


class Packed(nn.Module):
    """A bidirectional RNN on sequences packed by the lengths ``(x[..., 0] > 0).sum(1)``
    (unsorted), padded back, flattened, and a Linear."""

    def __init__(self, hidden):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, bidirectional=True, batch_first=True)
        self.head = nn.Linear(3 * 2 * hidden, 2)

    def forward(self, x):
        lengths = (x[..., 0] > 0).sum(1)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]
        return self.head(out.flatten(1))


def sequences(lengths):
    x = torch.randn(len(lengths), 3, 2, dtype=torch.float64)
    x[..., 0] = torch.tensor([[1.0 if t < n else -1.0 for t in range(3)] for n in lengths])
    return x


def test_packed_sequences_of_the_same_shape_with_other_lengths():
    """Found by the fuzzer (InstanceNorm1d -> packed bidirectional RNN -> Flatten -> Linear, wrong
    by 1.7 only after other examples): the tracker cached how index_select and
    _pack_padded_sequence move the batch by the shapes of their arguments, not by the values
    of the sorting indices and the lengths; a second model on inputs of the same shape but
    other lengths got the first one's order of samples, and the head's per-sample Jacobians
    went to the wrong samples (the packing's padded-back output keyed differently, with a
    hidden size of 2, so that the stale orders did not cancel)."""
    check(Packed(1).double(), sequences([1, 3, 2]))
    check(Packed(2).double(), sequences([3, 2, 1]))


class Reordered(nn.Module):
    """The samples reordered by a buffer of indices, a Linear, and the order restored."""

    def __init__(self, order):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.register_buffer("order", torch.tensor(order))
        self.register_buffer("back", torch.argsort(self.order))

    def forward(self, x):
        return self.fc(x.index_select(0, self.order)).index_select(0, self.back)


def test_indices_of_the_same_shape_with_other_values():
    """The same cache, for any operation whose integer arguments move the batch: a second model
    that reorders its samples otherwise must not get the first one's order."""
    x = torch.randn(3, 2, dtype=torch.float64)
    check(Reordered([1, 2, 0]).double(), x)
    check(Reordered([2, 0, 1]).double(), x)


class PackedInto(nn.Module):
    """A packed GRU (features F, hidden 2) followed by a layer with a rule on its padded output."""

    def __init__(self, features, layer):
        super().__init__()
        self.rnn, self.layer = nn.GRU(features, 2, batch_first=True), layer

    def forward(self, x):
        lengths = (x[..., 0] > 0).sum(1).clamp(min=1)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]
        return self.layer(out).flatten(1)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear = nn.Bilinear(2, 2, 2)

    def forward(self, x):
        return self.bilinear(x, torch.tanh(x))


class Folded(nn.Module):
    """The positions folded into the batch, x.reshape(-1, F), for the layer, and unfolded."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], -1)


class Squared(nn.Module):
    """No hand-written rule (the generic rule): x (W * W)^T."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return x @ (self.W * self.W).T


@pytest.mark.parametrize(
    "make,shape",
    [(lambda: PackedInto(1, nn.PReLU()), (3, 1)), (lambda: PackedInto(1, Pair()), (3, 1)),
     (lambda: Folded(nn.Linear(3, 2)), (2, 3)), (lambda: Folded(Squared()), (2, 3))],
    ids=["packed_prelu", "packed_bilinear", "folded_linear", "folded_generic"],
)
@pytest.mark.parametrize("n", [1, 3])
def test_a_batch_of_one_sample(make, shape, n):
    """Found by the fuzzer (packed RNN -> PReLU or Bilinear, N = 1: "receives the batch in
    dimension 2", a shape error in the rule, "whose first dimension is not the batch"): with one
    sample, the probe of the packed rows (T, 1) showed the sample in both dimensions and the
    tracker chose the one of size 1, the features; a fold x.reshape(-1, 3) of (1, 2, 3) put the
    batch in the longer dimension, the features. The packing is known to put the batch in dim 0,
    a fold keeps it where it was, and a layer with a rule reads a single sample where it expects
    its batch, every row of it the sample's."""
    x = torch.randn(n, *shape, dtype=torch.float64)
    x[0, :, 0] = torch.tensor([1.0, 1.0, -1.0][: shape[0]])  # a packed length of 2
    check(make().double(), x)


class Bags(nn.Module):
    """EmbeddingBag (max) on the tokens >= 0 of each sample, flattened, with offsets."""

    def __init__(self, layer):
        super().__init__()
        self.bag, self.layer = nn.EmbeddingBag(2, 2, mode="max"), layer

    def forward(self, x):
        keep = x >= 0
        counts = keep.sum(1)
        return self.layer(self.bag(x[keep], torch.cat([counts.new_zeros(1), counts.cumsum(0)])[:-1]))


class Scale(nn.Module):
    """No hand-written rule (the generic rule): x * w."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return x * self.w


def test_embedding_bags_that_are_all_empty():
    """Found by the fuzzer: with every bag empty the flat tokens have no entries, so their layout
    is unknown, and the bags' output (one per sample) got none either: the generic rule of the
    next module, left to read the batch from its input's leading dimension, read it from none
    (a shape error)."""
    model = nn.Sequential(Bags(Scale()), nn.Linear(2, 2)).double()
    check(model, torch.full((2, 1), -1))
    check(model, torch.tensor([[-1], [1]]))
    check(model, torch.full((1, 1), -1))  # one sample: the bag's rule reads the offsets, not the 0 tokens


class TiedBags(nn.Module):
    """EmbeddingBag (max, max_norm) of one-dimensional rows: renormalised, the rows hold equal
    maxima (+-max_norm), and torch's kernels take the first row of a bag that holds it."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(6, 1, mode="max", max_norm=0.5)
        with torch.no_grad():
            self.bag.weight.copy_(torch.tensor([[2.0], [2.0], [-2.0], [0.25], [2.0], [-2.0]]))

    def forward(self, x):
        return self.bag(x) * 2


def test_embedding_bag_max_over_equal_rows_takes_the_first_as_torch_does():
    """Found by the fuzzer (seed 942, float32): where two rows of a bag hold the maximum, the rule
    took the one of the larger index, torch the first in the bag, so grad_batch did not sum to
    p.grad."""
    x = torch.tensor([[4, 0, 1], [1, 4, 3], [3, 5, 2], [2, 2, 5]])
    model = TiedBags().double()
    check(model, x)
    model.zero_grad()
    with backpack(jacext.BatchGrad()):
        model(x).sum().backward()
    assert_close(model.bag.weight.grad_batch.sum(0), model.bag.weight.grad, torch.float64, "sum of grad_batch")


class CrossAttention(nn.Module):
    """Seq-first cross-attention (kdim = vdim = 1) with a per-sample float mask, N = L = S = E = 2."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(2, 1, bias=False, kdim=1, vdim=1)

    def forward(self, x):
        mask = -F.softplus(x[..., :1] - x.flip(1)[..., :1].transpose(1, 2))
        x = x.transpose(0, 1)
        key = x.flip(0)[..., :1]
        return self.mha(x, key, key, attn_mask=mask, need_weights=False)[0].transpose(0, 1).flatten(1)


def test_attention_whose_arguments_broadcast_by_chance():
    """Found by the fuzzer: with all sizes equal, the arguments of multi_head_attention_forward
    broadcast to its output's shape, and the tracker took it for an elementwise operation of
    inputs with the batch in different dimensions (the seq-first query, the batch-first mask):
    "combines several samples". Layer functions are known by name before shapes are compared."""
    check(nn.Sequential(CrossAttention(), nn.Linear(4, 2)).double(), torch.randn(2, 2, 2, dtype=torch.float64))


def test_a_refusal_in_the_forward_leaves_no_result_of_an_earlier_batch():
    """Found by the fuzzer's refusals (then of a complex parameter, now exact): a module refused
    as the forward records it (here a BatchNorm switched to batch statistics without a
    ``batchnorm=`` choice), while the other parameters kept the results of the batch before (4
    samples, where the refused batch had 5). A forward pass that raises drops every result of
    the model."""
    model = jacext.extend(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double())
    model[1].eval()
    with backpack(jacext.BatchGrad()):
        model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    assert all(hasattr(p, "grad_batch") for p in model.parameters())
    model.zero_grad(set_to_none=True)
    model[1].train()
    with pytest.raises(jacext.JacextError, match="batchnorm="), backpack(jacext.BatchGrad()):
        model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    assert not any(hasattr(p, "grad_batch") or p.grad is not None for p in model.parameters())


class _LastStep(nn.Module):
    """An RNN's last output into a Linear: the final hidden state gets no cotangent."""

    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.RNN(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class _ToComplex(nn.Module):
    def forward(self, x):
        return torch.complex(x, torch.tanh(x))


@pytest.mark.parametrize("extension", ["BatchGrad", "BatchL2Grad"])
def test_zero_cotangents_of_a_layer_take_its_dtype_not_the_outputs(extension):
    """A recorded output without a cotangent (the RNN's final state) is filled with zeros of
    that output's dtype, not the model output's (complex here, of real parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(_LastStep(), _ToComplex()).double()
    x, y = torch.randn(5, 5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.complex128)

    def loss(out, y):
        return (out - y).abs().square().sum()

    expected = loop_grad_batch(model, loss, y, x)
    jacext.extend(model)
    with backpack(getattr(jacext, extension)()):
        loss(model(x), y).backward()
    for name, p in model.named_parameters():
        if extension == "BatchGrad":
            assert_close(p.grad_batch, expected[name], torch.float64, name)
        else:
            assert_close(p.batch_l2, expected[name].flatten(1).square().sum(1), torch.float64, name)


class SelfAttention(nn.Module):
    def __init__(self, e, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(e, heads, batch_first=True, dtype=torch.float64)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("positions", [1, 3])
def test_attention_in_the_batched_pull_back_of_batch_statistics(positions):
    """Found by the fuzzer: with batchnorm="exact" the samples are coupled, so BatchGrad pulls
    N seeds back at once (autograd's is_grads_batched, a vmap of the backward), through the
    fused MultiheadAttention's own backward: its cache of pull-backs keyed by memory met a
    batched cotangent without storage, and its reshapes were flatten/unflatten, which that vmap
    cannot batch. Reference: every sample's loss of the whole batch's forward, differentiated."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm1d(positions, dtype=torch.float64),
        nn.Linear(5, 4, dtype=torch.float64),
        SelfAttention(4, 2),
        nn.Linear(4, 1, dtype=torch.float64),
    )
    x = torch.randn(4, positions, 5, dtype=torch.float64)
    reference = copy.deepcopy(model)
    losses = reference(x).square().flatten(1).sum(1)
    expected = {
        name: torch.stack([torch.autograd.grad(losses[n], p, retain_graph=True)[0] for n in range(len(x))])
        for name, p in reference.named_parameters()
    }
    jacext.extend(model, batchnorm="exact")
    with backpack(jacext.BatchGrad()):
        model(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], torch.float64, name)


@pytest.mark.parametrize("make", [jacext.BatchGrad, lambda: ClipGrad(0.05)], ids=["BatchGrad", "ClipGrad"])
def test_attention_on_an_empty_batch(make):
    """Found by the fuzzer: the attention's reshapes must not infer a size from 0 elements."""
    model = jacext.extend(nn.Sequential(SelfAttention(2, 1), nn.Flatten(), nn.Linear(6, 1, dtype=torch.float64)))
    x = torch.randn(0, 3, 2, dtype=torch.float64)
    with backpack(make()):
        model(x).sum().backward()
    for p in model.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
        if isinstance(make(), jacext.BatchGrad):
            assert p.grad_batch.shape == (0, *p.shape)
