import copy

import pytest
import torch
from backpack import backpack
from reference import check_grad_batch, check_jacobian, loop_grad_batch
from torch import nn

import jacext


class EmbedThenLinear(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.emb = nn.Embedding(7, 3, **options)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.emb(x))


EMBEDDING_OPTIONS = {
    "plain": dict(),
    "padding_idx": dict(padding_idx=0),
    "max_norm": dict(max_norm=0.5),
    "sparse": dict(sparse=True),
    "freq": dict(scale_grad_by_freq=True),
    "freq_padding_max_norm": dict(scale_grad_by_freq=True, padding_idx=0, max_norm=0.5),
}


@pytest.mark.parametrize("options", EMBEDDING_OPTIONS.values(), ids=EMBEDDING_OPTIONS.keys())
@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 2)], ids=["N", "NT", "NAB"])
def test_embedding(options, shape, dtype):
    model = EmbedThenLinear(**options).to(dtype)
    x = torch.randint(0, 7, shape)
    x[0, ...] = 0  # padding index present, and repeated indices within a sample
    check_jacobian(model, x)


def test_embedding_alone(dtype):
    check_jacobian(nn.Embedding(5, 2, padding_idx=4).to(dtype), torch.tensor([[4, 1, 1], [0, 4, 2]]))


def test_embedding_freq_grad_batch(dtype):
    model = EmbedThenLinear(scale_grad_by_freq=True).to(dtype)
    x = torch.tensor([[1, 2, 1], [1, 3, 5], [2, 2, 6]])
    check_grad_batch(model, nn.MSELoss(), torch.randn(3, 3, 2, dtype=dtype), x)


def test_scale_grad_by_freq_counts_over_the_whole_batch():
    emb = nn.Embedding(4, 1, scale_grad_by_freq=True).double()
    got = jacext.jacobian(emb, torch.tensor([[1, 2], [1, 1]]))["weight"]  # (N, T, D, E, D)
    expected = torch.zeros(2, 2, 1, 4, 1, dtype=torch.float64)
    expected[0, 0, 0, 1, 0] = expected[1, 0, 0, 1, 0] = expected[1, 1, 0, 1, 0] = 1 / 3  # 1 occurs 3 times in x
    expected[0, 1, 0, 2, 0] = 1.0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


class BagThenLinear(nn.Module):
    """Calls the bag with keyword arguments (the root-level tests call it positionally)."""

    def __init__(self, mode, **options):
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 3, mode=mode, **options)
        self.lin = nn.Linear(3, 2)

    def forward(self, x, offsets=None, per_sample_weights=None):
        return self.lin(self.bag(x, offsets=offsets, per_sample_weights=per_sample_weights))


def bag_inputs(form):
    """Bags with padding (0) among other entries, a repeated index, only padding, and (1-D) empty bags."""
    if form == "2d":
        x = torch.randint(0, 7, (4, 3))
        x[0] = 0
        x[1] = torch.tensor([0, 4, 4])
        return x, None
    x = torch.randint(0, 7, (9,))
    x[:3] = torch.tensor([0, 4, 4])
    x[7:] = 0
    offsets = [0, 0, 3, 3, 7] + ([9] if form == "last_offset" else [])  # empty, x[:3], empty, x[3:7], x[7:]
    return x, torch.tensor(offsets)


BAG_CASES = {
    "sum": ("sum", dict(), False),
    "sum_padding": ("sum", dict(padding_idx=0), False),
    "sum_max_norm": ("sum", dict(max_norm=0.5), False),
    "sum_freq": ("sum", dict(scale_grad_by_freq=True), False),
    "sum_weights": ("sum", dict(), True),
    "sum_weights_padding_freq": ("sum", dict(padding_idx=0, scale_grad_by_freq=True), True),
    "mean": ("mean", dict(), False),
    "mean_padding": ("mean", dict(padding_idx=0), False),
    "mean_max_norm": ("mean", dict(max_norm=0.5), False),
    "mean_padding_freq": ("mean", dict(padding_idx=0, scale_grad_by_freq=True), False),
    "max": ("max", dict(), False),
    "max_padding": ("max", dict(padding_idx=0), False),
    "max_max_norm": ("max", dict(max_norm=0.5), False),
}


@pytest.mark.parametrize("case", BAG_CASES.values(), ids=BAG_CASES.keys())
@pytest.mark.parametrize("form", ["2d", "offsets", "last_offset"])
def test_embedding_bag(case, form, dtype):
    mode, options, weighted = case
    x, offsets = bag_inputs(form)
    model = BagThenLinear(mode, include_last_offset=form == "last_offset", **options).to(dtype)
    weights = torch.randn(x.shape, dtype=dtype) if weighted else None
    check_jacobian(model, x, offsets, weights)


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_alone(mode, include_last_offset, dtype):
    """Root module, positional arguments, int32 indices and offsets. With include_last_offset and a
    last offset short of len(x), torch's last bag runs to the end of x: bags x[:3], x[3:3], x[3:]."""
    bag = nn.EmbeddingBag(5, 2, mode=mode, padding_idx=4, include_last_offset=include_last_offset).to(dtype)
    x = torch.tensor([4, 1, 1, 3, 0, 2, 4], dtype=torch.int32)
    check_jacobian(bag, x, torch.tensor([0, 3, 3, 6], dtype=torch.int32))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_grad_batch(mode, dtype):
    x, offsets = bag_inputs("offsets")
    model = BagThenLinear(mode, padding_idx=0).to(dtype)
    check_grad_batch(model, nn.CrossEntropyLoss(), torch.tensor([0, 1, 1, 0, 1]), x, offsets)


class Weighted(nn.Module):
    """y[n] = head(sum_t w[n, t] W[x[n, t]]), w an input without gradient."""

    def __init__(self, **options):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4, **options), nn.Linear(4, 3)

    def forward(self, x, w):
        return self.head((self.emb(x) * w[..., None]).sum(1))


def cancelling_weights(x):
    """Per sample and index, the occurrences (in order) weigh +c, -c, +c, -c, ... with a large c
    of the index, and the last one or two 1 and 0.5: the index's gradient row is small next to
    the rows it sums, and (pairs cancelling exactly) has no float32 error of its own."""
    large = torch.tensor([1000.0, 3001.0, 777.0, 1234.5, 2049.0, 999.0, 4321.0])
    w = torch.zeros(x.shape)
    for n in range(x.shape[0]):
        for e in x[n].unique():
            where = (x[n] == e).nonzero().squeeze(1)
            pairs = 2 * ((len(where) - 1) // 2)
            w[n, where[:pairs]] = large[e] * torch.tensor([1.0, -1.0]).repeat(pairs // 2)
            w[n, where[pairs:]] = torch.tensor([1.0, 0.5])[: len(where) - pairs]
    return w


def linear_loss(out, y):
    """Its gradient y does not depend on the output, whose float32 sums have cancelled too."""
    return (out * y).sum()


@pytest.mark.parametrize(
    "options", [dict(), dict(padding_idx=0, scale_grad_by_freq=True)], ids=["plain", "padding_freq"]
)
def test_embedding_norms_are_accurate_in_float32(options):
    """Many repeated indices with large, cancelling gradient rows: the norm rule sums an index's
    rows before squaring. The former rule expanded the square into products of rows, whose
    float32 sum lost the small result (relative errors up to ~1e-1 here, against ~1e-7 now)."""
    x = torch.randint(0, 4, (6, 47))
    w = cancelling_weights(x)
    y = torch.randn(6, 3)
    model = Weighted(**options)
    reference = copy.deepcopy(model).double()
    expected = loop_grad_batch(reference, linear_loss, y.double(), x, w.double())["emb.weight"]
    expected = expected.flatten(1).square().sum(1)
    jacext.extend(model)
    with backpack(jacext.BatchL2Grad()):
        linear_loss(model(x, w), y).backward()
    got = model.emb.weight.batch_l2
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(4,), (3, 0), (2, 3, 2)], ids=["N", "empty_samples", "NAB"])
def test_embedding_norms_of_any_input_shape(shape):
    """BatchL2Grad alone (the norm rule) on 1-D inputs, samples without entries and N-D inputs."""
    model = EmbedThenLinear(padding_idx=0, scale_grad_by_freq=True).double()
    x = torch.randint(0, 7, shape)
    y = torch.randn(*shape, 2, dtype=torch.float64)
    expected = loop_grad_batch(model, nn.MSELoss(reduction="sum"), y, x)["emb.weight"].flatten(1).square().sum(1)
    jacext.extend(model)
    with backpack(jacext.BatchL2Grad()):
        nn.MSELoss(reduction="sum")(model(x), y).backward()
    torch.testing.assert_close(model.emb.weight.batch_l2, expected, rtol=1e-10, atol=1e-12)
