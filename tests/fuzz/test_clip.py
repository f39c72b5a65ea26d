"""Property-based tests: ``jacext.dp.ClipGrad`` (per-sample clipping inside the backward pass).

Random models of ``models.py`` (float inputs from every stem, Embedding and EmbeddingBag inputs,
N = 0 to 3, float32 and float64, frozen parameters), optionally with their BatchNorm layers in
train mode under ``batchnorm="eval"``, and a clipping bound drawn relative to the largest
per-sample gradient norm (so that none, some or all samples are clipped). The reference, from the
loop of ``tests/reference.py``: the gradients g_n of the samples' own losses (N times the
contributions for a "mean" loss), w_n = min(1, C / (||g_n|| + 1e-6)), ``p.grad == sum_n w_n g_n``
and ``p.per_sample_l2 == ||g_n[p]||^2``. Other jacext extensions in the same pass (any of
BatchJacobian, BatchGrad, BatchL2Grad) are unaffected by the clipping.
"""

import pytest
import torch
from backpack import backpack
from hypothesis import assume, given
from hypothesis import strategies as st
from reference import assert_close, trainable

import jacext
from jacext.dp import ClipGrad

from .models import (
    DEVICES,
    DTYPES,
    JACEXT_EXTENSIONS,
    MAX_N,
    REDUCTIONS,
    SEEDS,
    WARNINGS,
    Oracle,
    examples,
    float_models,
    loss_for,
    prepare,
    scale_of,
    squared_norms,
    token_models,
)

pytestmark = WARNINGS

# the other extensions in the same backward pass
OTHERS = st.lists(st.sampled_from(JACEXT_EXTENSIONS), unique=True, max_size=3)
# C as a fraction of the largest per-sample norm: every sample clipped, some, none
BOUNDS = st.sampled_from([0.05, 0.3, 0.7, 1.5])


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inputs", ["float", "embedding", "bag"])
@examples(30)
@given(
    data=st.data(), n=st.integers(0, MAX_N), dtype=DTYPES, reduction=REDUCTIONS, bound=BOUNDS, others=OTHERS,
    train_batchnorm=st.booleans(), seed=SEEDS,
)
def test_clip_grad(device, inputs, data, n, dtype, reduction, bound, others, train_batchnorm, seed):
    if inputs == "float":
        models = float_models(empty=n == 0)
    else:
        models = token_models(inputs, tied=data.draw(st.booleans()), empty=n == 0)
    case = data.draw(models, label="case")
    torch.manual_seed(seed)
    model = prepare(case.model, case.frozen, device, dtype)
    x = case.inputs(n, dtype, device)
    with torch.no_grad():  # max_norm renormalises the rows looked up in place
        model(x)
    y, lossfunc = loss_for(model(x).detach(), reduction)
    oracle = Oracle.of(model, lossfunc, y, x)  # BatchNorm in eval mode: what batchnorm="eval" records

    per_loss = n if reduction == "mean" else 1
    grads = {name: g * per_loss for name, g in oracle.fields["grad_batch"].items()}
    l2 = {name: squared_norms(g) for name, g in grads.items()}
    norms = torch.stack(list(l2.values())).sum(0).sqrt() if l2 else torch.zeros(n, dtype=dtype, device=device)
    largest = norms.max().item() if n else 0.0
    # gradients that are rounding noise (zero in exact arithmetic: a normalisation of equal values)
    # have noise for norms, and a bound drawn from them clips by ratios of noise
    assume(largest == 0 or largest > 1e3 * torch.finfo(dtype).eps * max(oracle.scales["jacobian"], 1.0))
    max_norm = bound * largest if largest > 0 else 1.0
    w = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    terms = {name: w.view(-1, *[1] * (g.dim() - 1)) * g for name, g in grads.items()}
    clipped = {name: t.sum(0) for name, t in terms.items()}

    if train_batchnorm and batchnorms(model):
        for m in batchnorms(model):
            m.train()
        jacext.extend(model, batchnorm="eval")
    else:
        jacext.extend(model)
    extensions = (ClipGrad(max_norm, loss_reduction=reduction), *(e() for e in others))
    if data.draw(st.booleans(), label="ClipGrad last"):
        extensions = extensions[1:] + extensions[:1]
    with backpack(*extensions):
        lossfunc(model(x), y).backward()
    oracle.check(model, extensions, dtype, grad=False)
    # the floor from the terms: their sum cancels where samples' gradients point in opposite directions
    scale, scale_l2 = scale_of(terms, dtype), scale_of(l2, dtype, power=2)
    for name, p in trainable(model):
        got = torch.zeros_like(p) if p.grad is None else p.grad.to_dense()
        assert_close(got, clipped[name], dtype, f"{extensions}: clipped p.grad of {name}", scale)
        assert_close(p.per_sample_l2, l2[name], dtype, f"{extensions}: p.per_sample_l2 of {name}", scale_l2)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert not any(hasattr(p, "per_sample_l2") for p in frozen)

