"""Property-based tests: random architectures from every supported layer against the autograd loops.

Hypothesis assembles small models (``models.py``) from Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d,
BatchNorm1d/2d/3d (eval), LayerNorm and RMSNorm (over up to three trailing dims), GroupNorm,
InstanceNorm1d/2d/3d, PReLU, Bilinear, Embedding, EmbeddingBag, MultiheadAttention, RNN/LSTM/GRU
(batch_first both ways, bidirectional, packed) and their cells, custom modules served by the
generic rule, parameter-free code, residual additions, modules called twice, tied weights, unused
and frozen parameters, with random shapes, options, batch sizes (N = 0 and 1 included), float32
and float64, on the CPU and on CUDA where available. One backward pass with BatchJacobian,
BatchGrad and BatchL2Grad, one with a random subset of them in random order (BatchL2Grad without
BatchGrad: the norm rules), and ``jacext.jacobian`` (also ``flat=True``) are compared with the
loops of ``tests/reference.py``; ``p.grad`` with a backward pass without jacext. Sizes stay tiny:
the oracle runs N * C backward passes. Profiles (number of examples): ``conftest.py`` and
``models.examples``. Other properties: ``test_batchnorm_train.py`` (BatchNorm with batch
statistics), ``test_clip.py`` (``jacext.dp.ClipGrad``), ``test_with_backpack.py`` (BackPACK's own
extensions in the same pass). At the end: regression tests for the jacext bugs the fuzzer found,
and a reproducer (xfail) of one still open, which the strategies avoid.
"""

import pytest
import torch
from backpack import backpack
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, loop_jacobian
from torch import nn

import jacext

from .models import (
    DEVICES,
    DTYPES,
    MAX_N,
    REDUCTIONS,
    SECOND,
    SEEDS,
    STEMS,
    WARNINGS,
    Oracle,
    examples,
    float_models,
    loss_for,
    randomize,
    token_models,
)

pytestmark = WARNINGS


# ---------------------------------------------------------------- the check


def check(case, n, dtype, reduction, second, device="cpu"):
    """All three extensions in one backward pass, the extensions ``second`` in another, and
    jacext.jacobian against the oracle; p.grad as without jacext; nothing for frozen parameters."""
    model = case.model.to(device, dtype)
    randomize(model)
    frozen = [p for i, p in enumerate(model.parameters()) if i in case.frozen]
    for p in frozen:
        p.requires_grad_(False)
    x = case.inputs(n, dtype, device)
    with torch.no_grad():  # max_norm renormalises the rows looked up in place: in float32, twice
        model(x)
    y, lossfunc = loss_for(model(x).detach(), reduction)
    oracle = Oracle.of(model, lossfunc, y, x)
    jacext.extend(model)
    for extensions in [(jacext.BatchJacobian(), jacext.BatchGrad(), jacext.BatchL2Grad()), tuple(e() for e in second)]:
        model.zero_grad()
        with backpack(*extensions):
            lossfunc(model(x), y).backward()
        oracle.check(model, extensions, dtype)
    assert not any(hasattr(p, field) for p in frozen for field in oracle.fields)
    oracle.check_jacobian_function(model, x, dtype)


# ---------------------------------------------------------------- the properties


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stem", STEMS)
@examples(30)
@given(data=st.data(), n=st.integers(1, MAX_N), dtype=DTYPES, reduction=REDUCTIONS, second=SECOND, seed=SEEDS)
def test_float_input_models(device, stem, data, n, dtype, reduction, second, seed):
    case = data.draw(float_models(stem), label="case")
    torch.manual_seed(seed)
    check(case, n, dtype, reduction, second, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied"])
@pytest.mark.parametrize("stem", ["embedding", "bag"])
@examples(30)
@given(data=st.data(), n=st.integers(1, MAX_N), dtype=DTYPES, reduction=REDUCTIONS, second=SECOND, seed=SEEDS)
def test_token_input_models(device, stem, tied, data, n, dtype, reduction, second, seed):
    case = data.draw(token_models(stem, tied), label="case")
    torch.manual_seed(seed)
    check(case, n, dtype, reduction, second, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inputs", ["float", "embedding", "bag"])
@examples(20)
@given(data=st.data(), dtype=DTYPES, second=SECOND, seed=SEEDS)
def test_empty_batch(device, inputs, data, dtype, second, seed):
    """N = 0: empty results of the right shapes, p.grad as without jacext."""
    tied = data.draw(st.booleans())
    models = float_models(empty=True) if inputs == "float" else token_models(inputs, tied=tied, empty=True)
    case = data.draw(models, label="case")
    torch.manual_seed(seed)
    check(case, 0, dtype, "sum", second, device)


# ---------------------------------------------------------------- bugs the fuzzer found


class Double(nn.Module):
    """An in-place operation on the output of the module before: x.mul_(2)."""

    def forward(self, x):
        return x.mul_(2.0)


@pytest.mark.parametrize(
    "layer,shape",
    [(nn.Linear(2, 3), (2, 4, 2)), (nn.InstanceNorm1d(2, affine=True), (2, 2, 3))],
    ids=["linear_3d", "instancenorm"],
)
def test_in_place_op_on_an_output_that_is_a_view(layer, shape):
    """A module's single output that is a view (Linear with a bias on an input of 3 or more dims,
    InstanceNorm), changed in place: autograd would rebase the view's grad_fn off the edge the
    tape recorded at call time (found by the fuzzer: the results were zeros). The record hands
    on an alias that is not a view, so the result is exact."""
    model = nn.Sequential(layer, Double()).double()
    x = torch.randn(*shape, dtype=torch.float64)
    got = jacext.jacobian(model, x)
    for name, expected in loop_jacobian(model, x).items():
        assert_close(got[name], expected, torch.float64, name)


class Scale(nn.Module):
    """y = alpha * x with a 0-dim parameter alpha."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x):
        return self.alpha * x


def test_batch_l2_of_a_zero_dim_parameter():
    """Found by the fuzzer: Tape._finish squared the materialised block (N, V, *p.shape) with
    block.flatten(2), which does not exist for p.shape == () (IndexError)."""
    model = jacext.extend(Scale())
    x = torch.randn(3, 2, dtype=torch.float64)
    with backpack(jacext.BatchL2Grad()):
        model(x).sum().backward()
    assert_close(model.alpha.batch_l2, x.sum(1) ** 2, torch.float64)


class Mix(nn.Module):
    """y = tanh(x (W * basis)), called with a tensor ``basis`` shared by all samples."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))

    def forward(self, x, basis):
        return torch.tanh(x @ (self.W * basis))


class MixParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = Mix()
        self.register_buffer("basis", torch.randn(3, 3, dtype=torch.float64))

    def forward(self, x):
        return self.mix(x, self.basis)


def test_generic_rule_with_a_shared_argument_whose_first_dim_is_n():
    """A buffer whose first dim happens to equal N (basis, 3 x 3, with N = 3) is shared by all
    samples: the batch tracker knows it does not depend on the batch, so the generic rule does not
    split it per sample (it once did, from the sizes alone: mix.W's Jacobian was silently wrong)."""
    model = MixParent()
    x = torch.randn(3, 3, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    assert_close(jacext.jacobian(model, x)["mix.W"], expected["mix.W"], torch.float64)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(2, 1, batch_first=True, dtype=torch.float64)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_multihead_attention_with_frozen_in_projection():
    """Found by the fuzzer: with in_proj_weight and in_proj_bias frozen, MultiheadAttention owns no
    trainable parameter itself, and its call was not recorded although its rule covers out_proj
    (which it uses without calling it): out_proj's Jacobians were silently zero."""
    model = SelfAttention()
    model.mha.in_proj_weight.requires_grad_(False)
    model.mha.in_proj_bias.requires_grad_(False)
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    for name, value in jacext.jacobian(model, x).items():
        assert_close(value, expected[name], torch.float64, name)


def test_flat_jacobian_of_an_empty_batch():
    """Found by the fuzzer: jacext.jacobian reshaped each (0, C, *p.shape) block with
    reshape(n, c, -1), whose -1 torch cannot infer for 0 elements (RuntimeError)."""
    assert jacext.jacobian(nn.Linear(2, 3), torch.randn(0, 2), flat=True).shape == (0, 3, 9)
