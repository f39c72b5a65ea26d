"""Property-based tests: jacext's extensions and BackPACK's own in one backward pass.

Random sequential models of the layers BackPACK supports (Linear, Conv1d/2d/3d,
ConvTranspose1d/2d/3d, BatchNorm1d/2d/3d in eval mode, Embedding, activations, pooling, padding),
``jacext.extend(model, backpack=True)``, and one BackPACK extension (first order: BatchGrad,
BatchL2Grad, SumGradSquared, Variance; second order: DiagGGNExact, BatchDiagGGNExact,
DiagHessian) together with the jacext extensions whose attributes it does not overwrite
(BatchJacobian always), in random order. BackPACK's results must be those of a separately
``backpack.extend``-ed copy of the model in a context of its own; jacext's results those of the
loops of ``tests/reference.py``; p.grad that of a backward pass without either.
"""

import copy
import math
from typing import Callable

import backpack.extensions as bpext
import pytest
import torch
from backpack import backpack
from backpack import extend as backpack_extend
from backpack.custom_module.reduce_tuple import ReduceTuple
from hypothesis import given
from hypothesis import strategies as st
from reference import assert_close, trainable
from torch import nn

import jacext

from .models import (
    BATCHNORM_FOR,
    DEVICES,
    DTYPES,
    EPS,
    MAX_N,
    MAX_OUTPUTS,
    MAX_WIDTH,
    REDUCTIONS,
    SEEDS,
    SHAPES,
    WARNINGS,
    Oracle,
    channels,
    conv_options,
    conv_transpose_options,
    examples,
    frozen,
    loss_for,
    out_shape,
    prepare,
    scale_of,
    side_cap,
)

pytestmark = [*WARNINGS, pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")]

FIRST_ORDER = [bpext.BatchGrad, bpext.BatchL2Grad, bpext.SumGradSquared, bpext.Variance]
SECOND_ORDER = [bpext.DiagGGNExact, bpext.BatchDiagGGNExact, bpext.DiagHessian]
ACTIVATIONS = [nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.LogSigmoid, nn.ELU, nn.SELU, nn.Identity]
AVERAGES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def handles(extension, module, dtype):
    """Whether BackPACK's ``extension`` runs on ``module``: it has a module extension for it, or
    (first order) the module has no parameters (second-order extensions refuse unknown modules).
    BackPACK 1.7's second order: BatchNorm only with affine=True, average pooling only in float32
    (its derivatives make float32 tensors)."""
    known = type(module) in extension._BackpropExtension__module_extensions
    if type(extension) in FIRST_ORDER:
        return known or next(module.parameters(), None) is None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.affine:
        return False
    return known and not (isinstance(module, AVERAGES) and dtype != torch.float32)


@st.composite
def layer(draw, shape, extension, dtype):
    """One module BackPACK's ``extension`` handles, for per-sample input ``shape`` (BackPACK
    1.7 limits: ConvTranspose without output_padding; RNN and LSTM with one layer, one direction,
    batch_first, followed by BackPACK's ReduceTuple, which takes the output sequence)."""
    d = len(shape) - 1
    options: list[Callable[[], nn.Module]] = [
        lambda: nn.Linear(shape[-1], draw(st.integers(1, MAX_WIDTH)), bias=draw(st.booleans()))
    ]
    options += [lambda: draw(st.sampled_from(ACTIVATIONS))()]
    if len(shape) <= 4:
        options.append(lambda: BATCHNORM_FOR[len(shape)](shape[0], eps=draw(EPS), affine=draw(st.booleans())).eval())
    if 1 <= d <= 3:
        cap = side_cap(shape)

        def conv():
            picks = [draw(st.sampled_from(conv_options(size, "zeros", cap))) for size in shape[1:]]
            kernel, stride, dilation, padding = zip(*picks, strict=True)
            cout, groups = channels(draw, shape[0], same=False)
            return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1](
                shape[0], cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                bias=draw(st.booleans()),
            )

        def conv_transpose():
            valid = [[o for o in conv_transpose_options(size, cap) if o[4] == 0] for size in shape[1:]]
            picks = [draw(st.sampled_from(choices)) for choices in valid]
            kernel, stride, dilation, padding, output_padding = zip(*picks, strict=True)
            cout, groups = channels(draw, shape[0], same=False)
            return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[d - 1](
                shape[0], cout, kernel, stride=stride, padding=padding, output_padding=output_padding,
                dilation=dilation, groups=groups, bias=draw(st.booleans()),
            )

        options += [conv, conv_transpose]
        options += [lambda: (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[d - 1](1)]
        if min(shape[1:]) >= 2:
            options += [lambda: (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[d - 1](2)]
            options += [lambda: (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[d - 1](2)]
        if d == 2 and max(shape[1:]) <= 3:
            options.append(lambda: nn.ZeroPad2d(draw(st.integers(1, 2))))
    if d == 1:  # a sequence (T, F)
        rnn = draw(st.sampled_from([nn.RNN, nn.LSTM]))
        options.append(lambda: rnn(shape[1], draw(st.integers(1, 3)), batch_first=True))
    for _ in range(20):
        module = draw(st.sampled_from(options))()
        if handles(extension, module, dtype):
            return nn.Sequential(module, ReduceTuple(index=0)) if isinstance(module, nn.RNNBase) else module
    return nn.Identity()


@st.composite
def models(draw, extension, dtype):
    """Float inputs (vectors, sequences, 1-, 2-, 3-d images) or tokens through an Embedding, up to
    three layers, a Linear head over the flattened sample (outputs (N, C)); frozen parameters.
    BackPACK 1.7 limits: Embedding without padding_idx, in float32 (BackPACK's Embedding
    derivatives make float32 tensors), for first-order extensions."""
    vocab = 0
    if type(extension) in FIRST_ORDER and dtype == torch.float32 and draw(st.booleans()):
        vocab = draw(st.integers(2, 5))
        inputs = (draw(st.integers(1, 3)),)
        modules = [nn.Embedding(vocab, draw(st.integers(1, 3)))]
        shape = out_shape(modules[0], inputs, tokens=True)
    else:
        inputs = shape = tuple(draw(st.integers(*r)) for r in SHAPES[draw(st.sampled_from(list(SHAPES)))])
        modules = []
    for _ in range(draw(st.integers(0, 3))):
        modules.append(draw(layer(shape, extension, dtype)))
        shape = out_shape(modules[-1], shape)
    flat = [nn.Flatten()] if len(shape) > 1 else []
    model = nn.Sequential(*modules, *flat, nn.Linear(math.prod(shape), draw(st.integers(1, 3))))
    assert model[-1].out_features <= MAX_OUTPUTS
    return model, inputs, vocab, draw(frozen(model))


def backpack_fields(model, savefield):
    return {name: getattr(p, savefield) for name, p in trainable(model)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extension", FIRST_ORDER + SECOND_ORDER, ids=lambda e: e.__name__)
@examples(20)
@given(data=st.data(), n=st.integers(1, MAX_N), dtype=DTYPES, reduction=REDUCTIONS, seed=SEEDS)
def test_with_backpack_extensions(device, extension, data, n, dtype, reduction, seed):
    model, inputs, vocab, frozen_params = data.draw(models(extension(), dtype), label="model, inputs, vocab, frozen")
    ours = data.draw(
        st.permutations([e for e in (jacext.BatchGrad, jacext.BatchL2Grad) if e.savefield != extension().savefield])
        .flatmap(lambda order: st.integers(0, len(order)).map(lambda k: [jacext.BatchJacobian, *order[:k]])),
        label="jacext extensions",
    )
    position = data.draw(st.integers(0, len(ours)), label="position of BackPACK's extension")
    torch.manual_seed(seed)
    model = prepare(model, frozen_params, device, dtype)
    x = (torch.randint(0, vocab, (n, *inputs)) if vocab else torch.randn(n, *inputs, dtype=dtype)).to(device)
    y, lossfunc = loss_for(model(x).detach(), reduction)
    oracle = Oracle.of(model, lossfunc, y, x)

    twin = backpack_extend(copy.deepcopy(model))
    with backpack(extension()):
        backpack_extend(copy.deepcopy(lossfunc))(twin(x), y).backward()
    savefield = extension().savefield
    theirs = backpack_fields(twin, savefield)

    jacext.extend(model, backpack=True)
    extensions = [e() for e in ours]
    extensions.insert(position, extension())
    with backpack(*extensions):
        backpack_extend(copy.deepcopy(lossfunc))(model(x), y).backward()
    oracle.check(model, extensions, dtype)
    scale = scale_of(theirs, dtype, power=1 if extension is bpext.BatchGrad else 2)
    for name, value in backpack_fields(model, savefield).items():
        assert_close(value, theirs[name], dtype, f"{extensions}: BackPACK's p.{savefield} of {name}", scale)
    oracle.check_jacobian_function(model, x, dtype)
