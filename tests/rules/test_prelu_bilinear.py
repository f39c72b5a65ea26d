import pytest
import torch
from reference import check_grad_batch, check_jacobian
from torch import nn


@pytest.mark.parametrize(
    "num_parameters,shape", [(1, (4,)), (1, (3, 5)), (1, (2, 3, 4)), (3, (4, 3)), (3, (2, 3, 4)), (3, (2, 3, 2, 2))]
)
def test_prelu(num_parameters, shape, dtype):
    model = nn.PReLU(num_parameters, init=0.3).to(dtype)
    check_jacobian(model, torch.randn(*shape, dtype=dtype))


def test_prelu_between_layers(dtype):
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2), nn.PReLU()).to(dtype)
    check_grad_batch(model, nn.MSELoss(), torch.randn(5, 2, dtype=dtype), torch.randn(5, 3, dtype=dtype))


@pytest.mark.parametrize("leading", [(4,), (1,), (2, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_bilinear(leading, bias, dtype):
    model = nn.Bilinear(3, 2, 4, bias=bias).to(dtype)
    check_jacobian(model, torch.randn(*leading, 3, dtype=dtype), torch.randn(*leading, 2, dtype=dtype))
