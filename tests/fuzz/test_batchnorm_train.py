"""Property-based tests: BatchNorm with batch statistics (train mode) and the two explicit choices.

A random model has a BatchNorm1d/2d/3d in train mode (random eps, momentum, affine; with or
without running statistics for "exact"), optionally after a Linear, Conv or ConvTranspose, and
random blocks of ``models.py`` after it, possibly a second train-mode BatchNorm. The references
(``tests/reference.py``'s loops) for ``jacext.extend(model, batchnorm=...)``:

- ``"eval"``: the model with its BatchNorm layers in eval mode (running statistics), also for
  p.grad; the running statistics stay as they were and the layers stay in train mode;
- ``"exact"``: the model as it is, in train mode: every sample's output differentiated through the
  batch statistics; the running statistics are updated as by a plain forward pass, and ClipGrad
  (which needs independent samples) is refused.
"""

import copy
import math

import pytest
import torch
from backpack import backpack
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, loop_jacobian, overall_scale
from torch import nn

import jacext
from jacext.dp import ClipGrad

from .models import (
    BATCHNORM_FOR,
    DEVICES,
    DTYPES,
    EPS,
    MAX_N,
    REDUCTIONS,
    SECOND,
    SEEDS,
    SHAPES,
    WARNINGS,
    Case,
    Oracle,
    block,
    body,
    examples,
    frozen,
    head,
    loss_for,
    out_shape,
    prepare,
)

pytestmark = WARNINGS


def train_batchnorm(draw, shape, choice):
    """A BatchNorm for per-sample ``shape`` in train mode; without running statistics only for
    "exact" ("eval" has none to use: ``test_eval_choice_without_running_statistics``)."""
    return BATCHNORM_FOR[len(shape)](
        shape[0], eps=draw(EPS), momentum=draw(st.sampled_from([0.1, 0.5, None])), affine=draw(st.booleans()),
        track_running_stats=choice == "eval" or draw(st.booleans()),
    ).train()


def batch_statistics_possible(shape, n, choice):
    """Whether torch normalises a batch of ``n`` of per-sample ``shape`` with batch statistics:
    not from one value per channel. With "eval" jacext never uses batch statistics (N = 1 fine)."""
    return choice == "eval" or n * math.prod(shape[1:]) != 1


@st.composite
def batchnorm_models(draw, choice, n):
    """[a Linear, Conv or ConvTranspose], a train-mode BatchNorm, random blocks, [a second
    train-mode BatchNorm, more blocks], a head, for a batch of ``n``; up to two frozen parameters."""
    kind = draw(st.sampled_from(list(SHAPES)))
    shape = tuple(draw(st.integers(*r)) for r in SHAPES[kind])
    inputs, modules = shape, []
    if not batch_statistics_possible(shape, n, choice) or draw(st.booleans()):
        modules.append(draw(block(shape, empty=n == 0, names=("linear", "conv", "conv_transpose"))))
        shape = out_shape(modules[-1], shape)
    for _ in range(draw(st.integers(1, 2))):
        if len(shape) <= 4 and batch_statistics_possible(shape, n, choice):
            modules.append(train_batchnorm(draw, shape, choice))
        more, shape = draw(body(shape, empty=n == 0, layers=2))
        modules += more
    model = nn.Sequential(*modules, *draw(head(shape)))
    return Case(model, inputs, draw(frozen(model)))


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def statistics(model):
    """The running statistics of the train-mode BatchNorm layers (cloned)."""
    return [
        None if t is None else t.clone()
        for m in batchnorms(model) for t in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


def assert_same_statistics(got, expected, dtype):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert (a is None) == (b is None), "running statistics appeared or vanished"
        if a is not None:
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("choice", ["eval", "exact"])
@examples(30)
@given(data=st.data(), n=st.integers(0, MAX_N), dtype=DTYPES, reduction=REDUCTIONS, second=SECOND, seed=SEEDS)
def test_train_mode_batchnorm(device, choice, data, n, dtype, reduction, second, seed):
    case = data.draw(batchnorm_models(choice, n), label="case")
    torch.manual_seed(seed)
    model = prepare(case.model, case.frozen, device, dtype)
    x = case.inputs(n, dtype, device)
    reference = copy.deepcopy(model)
    if choice == "eval":
        for m in batchnorms(reference):
            m.eval()
    with torch.no_grad():
        y, lossfunc = loss_for(copy.deepcopy(reference)(x), reduction)
    oracle = Oracle.of(reference, lossfunc, y, x)
    jacext.extend(model, batchnorm=choice)
    for extensions in [(jacext.BatchJacobian(), jacext.BatchGrad(), jacext.BatchL2Grad()), tuple(e() for e in second)]:
        model.zero_grad()
        before, twin = statistics(model), copy.deepcopy(model)
        with backpack(*extensions):
            loss = lossfunc(model(x), y)
        if choice == "eval":  # no update from the recorded forward pass, the layers back in train mode
            assert all(m.training for m in batchnorms(model))
            assert_same_statistics(statistics(model), before, dtype)
        else:  # updated as by a plain forward pass
            with torch.no_grad():
                twin(x)
            assert_same_statistics(statistics(model), statistics(twin), dtype)
        loss.backward()
        oracle.check(model, extensions, dtype)
    oracle.check_jacobian_function(model, x, dtype)
    if choice == "exact" and n and batchnorms(model):
        with backpack(ClipGrad(1.0)), pytest.raises(jacext.JacextError, match="independent samples"):
            lossfunc(model(x), y).backward()


@pytest.mark.parametrize("affine", [True, False])
def test_eval_choice_without_running_statistics(affine):
    """A BatchNorm without running statistics (track_running_stats=False) has none to evaluate
    with. Under batchnorm="eval" jacext should refuse it (or differentiate exactly); it normalises
    with the batch statistics but seeded the samples as independent (found by the fuzzer, after
    bdc551a): the Jacobians of the parameters before it were silently wrong. It is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=affine, track_running_stats=False), nn.Linear(2, 1))
    model = model.double()
    x = torch.randn(3, 2, dtype=torch.float64)
    expected = loop_jacobian(model, x)  # the model's own output: batch statistics
    jacext.extend(model, batchnorm="eval")
    try:
        got = jacext.jacobian(model, x)
    except jacext.JacextError as e:
        assert "extend(model, batchnorm='eval')" not in str(e), "the message asks for the choice made"
        return
    for name, value in got.items():
        assert_close(value, expected[name], torch.float64, name, overall_scale(expected))


@pytest.mark.parametrize("choice", ["error", "exact"])
@pytest.mark.parametrize("without", ["affine", "frozen"])
def test_train_batchnorm_without_trainable_parameters(without, choice):
    """Found by the fuzzer, fixed in bdc551a: a train-mode BatchNorm with affine=False (or frozen
    weight and bias) owned no trainable parameter, so its call was not recorded: with the default
    batchnorm="error" nothing was refused, with "exact" the samples were not seeded separately, and
    the Jacobians of the parameters before it were silently wrong."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=without == "frozen"), nn.Linear(2, 1)).double()
    model[1].requires_grad_(False)
    x = torch.randn(3, 2, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    jacext.extend(model, batchnorm=choice)
    if choice == "error":
        with pytest.raises(jacext.JacextError, match="batch statistics"):
            jacext.jacobian(model, x)
    else:
        assert_close(jacext.jacobian(model, x)["0.weight"], expected["0.weight"], torch.float64)
