"""A parameter used outside its own module's forward (jacext.engine.uses): exact at the operation
that uses it, also under a torch-function mode of the model's own; a use jacext cannot see (an
autograd.Function applied outside the owner) is a clear error naming it; reading its metadata
is fine.
"""

import pytest
import torch
from backpack import backpack
from reference import check_grad_batch
from torch import nn
from torch.overrides import TorchFunctionMode

import jacext


class FunctionalTie(nn.Module):
    """Uses the embedding matrix functionally in the parent's forward: a tied output head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return nn.functional.linear(self.lin(self.emb(x)), self.emb.weight)


class UsesChildBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.lin.bias


class ThroughFunction(nn.Module):
    """Applies an autograd.Function to its child's weight outside the child's call."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x) * Doubled.apply(self.lin.bias)


class Doubled(torch.autograd.Function):
    @staticmethod
    def forward(w):
        return 2 * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return 2 * g


@pytest.mark.parametrize("build", [FunctionalTie, UsesChildBias], ids=["tied head", "child bias"])
def test_parameter_used_outside_its_module_is_exact(build, dtype):
    """N = T = 4: the batch and the positions cannot be told apart by their sizes."""
    torch.manual_seed(0)
    model = build().to(dtype)
    x = torch.randint(0, 5, (4, 4)) if build is FunctionalTie else torch.randn(4, 4, 2, dtype=dtype)
    out = model(x)
    y = torch.randn(out.shape, dtype=dtype)
    check_grad_batch(model, nn.MSELoss(reduction="sum"), y, x)


def test_parameter_through_a_function_outside_its_module_is_a_clear_error():
    model = jacext.extend(ThroughFunction())
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match=r"'lin\.bias' reaches .*autograd"):
        model(torch.randn(3, 2))


class CountingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class InsideMode(nn.Module):
    """Runs its body inside a torch-function mode of its own, so that jacext's parameter-use
    guard is not the innermost mode while the body's layers run and are recorded."""

    def __init__(self, body):
        super().__init__()
        self.body, self.mode = body, CountingMode()

    def forward(self, x):
        with self.mode:
            return self.body(x)


def test_a_torch_function_mode_inside_the_forward(dtype):
    torch.manual_seed(0)
    model = InsideMode(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).to(dtype)
    check_grad_batch(model, nn.MSELoss(reduction="sum"), torch.randn(5, 2, dtype=dtype), torch.randn(5, 3, dtype=dtype))
    assert model.mode.calls > 0
    misuse = jacext.extend(InsideMode(ThroughFunction()))  # the guard still sees the body's uses
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match=r"'body\.lin\.bias' reaches"):
        misuse(torch.randn(2, 2))


def test_parameter_metadata_outside_its_module_is_fine():
    class Peeks(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            scale = self.lin.weight.detach().norm()  # no gradient flows: not a use
            return self.lin(x) / scale

    jacext.jacobian(Peeks(), torch.randn(2, 2))
