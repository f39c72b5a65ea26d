"""Activation checkpointing: non-reentrant recomputation is exact; reentrant is refused clearly."""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian
from torch import nn
from torch.utils.checkpoint import checkpoint

import jacext
from jacext.dp import ClipGrad


class Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.a, self.c = nn.Linear(4, 5), nn.Linear(5, 3)
        self.b = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.LayerNorm(5))

    def forward(self, x):
        return self.c(checkpoint(self.b, self.a(x), use_reentrant=self.reentrant))


@pytest.mark.parametrize("clip", [False, True])
def test_non_reentrant_checkpointing_against_the_loop(clip):
    torch.manual_seed(0)
    model = Checkpointed(False).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    lossfunc = nn.CrossEntropyLoss()
    grads, jacobians = loop_grad_batch(model, lossfunc, y, x), loop_jacobian(model, x)
    jacext.extend(model)
    with backpack(jacext.BatchGrad(), jacext.BatchJacobian()):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, grads[name], torch.float64, name)
        assert_close(p.jacobian, jacobians[name], torch.float64, name)
    if clip:  # fused calls are not fused under checkpointing's saved-tensor hooks
        norms = sum((g * len(x)).flatten(1).square().sum(1) for g in grads.values()).sqrt()  # of each l_n
        bound = float(norms.median())
        weights = (bound / (norms + 1e-6)).clamp(max=1)
        model.zero_grad()
        with backpack(ClipGrad(bound)):
            lossfunc(model(x), y).backward()
        for name, p in model.named_parameters():
            assert_close(p.grad, torch.einsum("n,n...->...", weights, grads[name] * len(x)),  # the clipped sum
                         torch.float64, name)


@pytest.mark.parametrize("make", [jacext.BatchGrad, jacext.BatchJacobian, lambda: ClipGrad(1.0)])
def test_reentrant_checkpointing_is_refused_without_stale_results(make):
    model = jacext.extend(Checkpointed(False))
    x = torch.randn(4, 4, requires_grad=True)
    ext = make()
    with backpack(ext):  # results of an earlier batch, which must not stay
        model(torch.randn(2, 4)).sum().backward()
    model.reentrant = True
    # BatchJacobian's pull-back is torch.autograd.grad, which torch's reentrant checkpoint refuses itself
    with backpack(ext), pytest.raises((jacext.JacextError, RuntimeError), match="use_reentrant=False"):
        model(x).sum().backward()
    assert not any(hasattr(p, ext.savefield) for p in model.parameters())
