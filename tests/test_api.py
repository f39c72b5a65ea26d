"""The public API: jacext.extend / unextend, the extensions' attributes and their shapes, and
the oracle itself (a wrong rule fails the comparison with reference.py's loops).
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian
from torch import nn

import jacext


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


class Reshaped(nn.Module):
    def __init__(self, out_shape):
        super().__init__()
        self.out_shape = out_shape
        self.lin = nn.Linear(4, out_shape[1:].numel())

    def forward(self, x):
        return self.lin(x).reshape(self.out_shape)


@pytest.mark.parametrize("out_shape", [(6,), (6, 3), (6, 2, 3)])
def test_jacobian_shape_follows_output(out_shape):
    model = jacext.extend(Reshaped(torch.Size(out_shape)))
    with backpack(jacext.BatchJacobian()):
        model(torch.randn(6, 4)).sum().backward()
    c = torch.Size(out_shape[1:]).numel()
    assert model.lin.weight.jacobian.shape == (*out_shape, c, 4)
    assert model.lin.bias.jacobian.shape == (*out_shape, c)


def test_extend_is_idempotent_and_unextend_removes_everything():
    model = jacext.extend(jacext.extend(mlp()))
    assert len(model._forward_hooks) == 1 and len(model[0]._forward_hooks) == 1
    jacext.unextend(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_jacext") for m in model.modules() for k in vars(m))


def test_no_context_no_attributes_and_same_grad():
    model = jacext.extend(mlp())
    model(torch.randn(3, 4)).sum().backward()
    assert not any(hasattr(p, "grad_batch") or hasattr(p, "jacobian") for p in model.parameters())


def test_frozen_parameters_are_skipped():
    model = mlp().double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    jacext.extend(model)
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    assert not hasattr(model[0].weight, "jacobian")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.jacobian, expected[name], torch.float64, name)


def test_reference_catches_a_wrong_rule(monkeypatch):
    """The oracle is not vacuous: a rule that is off by a factor fails the comparison."""
    from dataclasses import replace

    from jacext.rules import LAYERS

    model = mlp().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    expected = loop_grad_batch(model, nn.CrossEntropyLoss(), y, x)
    right = LAYERS[nn.Linear].rule
    wrong = replace(
        LAYERS[nn.Linear], rule=lambda m, a, k, g: {n: v * (1 + 1e-8) for n, v in right(m, a, k, g).items()}
    )
    monkeypatch.setitem(LAYERS, nn.Linear, wrong)
    jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        nn.CrossEntropyLoss()(model(x), y).backward()
    with pytest.raises(AssertionError):
        assert_close(model[0].weight.grad_batch, expected["0.weight"], torch.float64)


def test_public_modules_are_attributes_and_no_function_hides_one():
    import types

    assert isinstance(jacext.dp, types.ModuleType) and jacext.dp.ClipGrad is not None
    assert isinstance(jacext.optim, types.ModuleType) and jacext.optim.DPSGD is not None
    assert isinstance(jacext.kernels, types.ModuleType)
    assert jacext.kernels.top_eigenvalues is jacext.top_eigenvalues and jacext.kernels.ntk is jacext.ntk
    for name in jacext.__all__:
        value = getattr(jacext, name)
        assert not (callable(value) and f"jacext.{name}" in __import__("sys").modules), name
