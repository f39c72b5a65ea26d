"""Invalid arguments to jacext.ntk and jacext.natural_gradient: the mode, data that cannot be
split into fixed batches, a singular system, mismatched shapes, SR without fresh Jacobians.
"""

import pytest
import torch
from common_models import backward_with_jacobian, regression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jacext.kernels import ntk, top_eigenvalues
from jacext.natural_gradient import SR, minsr_step, sr_step


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_invalid_arguments():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="mode"):
        ntk(mlp(), x, mode="diag")
    with pytest.raises(ValueError, match="shuffle=False"):
        ntk(mlp(), DataLoader(TensorDataset(x), batch_size=2, shuffle=True))
    with pytest.raises(TypeError, match="re-iterable"):
        ntk(mlp(), (b for b in x.split(2)))
    with pytest.raises(ValueError, match="batch_size"):
        ntk(mlp(), [x], batch_size=2)
    with pytest.raises(ValueError, match="3 k"):
        top_eigenvalues(mlp(), x, 5, method="lobpcg")


def test_singular_and_mismatched_inputs_raise():
    J = torch.randn(8, 3, dtype=torch.float64)  # J J^H (8 x 8) has rank 3
    with pytest.raises(ValueError, match="increase the damping"):
        minsr_step(J, torch.randn(8, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="7 entries for 8 rows"):
        minsr_step(J, torch.randn(7, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="4 entries for 3 parameters"):
        sr_step(J, torch.randn(4, dtype=torch.float64), 0.1)


def test_sr_optimizer_needs_fresh_jacobians():
    model, x, y = regression()
    opt = SR(model.parameters())
    opt.step(backward_with_jacobian(model, x, y))
    model(x).sum().backward()  # outside the backpack context: no p.jacobian
    with pytest.raises(RuntimeError, match="BatchJacobian"):
        opt.step(torch.zeros(10, 2, dtype=torch.float64))
    residual = backward_with_jacobian(model, x, y)
    with pytest.raises(ValueError, match="residual's shape"):
        opt.step(residual[:, :1])
    with pytest.raises(ValueError, match="mode"):
        SR(model.parameters(), mode="natural")
