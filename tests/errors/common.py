"""What the bad-input tests share: the extensions most cases run (BatchGrad, BatchJacobian,
BatchL2Grad, dp.ClipGrad), two small models, and the checks that nothing was left half-done.
"""

import pytest
import torch
from torch import nn

import jacext
from jacext.dp import ClipGrad
from jacext.engine.hooks import recording

EXTENSIONS = {
    "BatchGrad": jacext.BatchGrad,
    "BatchJacobian": jacext.BatchJacobian,
    "BatchL2Grad": jacext.BatchL2Grad,
    "ClipGrad": lambda: ClipGrad(0.1, loss_reduction="sum"),
}


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def nothing_left_behind():
    """No tape open and no torch-function mode of jacext's left on the stack."""
    return recording() is None and not torch.overrides._get_current_function_mode_stack()


def untouched(model, ext):
    """Neither p.grad nor the extension's attribute was written."""
    return all(p.grad is None and not hasattr(p, ext.savefield) for p in model.parameters())


def snapshot(model, field):
    return [(getattr(p, field).clone(), p.grad.clone()) for p in model.parameters()]


def xfail(reason):
    return pytest.mark.xfail(strict=True, reason=reason)


def cases(marked=None, **params):
    """pytest.param per id; ``marked``: {id: xfail reason}."""
    marked = marked or {}
    return [pytest.param(v, id=k, marks=[xfail(marked[k])] if k in marked else []) for k, v in params.items()]


def batchnorm_net():
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


class _OldStyleScale(torch.autograd.Function):
    """x * s as an old-style Function (forward with ctx): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s, (g * x).sum(0)


class Unservable(nn.Module):
    """Its parameter reaches its output only through an autograd.Function that torch.func
    cannot transform: the generic rule, the only one that can see that use, fails on it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return _OldStyleScale.apply(x, self.scale)
