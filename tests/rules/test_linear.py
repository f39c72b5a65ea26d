import pytest
import torch
from reference import check_grad_batch, check_jacobian
from torch import nn


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


@pytest.mark.parametrize("streamed", [False, True], ids=["elementwise", "batched"])
def test_outer_products_both_ways(streamed, dtype, monkeypatch):
    """One position per sample: J_W = G x^T, as an elementwise product or (results above
    linear.STREAMED bytes) a batched product; BatchJacobian (V = C) and BatchGrad (V = 1)."""
    import jacext.rules.linear as linear_rules

    if streamed:
        monkeypatch.setattr(linear_rules, "STREAMED", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x = torch.randn(6, 4, dtype=dtype)
    check_jacobian(model, x)
    check_grad_batch(model, nn.CrossEntropyLoss(reduction="sum"), torch.randint(0, 3, (6,)), x)
