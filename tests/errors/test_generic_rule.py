"""Modules without a hand-written rule: their parameters are differentiated at the operations
where they meet the batch (also for modules added after ``extend``, or frozen); a use only the
generic rule sees (through an autograd.Function) that it cannot serve gives an error naming the
module's path and class and saying to register a rule.
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_jacobian
from torch import nn

import jacext

from .common import Unservable


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


class Custom(nn.Module):
    """Not quasi-linear and without a hand-written rule: its product with the batch is a meet."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * torch.sin(self.scale) ** 2


class Branching(Custom):
    """Control flow on the batch's values: the operation that ran is the one differentiated."""

    def forward(self, x):
        return x * self.scale if bool((x > 0).all()) else x


def test_module_added_after_extend_is_covered():
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3))).double()
    model.append(Custom().double())
    x = torch.randn(2, 2, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    assert_close(model[1].scale.jacobian, expected["1.scale"], torch.float64)


def test_module_no_rule_can_serve_names_path_and_class():
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), Unservable())))
    with backpack(jacext.BatchGrad()):
        out = model(torch.randn(2, 2))
        with pytest.raises(jacext.JacextError, match=r"'1\.1' \(Unservable\).*generic rule.*register"):
            out.sum().backward()


def test_data_dependent_control_flow_is_the_branch_that_ran():
    """``bool((x > 0).all())`` looks at the whole batch; the per-sample derivatives are those of
    the forward pass that ran (here: the product with the scale on every sample)."""
    torch.manual_seed(0)
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3), Branching()).double())
    x = torch.randn(4, 2, dtype=torch.float64)
    model[0].bias.data.fill_(10.0)  # every activation positive: the product runs
    expected = loop_jacobian(model, x)
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    assert_close(model[1].scale.jacobian, expected["1.scale"], torch.float64)


def test_frozen_unsupported_module_is_fine():
    model = nn.Sequential(nn.Linear(2, 3), Custom().requires_grad_(False))
    jacext.jacobian(model, torch.randn(2, 2))
