"""The generic rule (torch.func on the module alone) for layers without a hand-written rule."""

import torch
from reference import check_grad_batch, check_jacobian
from torch import nn


class Squared(nn.Module):
    """Not quasi-linear: y = (W * W) x + sin(b), called with a per-sample keyword tensor."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x, scale=1.0):
        return scale * (x @ (self.W * self.W).T + torch.sin(self.b))


class RawParameters(nn.Module):
    """A root that owns a raw parameter used in functional code, around children with their own rules."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.squared = Squared()
        self.alpha = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.alpha * self.squared(h, scale=1.0 + x[:, :1] ** 2)


def test_custom_layer(dtype):
    check_jacobian(Squared().to(dtype), torch.randn(3, 4, dtype=dtype))


def test_custom_layer_over_a_sequence(dtype):
    check_jacobian(Squared().to(dtype), torch.randn(2, 5, 4, dtype=dtype))


def test_raw_parameters_in_the_root(dtype):
    x = torch.randn(3, 4, dtype=dtype)
    check_jacobian(RawParameters().to(dtype), x)
    check_grad_batch(RawParameters().to(dtype), nn.MSELoss(), torch.randn(3, 3, dtype=dtype), x)
