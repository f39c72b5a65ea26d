"""ClipGrad under torch.amp.GradScaler: the bound C applies to the unscaled per-sample gradients
(not C / scale), the optimizer unscales the clipped sum before the noise, an overflow skips the
step as GradScaler skips one, and a scaler the clipping does not know is refused."""

import pytest
import torch
from dp_cases import (
    F64,
    FILTERS,
    N,
    dataset,
    fixed_loader,
    make_model,
    median_bounds,
    per_sample_gradients,
    reference_steps,
)
from reference import assert_close, overall_scale
from torch import nn

import jacext
from jacext.dp import PrivacyEngine

pytestmark = [pytest.mark.filterwarnings(f) for f in FILTERS]
pytest.importorskip("opacus")

SIGMA, LR, SEED, SCALE = 0.7, 0.5, 3, 2.0**12


def private(name, clipping, bound, scaler, data):
    model = make_model(name)
    max_grad_norm = [bound[k] for k, _ in model.named_parameters()] if clipping == "per_layer" else bound
    engine = PrivacyEngine(accountant="rdp")
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=fixed_loader(data),
        noise_multiplier=SIGMA, max_grad_norm=max_grad_norm, poisson_sampling=False, clipping=clipping,
        noise_generator=torch.Generator().manual_seed(SEED), grad_scaler=scaler,
    )
    return (model, engine, *out)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_grad_scaler_clips_the_unscaled_gradients(name, clipping):
    data = dataset(name)
    x0, y0 = data.tensors[0][:N], data.tensors[1][:N]
    bound = median_bounds(make_model(name), x0, y0, clipping)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1)  # the scale changes every step
    model, engine, priv, opt, loader = private(name, clipping, bound, scaler, data)
    batches = [(data.tensors[0][i : i + N], data.tensors[1][i : i + N]) for i in range(0, len(data), N)]
    expected, sums, _ = reference_steps(make_model(name), batches, clipping=clipping, bound=bound, reduction="mean",
                                        sigma=SIGMA, lr=LR, seed=SEED, expected=N)
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()
        scale = scaler.get_scale()
        scaler.scale(nn.CrossEntropyLoss()(priv(x), y)).backward()
        norms = per_sample_gradients(model, x, y, "mean")
        for k, p in model.named_parameters():
            assert_close(p.grad / scale, sums[step][k], F64, f"step {step} sum {k}", overall_scale(sums[step]))
            if clipping == "flat":
                assert_close(p.per_sample_l2, norms[k].flatten(1).square().sum(1), F64, f"per_sample_l2 {k}")
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == SCALE * 4
    for k, p in model.named_parameters():
        assert_close(p.detach(), expected[k], F64, f"parameter {k}", overall_scale(expected))
    assert sum(n for _, _, n in engine.accountant.history) == len(batches)


def test_an_overflow_skips_the_step_and_its_accounting():
    data = dataset("mlp")
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    model, engine, priv, opt, _ = private("mlp", "flat", 1.0, scaler, data)
    x, y = data.tensors[0][:N].clone(), data.tensors[1][:N]
    x[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(nn.CrossEntropyLoss()(priv(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt._is_last_step_skipped and engine.accountant.history == [] and scaler.get_scale() == SCALE / 2
    opt.zero_grad()
    scaler.scale(nn.CrossEntropyLoss()(priv(x[1:]), y[1:])).backward()
    scaler.step(opt)
    assert not opt._is_last_step_skipped and len(engine.accountant.history) == 1


def test_a_scaler_the_clipping_does_not_know_is_refused():
    data = dataset("mlp")
    x, y = data.tensors[0][:N], data.tensors[1][:N]
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    _, _, priv, opt, _ = private("mlp", "flat", 1.0, None, data)
    opt.zero_grad()
    scaler.scale(nn.CrossEntropyLoss()(priv(x), y)).backward()
    with pytest.raises(jacext.JacextError, match="did not know the scaler"):
        scaler.step(opt)

    _, _, priv, opt, _ = private("mlp", "flat", 1.0, scaler, data)
    opt.zero_grad()
    scaler.scale(nn.CrossEntropyLoss()(priv(x), y)).backward()
    with pytest.raises(jacext.JacextError, match="step with scaler.step"):
        opt.step()
    scaler.unscale_(opt)  # unscaling p.grad in place before the step
    with pytest.raises(jacext.JacextError, match="unscaled before the step"):
        scaler.step(opt)
