"""A model that is not extended, or a forward outside the ``backpack`` context: a clear error
naming ``jacext.extend(model)`` (or the context), and the setups that need no extension.
"""

import backpack.extensions as bpext
import pytest
import torch
from backpack import backpack
from torch import nn

import jacext
from jacext.dp import ClipGrad

from .common import EXTENSIONS, cases, mlp, nothing_left_behind


def unextended():
    return jacext.unextend(jacext.extend(mlp())), nn.Identity()


def head_not_extended():
    return jacext.extend(mlp()), nn.Linear(3, 2)  # the trainable head runs outside the extended module


def never_extended():
    return mlp(), nn.Identity()


SETUPS = {"unextended": unextended, "head_not_extended": head_not_extended, "never_extended": never_extended}


@pytest.mark.parametrize(
    "setup,make",
    [
        pytest.param(SETUPS[s], EXTENSIONS[e], id=f"{s}-{e}")
        for s in SETUPS
        for e in EXTENSIONS
        if (s, e) != ("never_extended", "BatchGrad")  # test_model_never_extended_is_a_clear_error
    ],
)
def test_model_not_extended_is_a_clear_error(setup, make):
    model, head = setup()
    with backpack(make()), pytest.raises(jacext.JacextError, match=r"jacext\.extend\(model\)"):
        head(model(torch.randn(2, 4))).sum().backward()
    assert nothing_left_behind() and all(p.grad is None for p in model.parameters())


def test_model_never_extended_is_a_clear_error():
    model = mlp()
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="jacext.extend"):
        model(torch.randn(2, 4))


def test_backpack_extension_needs_backpack_hooks():
    model = jacext.extend(mlp())
    with backpack(bpext.BatchL2Grad()), pytest.raises(jacext.JacextError, match="backpack=True"):
        model(torch.randn(2, 4))


def test_frozen_module_that_is_not_extended_is_fine():
    """A frozen teacher inside the context needs no extension."""
    model, teacher = jacext.extend(mlp()), mlp().requires_grad_(False)
    x = torch.randn(3, 4)
    with backpack(ClipGrad(1.0, loss_reduction="sum")):
        (model(x) - teacher(x)).square().sum().backward()
    assert all(p.per_sample_l2.shape == (3,) for p in model.parameters())


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_forward_outside_the_context_is_a_clear_error(make):
    model = jacext.extend(mlp())
    ext = make()
    with backpack(ext):
        model(torch.randn(4, 4)).sum().backward()
    out = model(torch.randn(2, 4))
    with backpack(ext), pytest.raises(jacext.JacextError, match="context"):
        out.square().sum().backward()


def test_wrapper_around_an_extended_model_and_loss_modules_are_fine():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = jacext.extend(mlp())

        def forward(self, x):
            return self.net(x)

    model = Wrapper()
    with backpack(jacext.BatchGrad()):
        nn.CrossEntropyLoss()(model(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
    assert model.net[0].weight.grad_batch.shape == (2, 5, 4)
