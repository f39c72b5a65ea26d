"""In-place changes: of a recorded input or an aliased output (jacext's error), of a fused
call's parameter before the backward (torch's error, as without jacext). Outputs computed from
each other without an in-place change get their own cotangents.
"""

import pytest
import torch
from backpack import backpack
from engine.fused_nets import FUSED, twins, watch
from reference import assert_close, loop_jacobian
from torch import nn

import jacext
from jacext.dp import ClipGrad


def test_modified_input_is_a_clear_error():
    model = jacext.extend(nn.Linear(2, 2))
    x = torch.randn(3, 2)
    with backpack(jacext.BatchGrad()):
        out = model(x)
        x.add_(1.0)
        with pytest.raises(jacext.JacextError, match="modified in place"):
            out.sum().backward()


class Pair(nn.Module):
    """Two outputs, the second computed from the first inside the module."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 2))
        self.bias = nn.Parameter(torch.randn(2))

    def forward(self, x):
        a = nn.functional.linear(x, self.weight, self.bias)
        return a, torch.tanh(a) * self.bias


class PairUser(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.pair, self.inplace = Pair(), inplace

    def forward(self, x):
        a, b = self.pair(x)
        return (a.mul_(2.0) if self.inplace else a * 2.0) + b


def test_outputs_computed_from_each_other_get_their_own_cotangents():
    model = PairUser().double()
    x = torch.randn(3, 2, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    got = jacext.jacobian(model, x)
    for name in expected:
        assert_close(got[name], expected[name], torch.float64, name)


def test_in_place_change_of_an_aliased_output():
    """The aliases are autograd nodes of their own, not views: changed in place, they stay on the
    path the tape recorded."""
    model = PairUser(inplace=True).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    got = jacext.jacobian(model, x)
    for name in expected:
        assert_close(got[name], expected[name], torch.float64, name)


def _backward_after_changing_the_weight(model, exts, when):
    """loss.backward() after ``lin.weight`` (of model[2], a Linear at 16 positions) is doubled in place,
    optionally after a first backward with retain_graph=True: the error it raises, or None."""
    with backpack(*exts):
        loss = model(torch.randn(5, 16, 4, dtype=model[0].weight.dtype)).square().sum()
        if when == "between_backwards":
            loss.backward(retain_graph=True)
        with torch.no_grad():
            model[2].weight.mul_(2)
        try:
            loss.backward()
        except RuntimeError as error:
            return error
    return None


CHANGED_EXTS = {"BatchGrad": lambda: [jacext.BatchGrad()], "ClipGrad": lambda: [ClipGrad(1.0, loss_reduction="sum")]}


@pytest.mark.parametrize("when", ["before_backward", "between_backwards"])
@pytest.mark.parametrize("exts", CHANGED_EXTS)
def test_parameter_changed_in_place_before_the_backward_is_torchs_error(exts, when, dtype):
    torch.manual_seed(0)
    model, plain = twins(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), dtype)
    seen = watch(model, "2")
    theirs = _backward_after_changing_the_weight(plain, [], when)
    ours = _backward_after_changing_the_weight(model, CHANGED_EXTS[exts](), when)
    assert seen["2"] == [FUSED]
    assert theirs is not None and "modified by an inplace operation" in str(theirs)
    assert ours is not None and "modified by an inplace operation" in str(ours)


@pytest.mark.parametrize("exts", CHANGED_EXTS)
def test_frozen_weight_changed_in_place_before_the_backward_is_torchs_error(exts):
    torch.manual_seed(0)
    model, plain = twins(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), torch.float64)
    for m in (model, plain):
        m[2].weight.requires_grad_(False)
    theirs = _backward_after_changing_the_weight(plain, [], "before_backward")
    assert theirs is not None and "modified by an inplace operation" in str(theirs)
    ours = _backward_after_changing_the_weight(model, CHANGED_EXTS[exts](), "before_backward")
    assert ours is not None and "modified by an inplace operation" in str(ours)
