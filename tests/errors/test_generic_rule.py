"""Modules without a hand-written rule: the generic rule serves them (also added after
``extend``, or frozen); where it cannot (data-dependent control flow), the error names the
module's path and class and says to register a rule.
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_jacobian
from torch import nn

import jacext


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


class Custom(nn.Module):
    """Not quasi-linear and without a hand-written rule: the generic rule serves it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * torch.sin(self.scale) ** 2


class Branching(Custom):
    """Data-dependent control flow: torch.func cannot vmap it, so no rule can serve it."""

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
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), Branching())))
    with backpack(jacext.BatchGrad()):
        out = model(torch.randn(2, 2))
        with pytest.raises(jacext.JacextError, match=r"'1\.1' \(Branching\).*generic rule.*register"):
            out.sum().backward()


def test_frozen_unsupported_module_is_fine():
    model = nn.Sequential(nn.Linear(2, 3), Custom().requires_grad_(False))
    jacext.jacobian(model, torch.randn(2, 2))
