"""Results of the previous batch: replaced by each backward, zeros (not stale values) for a
parameter unused in this pass, no attribute for one frozen since, and the results the user kept
(a tensor, a view, a numpy array, in a container) are not overwritten.
"""

import pytest
import torch
from backpack import backpack
from torch import nn

import jacext

from .common import EXTENSIONS, cases, mlp


def test_results_are_replaced_by_each_backward():
    model = jacext.extend(mlp())
    for n in (5, 2):
        with backpack(jacext.BatchGrad()):
            nn.CrossEntropyLoss()(model(torch.randn(n, 4)), torch.zeros(n, dtype=torch.long)).backward()
        assert model[0].weight.grad_batch.shape == (n, 5, 4)


def test_unused_parameters_get_zeros():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = jacext.extend(Branchy())
    with backpack(jacext.BatchJacobian()):
        model(torch.randn(3, 2)).sum().backward()
    assert torch.equal(model.unused.weight.jacobian, torch.zeros(3, 2, 2, 2))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, use_b=True):
        return self.a(x) + self.b(x) if use_b else self.a(x)


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_parameter_unused_in_this_pass_gets_zeros_not_the_previous_values(make):
    model = jacext.extend(Branchy())
    ext = make()
    with backpack(ext):
        model(torch.randn(4, 4)).sum().backward()
        model(torch.randn(2, 4), use_b=False).square().sum().backward()
    for p in model.b.parameters():
        value = getattr(p, ext.savefield)
        assert value.shape[0] == 2 and not value.any()


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_parameter_frozen_since_the_previous_pass_keeps_no_stale_attribute(make):
    """tests/test_api.py: a frozen parameter gets no attribute; that holds for one frozen in between too."""
    model = jacext.extend(Branchy())
    ext = make()
    with backpack(ext):
        model(torch.randn(4, 4)).sum().backward()
        model.b.requires_grad_(False)
        model(torch.randn(2, 4)).square().sum().backward()
    assert not any(hasattr(p, ext.savefield) for p in model.b.parameters())


KEPT = {
    "tensor": lambda t: t,
    "view": lambda t: t[0],
    "numpy": lambda t: t.numpy(),
    "list": lambda t: [t],
}


@pytest.mark.parametrize("keep", KEPT.values(), ids=KEPT.keys())
@pytest.mark.parametrize("make", cases(**{k: v for k, v in EXTENSIONS.items() if k in ("BatchGrad", "BatchJacobian")}))
def test_results_the_user_kept_are_not_overwritten_by_the_next_backward(make, keep):
    """A result the user holds (the tensor, a view, a numpy array, in a container) keeps the
    values of its batch, even where the next results have the same shape."""
    model = jacext.extend(mlp())
    ext = make()
    kept, values = [], []
    for _ in range(2):  # same shapes: the next results could reuse the memory of the previous ones
        with backpack(ext):
            model(torch.randn(4, 4)).square().sum().backward()
        kept.append([keep(getattr(p, ext.savefield)) for p in model.parameters()])
        values.append([getattr(p, ext.savefield).clone() for p in model.parameters()])
    for held, value in zip(kept[0], values[0], strict=True):
        assert torch.equal(as_tensor(held), as_tensor(keep(value)))
    assert not all(torch.equal(a, b) for a, b in zip(values[0], values[1], strict=True))


def as_tensor(held):
    return torch.as_tensor(held[0] if isinstance(held, list) else held)
