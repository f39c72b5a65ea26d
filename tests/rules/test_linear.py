import pytest
import torch
from torch import nn

from reference import check_jacobian


@pytest.mark.parametrize("shape", [(5, 4), (1, 4), (3, 2, 4), (2, 3, 2, 4)], ids=["N", "N=1", "NT", "NAB"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias, dtype):
    model = nn.Linear(4, 3, bias=bias).to(dtype)
    check_jacobian(model, torch.randn(*shape, dtype=dtype))


def test_linear_scalar_output_per_sample(dtype):
    """Out of shape (N,): p.jacobian is (N, *p.shape), the seed case J[n, i]."""

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1)

    model = Scalar().to(dtype)
    expected = check_jacobian(model, torch.randn(6, 4, dtype=dtype))
    assert expected["lin.weight"].shape == (6, 1, 4)
