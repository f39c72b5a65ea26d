"""minSR / SR steps against direct linear algebra, and the SR optimizer in a training loop."""

import pytest
import torch
from common_models import backward_with_jacobian, regression
from reference import loop_jacobian

from jacext.natural_gradient import SR, minsr_step, sr_step

DTYPES = [torch.float64, torch.complex128]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


def random_problem(dtype, n=6, c=2, p=30):
    return torch.randn(n, c, p, dtype=dtype), torch.randn(n, c, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
def test_minsr_step_is_damped_least_squares(dtype):
    J, r = random_problem(dtype)
    rows, damping = J.reshape(12, 30), 0.1
    sample_space = rows.mH @ torch.linalg.solve(rows @ rows.mH + damping * torch.eye(12, dtype=dtype), r.reshape(-1))
    parameter_space = torch.linalg.solve(rows.mH @ rows + damping * torch.eye(30, dtype=dtype), rows.mH @ r.reshape(-1))
    close(minsr_step(J, r, damping), sample_space)
    close(minsr_step(rows, r.reshape(-1), damping), parameter_space)


@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
def test_sr_step_preconditions_with_the_metric(dtype):
    J, _ = random_problem(dtype, n=40, c=1, p=8)
    grad, damping = torch.randn(8, dtype=dtype), 1e-3
    rows = J.reshape(40, 8)
    metric = rows.mH @ rows / 40 + damping * torch.eye(8, dtype=dtype)
    close(sr_step(J, grad, damping), torch.linalg.solve(metric, grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=["real", "complex"])
def test_sr_and_minsr_agree(dtype):
    J, r = random_problem(dtype)
    n, damping = J.shape[0], 0.05
    grad = J.reshape(12, 30).mH @ r.reshape(-1) / n
    close(sr_step(J, grad, damping / n), minsr_step(J, r, damping))


def test_complex_residual_with_real_jacobian_is_promoted():
    J, r = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, dtype=torch.complex128)
    expected = minsr_step(J, r.real, 0.1) + 1j * minsr_step(J, r.imag, 0.1)
    close(minsr_step(J, r, 0.1), expected)


def loop_step(model, x, residual, damping, center, weights=None):
    """The step from the autograd-loop Jacobian by the formula in SR's docstring."""
    J = torch.cat([j.reshape(x.shape[0], residual[0].numel(), -1) for j in loop_jacobian(model, x).values()], dim=2)
    r = residual.reshape(x.shape[0], -1)
    w = torch.ones(x.shape[0], dtype=J.dtype) if weights is None else weights / weights.mean()
    if center:
        J = J - (w.view(-1, 1, 1) * J).sum(0) / w.sum()
    return minsr_step(J * w.sqrt().view(-1, 1, 1), r * w.sqrt().view(-1, 1), damping)


@pytest.mark.parametrize("mode", ["minsr", "sr"])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_sr_optimizer_step_is_minsr_step_on_concatenated_jacobian(mode, center, weighted):
    model, x, y = regression()
    weights = torch.rand(10, dtype=torch.float64) if weighted else None
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    residual = backward_with_jacobian(model, x, y)
    expected = loop_step(model, x, residual, 1e-3, center, weights)
    SR(model.parameters(), lr=0.3, damping=1e-3, mode=mode, center=center).step(residual, weights)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    close((before - after) / 0.3, expected)
    assert not any(hasattr(p, "jacobian") for p in model.parameters())


def test_sr_optimizer_decreases_least_squares_loss():
    model, x, y = regression()
    opt = SR(model.parameters(), lr=0.5, damping=1e-4)
    losses = []
    for _ in range(15):
        residual = backward_with_jacobian(model, x, y)
        losses.append(0.5 * residual.square().sum().item())
        opt.step(residual)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 1e-3 * losses[0], losses


def test_sr_optimizer_learning_rate_per_group():
    model, x, y = regression()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    before = [p.detach().clone() for p in model.parameters()]
    residual = backward_with_jacobian(model, x, y)
    expected = loop_step(model, x, residual, 1e-3, center=False)
    SR([{"params": first, "lr": 0.1}, {"params": second, "lr": 0.2}], damping=1e-3).step(residual)
    lrs = [0.1, 0.1, 0.2, 0.2]
    moved = torch.cat(
        [((b - p.detach()) / lr).reshape(-1) for b, p, lr in zip(before, model.parameters(), lrs, strict=True)]
    )
    close(moved, expected)
