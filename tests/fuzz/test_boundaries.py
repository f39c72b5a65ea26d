"""Property-based tests: random models of ``models.py`` where jacext meets the rest of PyTorch.

On a random float model (any stem, N = 1 to 3, float32 and float64), one of:

- an in-place operation on the model's output before the loss (``out /= 3``, ``out.relu_()``,
  ``out[:, 0] = 0``): BatchGrad and BatchL2Grad of the loss as computed, BatchJacobian of the
  output the model returned (before the change), as ``tests/errors/test_pytorch_boundaries.py``;
- a forward hook that replaces the output of a random trainable Linear (2 * output), registered
  after ``extend``, with ``prepend=True`` or not, or as a global module hook;
- a forward patched on such a Linear instance (``2 * F.linear(x, lin.weight, lin.bias)``), or a
  LoRA-style pair of parameters used in a patched forward, added before or after ``extend``;

each against the loops of ``tests/reference.py`` run on the same modified model, after a step on
a batch of another size (a stale result would keep its shape). Complex numbers: a complex
parameter (autograd's convention, d/da + i d/db, for every result); a complex output of real parameters is refused under
BatchJacobian (naming ``view_as_real``), exact under BatchGrad and BatchL2Grad for a real loss,
and exact under BatchJacobian once returned as ``torch.view_as_real``. A gradient penalty (R1's
|d out.sum() / dx|^2, alone or with the model's loss): BatchGrad and BatchL2Grad exact against a
loop that builds each sample's penalty alone, or a JacextError that leaves no result.
"""

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack
from hypothesis import assume, given
from hypothesis import strategies as st
from reference import assert_close, loop_grad_batch, trainable
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

import jacext

from .models import (
    DTYPES,
    JACEXT_EXTENSIONS,
    MAX_N,
    REDUCTIONS,
    SECOND,
    SEEDS,
    WARNINGS,
    Oracle,
    examples,
    float_models,
    loss_for,
    prepare,
    scale_of,
    squared_norms,
)

pytestmark = WARNINGS

FIELDS = [e().savefield for e in JACEXT_EXTENSIONS]


def divided(out):
    out /= 3.0


def relu_in_place(out):
    out.relu_()


def column_zeroed(out):
    out[:, 0] = 0


IN_PLACE = {"divided": divided, "relu_": relu_in_place, "setitem": column_zeroed}
EDGES = [*IN_PLACE, "hook", "hook_prepend", "global_hook", "patched", "lora_before", "lora_after"]


def doubled(module, args, output):
    return 2 * output


def patch_lora(linear: nn.Linear, rank: int) -> None:
    """y = linear(x) + x A^T B^T with parameters A (rank, in) and B (out, rank) of its own."""
    w = linear.weight
    linear.lora_a = nn.Parameter(torch.randn(rank, linear.in_features, dtype=w.dtype) / rank)
    linear.lora_b = nn.Parameter(torch.randn(linear.out_features, rank, dtype=w.dtype) / rank)
    base = linear.forward
    linear.forward = lambda x: base(x) + F.linear(F.linear(x, linear.lora_a), linear.lora_b)


def step(model, x, y, lossfunc, extensions, post=None):
    model.zero_grad()
    with backpack(*extensions):
        out = model(x)
        if post is not None:
            post(out)
        lossfunc(out, y).backward()


@examples(12)
@given(
    data=st.data(), n=st.integers(1, MAX_N), dtype=DTYPES, reduction=REDUCTIONS, second=SECOND, seed=SEEDS,
    edge=st.sampled_from(EDGES),
)
def test_in_place_outputs_hooks_and_patched_forwards(data, n, dtype, reduction, second, seed, edge):
    case = data.draw(float_models(), label="case")
    torch.manual_seed(seed)
    model = prepare(case.model, case.frozen, "cpu", dtype)
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.requires_grad]
    lin = data.draw(st.sampled_from(linears), label="linear") if linears else None
    assume(edge in IN_PLACE or lin is not None)
    x = case.inputs(n, dtype)
    post = IN_PLACE.get(edge)
    assume(edge != "setitem" or model(x).dim() >= 2)
    if edge == "lora_before":
        patch_lora(lin, data.draw(st.integers(1, 2)))
    jacext.extend(model)
    handles = []
    if edge in ("hook", "hook_prepend"):
        handles.append(lin.register_forward_hook(doubled, prepend=edge == "hook_prepend"))
    elif edge == "global_hook":
        handles.append(register_module_forward_hook(lambda m, a, o: 2 * o if m is lin else None))
    elif edge == "patched":
        lin.forward = lambda x: 2 * F.linear(x, lin.weight, lin.bias)
    elif edge == "lora_after":
        patch_lora(lin, data.draw(st.integers(1, 2)))
    try:
        y, lossfunc = loss_for(model(x).detach(), reduction)

        def loss(out, y):
            if post is not None:
                post(out)
            return lossfunc(out, y)

        oracle = Oracle.of(model, loss, y, x)
        other = case.inputs(n + 1, dtype)
        step(model, other, loss_for(model(other).detach(), reduction)[0], lossfunc, (jacext.BatchGrad(),), post)
        for extensions in [tuple(e() for e in JACEXT_EXTENSIONS), tuple(e() for e in second)]:
            step(model, x, y, lossfunc, extensions, post)
            oracle.check(model, extensions, dtype)
            kept = {e.savefield for e in extensions}
            assert not any(hasattr(p, f) for p in model.parameters() for f in FIELDS if f not in kept)
    finally:
        for h in handles:
            h.remove()


class ComplexHead(nn.Module):
    """|x W^T| with a complex parameter W: a real output."""

    def __init__(self, inp, out, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.randn(out, inp, dtype=dtype))

    def forward(self, x):
        return (x.to(self.w.dtype) @ self.w.T).abs()


class ToComplex(nn.Module):
    """x + i tanh(x): a complex output of real parameters."""

    def forward(self, x):
        return torch.complex(x, torch.tanh(x))


class ViewAsReal(nn.Module):
    def forward(self, z):
        return torch.view_as_real(z)


COMPLEX = {torch.float64: torch.complex128, torch.float32: torch.complex64}


class Column(nn.Module):
    def forward(self, x):
        return x.unsqueeze(-1)


def flat_model(case, dtype):
    """The case's model, its output as (N, width); and width."""
    model = prepare(case.model, case.frozen, "cpu", dtype)
    out = model(case.inputs(1, dtype))
    if out.dim() != 2:
        model = nn.Sequential(model, nn.Flatten() if out.dim() > 2 else Column())
    return model, out.shape[1:].numel()


@examples(12)
@given(data=st.data(), n=st.integers(1, MAX_N), dtype=DTYPES, reduction=REDUCTIONS, seed=SEEDS, second=SECOND)
def test_complex_parameters(data, n, dtype, reduction, seed, second):
    case = data.draw(float_models(), label="case")
    torch.manual_seed(seed)
    model, width = flat_model(case, dtype)
    model = jacext.extend(nn.Sequential(model, ComplexHead(width, 2, COMPLEX[dtype])))
    x, other = case.inputs(n, dtype), case.inputs(n + 1, dtype)
    y, lossfunc = loss_for(model(x).detach(), reduction)
    oracle = Oracle.of(model, lossfunc, y, x)
    step(model, other, loss_for(model(other).detach(), reduction)[0], lossfunc, (jacext.BatchGrad(),))
    extensions = tuple(e() for e in second)
    step(model, x, y, lossfunc, extensions)
    oracle.check(model, extensions, dtype)


@examples(12)
@given(data=st.data(), n=st.integers(1, MAX_N), dtype=DTYPES, seed=SEEDS, second=SECOND)
def test_complex_output_of_real_parameters(data, n, dtype, seed, second):
    case = data.draw(float_models(), label="case")
    torch.manual_seed(seed)
    model, _ = flat_model(case, dtype)
    x = case.inputs(n, dtype)
    complex_out = jacext.extend(nn.Sequential(model, ToComplex()))
    y = torch.randn(complex_out(x).shape, dtype=COMPLEX[dtype])

    def loss(out, y):
        return (out - y).abs().square().sum()

    expected = loop_grad_batch(complex_out, loss, y, x)
    extensions = tuple(e() for e in second)
    if any(isinstance(e, jacext.BatchJacobian) for e in extensions):
        complex_out.zero_grad(set_to_none=True)
        with pytest.raises(jacext.JacextError, match="view_as_real"), backpack(*extensions):
            loss(complex_out(x), y).backward()
        assert not any(p.grad is not None or any(hasattr(p, f) for f in FIELDS) for p in complex_out.parameters())
        extensions = tuple(e for e in extensions if not isinstance(e, jacext.BatchJacobian))
    if extensions:
        step(complex_out, x, y, loss, extensions)
        values = {"grad_batch": expected, "batch_l2": {k: squared_norms(g) for k, g in expected.items()}}
        for e in extensions:
            scale = scale_of(values[e.savefield], dtype, 2 if e.savefield == "batch_l2" else 1)
            for name, p in trainable(complex_out):
                what = f"{e.savefield} of {name}"
                assert_close(getattr(p, e.savefield), values[e.savefield][name], dtype, what, scale)
    as_real = jacext.extend(nn.Sequential(*complex_out, ViewAsReal()))
    y, lossfunc = loss_for(as_real(x).detach(), "sum")
    oracle = Oracle.of(as_real, lossfunc, y, x)
    step(as_real, x, y, lossfunc, (jacext.BatchJacobian(),))
    oracle.check(as_real, (jacext.BatchJacobian(),), dtype)


def penalised(model, x, with_output):
    """The model's loss (optionally) plus R1's penalty |d out.sum() / dx|^2; None where the output
    does not depend on x."""
    out = model(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True, allow_unused=True)
    if g is None:
        return None
    return (out.square().sum() if with_output else 0) + g.square().sum()


@examples(12)
@given(data=st.data(), n=st.integers(1, MAX_N), seed=SEEDS, with_output=st.booleans())
def test_gradient_penalty_is_exact_or_refused(data, n, seed, with_output):
    """Every random model with a gradient penalty: the per-sample results include its term
    (against a loop that builds each sample's penalty alone), or a JacextError that leaves no
    result behind."""
    case = data.draw(float_models(), label="case")
    torch.manual_seed(seed)
    dtype = torch.float64
    model = prepare(case.model, case.frozen, "cpu", dtype)
    x = case.inputs(n, dtype)
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    assume(params and penalised(model, x[:1].clone().requires_grad_(), True) is not None)
    expected = {k: [] for k, _ in params}
    for i in range(n):
        loss = penalised(model, x[i : i + 1].clone().requires_grad_(), with_output)
        try:
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        except RuntimeError:  # torch has no double backward for it (CPU flash attention)
            assume(False)
        for (k, p), g in zip(params, grads, strict=True):
            expected[k].append(torch.zeros_like(p) if g is None else g)
    stacked = {k: torch.stack(v) for k, v in expected.items()}
    jacext.extend(model)
    model.zero_grad()
    try:
        with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
            penalised(model, x.clone().requires_grad_(), with_output).backward()
    except jacext.JacextError:
        assert not any(hasattr(p, f) for p in model.parameters() for f in FIELDS)
        return
    scale = scale_of(stacked, dtype)
    for k, p in params:
        assert_close(p.grad_batch, stacked[k], dtype, k, scale)
        assert_close(p.batch_l2, squared_norms(stacked[k]), dtype, k, scale**2)
