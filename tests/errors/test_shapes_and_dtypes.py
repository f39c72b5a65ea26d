"""Inputs without a batch dimension, inputs and targets of another dtype, outputs that are not
(N, ...) or not a tensor: a clear error (jacext's or torch's) before anything is written.
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch
from torch import nn

import jacext

from .common import EXTENSIONS, mlp, nothing_left_behind, untouched


class Unpack(nn.Module):
    """The first output of a module that returns a tuple (GRU, MultiheadAttention)."""

    def __init__(self, inner, *, attention=False):
        super().__init__()
        self.inner, self.attention = inner, attention

    def forward(self, x):
        return (self.inner(x, x, x) if self.attention else self.inner(x))[0]


UNBATCHED = {  # (model, an input torch accepts without a batch dimension)
    "Linear": (lambda: nn.Linear(4, 3), lambda: torch.randn(4)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3), lambda: torch.randn(2, 5, 5)),
    "LayerNorm": (lambda: nn.LayerNorm(4), lambda: torch.randn(4)),
    "Embedding": (lambda: nn.Embedding(5, 3), lambda: torch.tensor(2)),
    "GRU": (lambda: Unpack(nn.GRU(3, 2, batch_first=True)), lambda: torch.randn(5, 3)),
    "MultiheadAttention": (lambda: Unpack(nn.MultiheadAttention(4, 2), attention=True), lambda: torch.randn(5, 4)),
}


@pytest.mark.parametrize(
    "layer,make",
    [pytest.param(layer, EXTENSIONS[e], id=f"{layer}-{e}") for layer in UNBATCHED for e in EXTENSIONS],
)
def test_input_without_batch_dimension_is_a_clear_error(layer, make):
    """Refused as the forward records it (rules with a min_dim), or at the latest in the backward
    before the model's own (GRU), so that p.grad and the attributes stay untouched."""
    build, data = UNBATCHED[layer]
    model = jacext.extend(build())
    ext = make()
    with backpack(ext):
        with pytest.raises(jacext.JacextError, match=rf"{layer} got an (unbatched )?input of shape .*batch dimension"):
            model(data()).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()


@pytest.mark.parametrize(
    "x", [torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3, 4))], ids=["float64", "int64"]
)
def test_input_of_another_dtype_is_torchs_error_and_leaves_nothing_behind(x):
    model = jacext.extend(mlp())
    with backpack(jacext.BatchGrad()):
        with pytest.raises(RuntimeError, match="dtype"):
            model(x)
        assert nothing_left_behind()
        model(x.float()).sum().backward()
    assert model[0].weight.grad_batch.shape == (3, 5, 4)


def test_integer_regression_targets_give_the_results_of_float_targets():
    model = mlp().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4, 3))
    expected = loop_grad_batch(model, nn.MSELoss(), y.double(), x)
    jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        nn.MSELoss()(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], torch.float64, name)


def test_targets_of_the_wrong_dtype_are_torchs_error_and_change_nothing():
    model = jacext.extend(mlp())
    with backpack(jacext.BatchGrad()), pytest.raises(RuntimeError, match="target"):
        nn.CrossEntropyLoss()(model(torch.randn(3, 4)), torch.tensor([0.0, 1.0, 2.0])).backward()
    assert untouched(model, jacext.BatchGrad()) and nothing_left_behind()


class Reduced(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.lin, self.how = nn.Linear(4, 3), how

    def forward(self, x):
        out = self.lin(x)
        return {"scalar": out.sum(), "mean": out.mean(0), "transposed": out.T, "flat": out.reshape(-1)}[self.how]


@pytest.mark.parametrize(
    "how,make",
    [pytest.param("scalar", EXTENSIONS[e], id=f"scalar-{e}") for e in EXTENSIONS]
    + [
        pytest.param(how, EXTENSIONS[e], id=f"{how}-{e}")
        for how in ("mean", "transposed", "flat")
        for e in ("BatchJacobian", "ClipGrad")
    ],
)
def test_output_that_is_not_n_by_anything_is_a_clear_error(how, make):
    """The extended module must return (N, ...) (docs/index.md); a model that reduces, moves or
    flattens the batch dimension gets an error naming the output's shape. (BatchGrad and
    BatchL2Grad take the samples from the layers' inputs and return per-sample gradients there.)"""
    model = jacext.extend(Reduced(how))
    ext = make()
    with backpack(ext):
        with pytest.raises(jacext.JacextError, match=r"shape \(.*\).*batch"):
            model(torch.randn(5, 4)).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x), x


def test_tuple_output_differentiates_its_per_sample_leaf():
    """A tuple (or dict, or ModelOutput) is returned as it is; BatchJacobian differentiates its
    first leaf with a gradient that holds the samples first."""
    model = jacext.extend(TwoOutputs())
    x = torch.randn(3, 2)
    with backpack(jacext.BatchJacobian()):
        out, same = model(x)
        assert same is x
        out.sum().backward()
    expected = torch.einsum("ij,nk->nijk", torch.eye(2), x)
    torch.testing.assert_close(model.lin.weight.jacobian, expected)


def test_output_without_per_sample_leaf_is_a_clear_error():
    class LossOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return {"loss": self.lin(x).square().mean()}

    model = jacext.extend(LossOnly())
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="holds the samples in its first"):
        model(torch.randn(3, 2))
