"""DP-SGD: clipping inside the backward pass, noise, accounting, and Opacus on top of jacext."""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, trainable
from torch import nn

import jacext
from jacext.dp import DPSGD, ClipGrad, epsilon, to_opacus

opacus = pytest.importorskip("opacus")


def model_and_data(dtype, n=6):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4), nn.Linear(4, 3)
    ).to(dtype)
    return model, torch.randn(n, 2, 6, dtype=dtype) * 3, torch.randint(0, 3, (n,))


def clipped_sum_reference(model, lossfunc, y, x, max_norm, reduction):
    per_sample = loop_grad_batch(model, lossfunc, y, x)  # contributions: 1/N included for "mean"
    scale = x.shape[0] if reduction == "mean" else 1
    grads = {k: v * scale for k, v in per_sample.items()}
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    w = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("n,n...->...", w, g) for k, g in grads.items()}, grads, w


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_clipgrad_gives_the_clipped_sum_in_one_backward(reduction, dtype):
    model, x, y = model_and_data(dtype)
    lossfunc = nn.CrossEntropyLoss(reduction=reduction)
    max_norm = 0.5
    expected, per_sample, w = clipped_sum_reference(model, lossfunc, y, x, max_norm, reduction)
    assert (w < 1).any() and (w == 1).any() or (w < 1).all(), "the data should exercise clipping"
    jacext.extend(model)
    with backpack(ClipGrad(max_norm, loss_reduction=reduction)):
        lossfunc(model(x), y).backward()
    for name, p in trainable(model):
        assert_close(p.grad, expected[name], dtype, name, max(e.abs().max().item() for e in expected.values()))
        assert_close(p.per_sample_l2, per_sample[name].flatten(1).square().sum(1), dtype, name)
    clipped = (
        torch.stack([(w.view(-1, *[1] * (g.dim() - 1)) * g).flatten(1).square().sum(1) for g in per_sample.values()])
        .sum(0)
        .sqrt()
    )
    assert (clipped <= max_norm * (1 + 1e-6)).all()


def test_empty_batch_gives_empty_norms_and_zero_grad():
    model, x, y = model_and_data(torch.float64, n=0)
    jacext.extend(model)
    with backpack(ClipGrad(1.0, loss_reduction="sum"), jacext.BatchGrad()):
        nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    for _, p in trainable(model):
        assert p.per_sample_l2.shape == (0,) and p.grad_batch.shape == (0, *p.shape)
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_noise_has_the_asked_standard_deviation():
    """100 000 noise draws; the sample std is within 5 standard errors (failure probability < 1e-6)."""
    p = nn.Parameter(torch.zeros(100_000, dtype=torch.float64))
    p.grad = torch.zeros_like(p)
    sigma, c, batch = 1.3, 0.7, 10
    opt = DPSGD(
        [p],
        lr=1.0,
        noise_multiplier=sigma,
        max_grad_norm=c,
        expected_batch_size=batch,
        generator=torch.Generator().manual_seed(0),
    )
    opt.privatise()
    expected = sigma * c / batch
    standard_error = expected / (2 * p.numel()) ** 0.5
    assert abs(p.grad.std().item() - expected) < 5 * standard_error
    assert abs(p.grad.mean().item()) < 5 * expected / p.numel() ** 0.5


def test_epsilon_is_the_accountants():
    from opacus.accountants import RDPAccountant

    ours, theirs = RDPAccountant(), RDPAccountant()
    p = nn.Parameter(torch.zeros(3))
    opt = DPSGD(
        [p], lr=0.1, noise_multiplier=1.1, max_grad_norm=1.0, expected_batch_size=32, sample_rate=0.05, accountant=ours
    )
    for _ in range(20):
        p.grad = torch.zeros(3)
        opt.step()
        theirs.step(noise_multiplier=1.1, sample_rate=0.05)
    assert epsilon(ours, 1e-5) == theirs.get_epsilon(delta=1e-5) > 0


def test_opacus_dpoptimizer_on_top_of_jacext_matches_clipgrad():
    from opacus.optimizers import DPOptimizer

    model, x, y = model_and_data(torch.float64)
    lossfunc = nn.CrossEntropyLoss()
    jacext.extend(model)
    with backpack(ClipGrad(0.5)):
        lossfunc(model(x), y).backward()
    ours = [p.grad.clone() / x.shape[0] for p in model.parameters()]
    model.zero_grad()
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        expected_batch_size=x.shape[0],
    )
    with backpack(jacext.BatchGrad()):
        lossfunc(model(x), y).backward()
    to_opacus(model)
    opt.step()
    for p, g in zip(model.parameters(), ours, strict=True):
        assert_close(p.grad, g, torch.float64)
