"""Exceptions in a forward pass or in a rule: raised as they are (or as a JacextError naming
the module), with no tape, mode or half-written result left behind.
"""

import gc

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian
from torch import nn

import jacext
from jacext.engine.record import Tape

from .common import EXTENSIONS, Unservable, cases, nothing_left_behind, untouched


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(5))

    def forward(self, h, fail):
        if fail:
            raise ValueError("boom")
        return h * self.scale


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.inner, self.head = nn.Linear(4, 5), Raises(), nn.Linear(5, 3)

    def forward(self, x, fail=False):
        return self.head(self.inner(self.lin(x), fail))


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_exception_in_a_submodule_forward_leaves_nothing_behind(make):
    model = jacext.extend(Nested()).double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    ext = make()
    with backpack(ext):
        with pytest.raises(ValueError, match="boom"):
            model(x, fail=True)
        assert nothing_left_behind()
        nn.CrossEntropyLoss(reduction="sum")(model(x), y).backward()
    if ext.savefield == "grad_batch":
        expected = loop_grad_batch(model, nn.CrossEntropyLoss(reduction="sum"), y, x)
        for name, p in model.named_parameters():
            assert_close(p.grad_batch, expected[name], torch.float64, name)
    assert all(getattr(p, ext.savefield).shape[0] == 3 for p in model.parameters())


def test_exception_in_the_forward_of_jacobian_leaves_the_model_as_it_was():
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Nested()

        def forward(self, x):
            return self.net(x, fail=True)

    model = Failing()
    with pytest.raises(ValueError, match="boom"):
        jacext.jacobian(model, torch.randn(2, 4))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_jacext") for m in model.modules() for k in vars(m))
    assert nothing_left_behind()


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, fail=False):
        h = self.lin(x)
        if fail:
            raise ValueError("boom")
        return h


def test_exception_in_forward_leaves_nothing_behind():
    model = jacext.extend(Failing()).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    with backpack(jacext.BatchJacobian()):
        with pytest.raises(ValueError, match="boom"):
            model(x, fail=True)
        model(x).sum().backward()
    assert jacext.engine.hooks.recording() is None
    assert_close(model.lin.weight.jacobian, loop_jacobian(model, x)["lin.weight"], torch.float64)
    assert not torch.overrides._get_current_function_mode_stack()


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_rule_that_fails_in_the_backward_changes_nothing(make):
    """test_generic_rule.py checks the error's wording; here: no p.grad and no attribute afterwards."""
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3), Unservable()))
    ext = make()
    with backpack(ext), pytest.raises(jacext.JacextError, match=r"'1' \(Unservable\)"):
        model(torch.randn(2, 2)).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()


def tapes_of(model):
    gc.collect()
    return [o for o in gc.get_objects() if type(o) is Tape and o.root is model]


@pytest.mark.parametrize(
    "where",
    cases(in_the_forward="forward", in_the_loss="loss", nowhere=""),
)
def test_no_tape_outlives_the_context(where):
    """Once the context is left (by an exception or normally) and the user holds no output, no
    tape of the model remains: nothing holds on to the batch's activations."""
    model = jacext.extend(Nested())

    def step():
        with backpack(jacext.BatchGrad()):
            out = model(torch.randn(3, 4), fail=where == "forward")
            if where == "loss":
                nn.CrossEntropyLoss()(out, torch.tensor([0, 1]))  # 2 targets for 3 samples
            out.sum().backward()

    try:
        step()
        raised = False
    except ValueError:
        raised = True
    assert raised == (where != "")
    assert not tapes_of(model) and nothing_left_behind()
