"""A parameter used outside its own module's forward (jacext.engine.uses): a clear error naming
it, also under a torch-function mode of the model's own; reading its metadata is fine.
"""

import pytest
import torch
from backpack import backpack
from reference import check_grad_batch
from torch import nn
from torch.overrides import TorchFunctionMode

import jacext


class FunctionalTie(nn.Module):
    """Uses the embedding matrix functionally in the parent's forward: not attributable."""

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


@pytest.mark.parametrize(
    "model,x,where",
    [
        (
            FunctionalTie(),
            torch.tensor([[1, 2]]),
            r"'emb\.weight' is used in the forward of a module without parameters",
        ),
        (nn.Sequential(UsesChildBias()), torch.randn(2, 2), r"'0\.lin\.bias' is used in"),
    ],
)
def test_parameter_used_outside_its_module_is_a_clear_error(model, x, where):
    jacext.extend(model)
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match=where):
        model(x)


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
    misuse = jacext.extend(InsideMode(UsesChildBias()))  # the guard still sees the body's uses
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match=r"'body\.lin\.bias' is used in"):
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
