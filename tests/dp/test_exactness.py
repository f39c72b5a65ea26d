"""jacext.dp.PrivacyEngine against the float64 oracle: the clipped sums of every backward pass
and the parameters after noisy steps, for flat, per-layer and adaptive clipping, "mean" and
"sum" losses, on an MLP, a CNN with GroupNorm, an LSTM, a TransformerEncoder, tied weights and
parameters meeting the batch outside their modules (positions, a class token, a functional tied head)."""

import pytest
import torch
from dp_cases import (
    ADAPTIVE,
    F64,
    FILTERS,
    MODELS,
    N,
    dataset,
    fixed_loader,
    make_model,
    median_bounds,
    reference_steps,
)
from reference import assert_close, overall_scale
from torch import nn

import jacext
from jacext.dp import PrivacyEngine, clipped_grad_batch

pytestmark = [pytest.mark.filterwarnings(f) for f in FILTERS]
pytest.importorskip("opacus")

SIGMA, LR, SEED = 0.7, 0.5, 3
# clipping inside the backward (every call fused, every meet held)
FUSED = {"mlp", "cnn_groupnorm", "transformer", "tied", "positions"}


def train(name, clipping, reduction, bound, data):
    model = make_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    engine = PrivacyEngine(accountant="rdp")
    extra = ADAPTIVE if clipping == "adaptive" else {}
    max_grad_norm = [bound[k] for k, _ in model.named_parameters()] if clipping == "per_layer" else bound
    private, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=fixed_loader(data), noise_multiplier=SIGMA,
        max_grad_norm=max_grad_norm, loss_reduction=reduction, poisson_sampling=False, clipping=clipping,
        noise_generator=torch.Generator().manual_seed(SEED), **extra,
    )
    lossfunc = nn.CrossEntropyLoss(reduction=reduction)
    sums = []
    for x, y in loader:
        opt.zero_grad()
        lossfunc(private(x), y).backward()
        sums.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return model, private, opt, engine, sums


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer", "adaptive"])
@pytest.mark.parametrize("name", MODELS)
def test_private_training_equals_the_oracle(name, clipping, reduction):
    data = dataset(name)
    x0, y0 = data.tensors[0][:N], data.tensors[1][:N]
    bound = median_bounds(make_model(name), x0, y0, "per_layer" if clipping == "per_layer" else "flat")
    model, private, opt, engine, sums = train(name, clipping, reduction, bound, data)
    batches = [(data.tensors[0][i : i + N], data.tensors[1][i : i + N]) for i in range(0, len(data), N)]
    expected, expected_sums, c_end = reference_steps(
        make_model(name), batches, clipping=clipping, bound=bound, reduction=reduction, sigma=SIGMA, lr=LR,
        seed=SEED, expected=N,
    )
    for step, (got, exp) in enumerate(zip(sums, expected_sums, strict=False)):
        scale = overall_scale(exp)
        for k in exp:
            assert_close(got[k], exp[k], F64, f"step {step} clipped sum of {k}", scale)
    scale = overall_scale(expected)
    for k, p in model.named_parameters():
        assert_close(p.detach(), expected[k], F64, f"parameter {k} after the steps", scale)
    if clipping == "adaptive":
        assert opt.max_grad_norm == pytest.approx(c_end, rel=1e-12) and c_end != bound
    if clipping == "per_layer":
        assert private._materialise == (name not in FUSED)
    if name in FUSED:
        assert jacext.backward_plan(model) == "inline, clipping"
    assert sum(steps for _, _, steps in engine.accountant.history) == len(batches)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_grad_batch_next_to_the_clipping_is_unclipped_and_clipped_grad_batch_is_clipped(clipping):
    """With backpack(jacext.BatchGrad()) around the private model, p.grad_batch holds the unclipped
    per-sample gradients (BackPACK's semantics: 1/N for a mean loss), clipped_grad_batch(p) the
    clipped ones of the individual losses, p.grad their sum."""
    from backpack import backpack
    from dp_cases import clip_factors, per_sample_gradients

    data = dataset("mlp")
    x, y = data.tensors[0][:N], data.tensors[1][:N]
    bound = median_bounds(make_model("mlp"), x, y, clipping)
    model = make_model("mlp")
    max_grad_norm = [bound[k] for k, _ in model.named_parameters()] if clipping == "per_layer" else bound
    private, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=fixed_loader(data),
        noise_multiplier=1.0, max_grad_norm=max_grad_norm, poisson_sampling=False, clipping=clipping,
    )
    grads = per_sample_gradients(make_model("mlp"), x, y, "mean")
    w = clip_factors(grads, clipping, bound)
    assert all((f < 1).any() and (f == 1).any() for f in w.values())
    with backpack(jacext.BatchGrad()):
        nn.CrossEntropyLoss()(private(x), y).backward()
    for k, p in model.named_parameters():
        clipped = w[k].view(-1, *[1] * p.dim()) * grads[k]
        assert_close(p.grad_batch, grads[k] / N, F64, f"grad_batch {k}")
        assert_close(clipped_grad_batch(p), clipped, F64, f"clipped_grad_batch {k}")
        assert_close(p.grad, clipped.sum(0), F64, f"p.grad {k}")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_clipping_in_a_backward_with_create_graph_equals_the_oracle(name):
    """backward(create_graph=True) (a gradient penalty, a meta-learning step): p.grad is still the
    clipped sum, and the step the oracle's."""
    data = dataset(name)
    x, y = data.tensors[0][:N], data.tensors[1][:N]
    bound = median_bounds(make_model(name), x, y, "flat")
    model = make_model(name)
    private, opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=fixed_loader(data),
        noise_multiplier=SIGMA, max_grad_norm=bound, poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(SEED),
    )
    expected, sums, _ = reference_steps(make_model(name), [(x, y)], clipping="flat", bound=bound, reduction="mean",
                                        sigma=SIGMA, lr=LR, seed=SEED, expected=N)
    opt.zero_grad()
    nn.CrossEntropyLoss()(private(x), y).backward(create_graph=True)
    for k, p in model.named_parameters():
        assert_close(p.grad, sums[0][k], F64, f"clipped sum of {k}", overall_scale(sums[0]))
    opt.step()
    for k, p in model.named_parameters():
        assert_close(p.detach(), expected[k], F64, f"parameter {k}", overall_scale(expected))
