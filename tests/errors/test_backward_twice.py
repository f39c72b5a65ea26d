"""A second backward (with and without ``retain_graph``) and two forward passes in one
backward: torch's error or consistent results, never a mix of two batches' attributes.
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch
from torch import nn

import jacext

from .common import EXTENSIONS, cases, mlp, nothing_left_behind, snapshot

LOSSES = {
    "cross_entropy": lambda out: nn.CrossEntropyLoss(reduction="sum")(out, torch.tensor([0, 1, 2, 0])),
    "sum": lambda out: out.sum(),  # saves no tensor: the second backward gets as far as jacext
}


@pytest.mark.parametrize("loss", LOSSES.values(), ids=LOSSES.keys())
@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_second_backward_without_retain_graph_is_torchs_error_and_changes_nothing(make, loss):
    """p.grad stays that of the first backward; the attributes stay the first backward's (or,
    where jacext clears them on an error, are gone for every parameter)."""
    model = jacext.extend(mlp())
    ext = make()
    with backpack(ext):
        value = loss(model(torch.randn(4, 4)))
        value.backward()
        first = snapshot(model, ext.savefield)
        with pytest.raises(RuntimeError, match="second time"):
            value.backward()
    kept = [hasattr(p, ext.savefield) for p in model.parameters()]
    assert all(kept) or not any(kept), "some attributes were removed, others kept"
    for (attr, grad), p in zip(first, model.parameters(), strict=True):  # the first backward's, or none at all
        assert torch.equal(p.grad, grad) and (
            not hasattr(p, ext.savefield) or torch.equal(getattr(p, ext.savefield), attr)
        )
    assert nothing_left_behind()


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_second_backward_with_retain_graph_replaces_the_attributes(make):
    """p.grad accumulates as torch's does; the attributes are those of this backward, not a sum."""
    model = jacext.extend(mlp())
    ext = make()
    with backpack(ext):
        value = LOSSES["cross_entropy"](model(torch.randn(4, 4)))
        value.backward(retain_graph=True)
        first = snapshot(model, ext.savefield)
        value.backward()
    for (attr, grad), p in zip(first, model.parameters(), strict=True):
        torch.testing.assert_close(getattr(p, ext.savefield), attr)
        torch.testing.assert_close(p.grad, 2 * grad)


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_two_forward_passes_in_one_backward_are_an_error_or_all_samples(make):
    """Either a clear error, or the results of the N1 + N2 samples, as for the concatenated batch."""
    model = jacext.extend(mlp()).double()
    x1, x2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    ext = make()
    with backpack(ext):
        value = model(x1).square().sum() + model(x2).square().sum()
        try:
            value.backward()
        except jacext.JacextError:
            return
    assert all(getattr(p, ext.savefield).shape[0] == 6 for p in model.parameters())
    if ext.savefield == "grad_batch":
        expected = loop_grad_batch(model, lambda out, y: out.square().sum(), None, torch.cat([x1, x2]))
        for name, p in model.named_parameters():
            assert_close(p.grad_batch, expected[name], torch.float64, name)
