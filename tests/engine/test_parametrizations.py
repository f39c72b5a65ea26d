"""Weights computed from other parameters: ``torch.nn.utils.parametrizations`` (weight_norm,
spectral_norm, orthogonal), a custom parametrization registered with
``torch.nn.utils.parametrize``, and the old hook-based ``torch.nn.utils.weight_norm`` (its
forward pre-hook computes ``weight = g v / |v|`` before the layer runs), applied before or after
``jacext.extend``, on the extended module itself or on a child.

The parametrized weight is a tensor computed from the parameters without the batch; it meets
the batch inside the layer's call. Per-sample gradients, the Jacobian and ClipGrad's clipped sum
against the loops, float64 and float32, with N equal to the sequence length T.
"""

import warnings

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian, overall_scale, trainable
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import jacext
from jacext.dp import ClipGrad
from jacext.dp.clip import EPS

N = T = 4
# vmap over weight_norm's backward (the generic rule; a meet's VJP) falls back to a loop
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def _old_weight_norm(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
        return nn.utils.weight_norm(module)


PARAMETRIZE = {
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "orthogonal": parametrizations.orthogonal,
    "custom": lambda m: parametrize.register_parametrization(m, "weight", Symmetric()),
    "old_weight_norm": _old_weight_norm,
}


def build(kind, where, dtype):
    """A Linear-Tanh-Linear on (N, T, 5) inputs, the first Linear (or the root, for "root")
    parametrized before ``extend``, or the second after it."""
    torch.manual_seed(0)
    if where == "root":
        model = PARAMETRIZE[kind](nn.Linear(5, 5).to(dtype))
        return jacext.extend(model.eval())
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype).eval()  # eval: no power step
    if where == "before":
        PARAMETRIZE[kind](model[0])
    jacext.extend(model)
    if where == "after":
        PARAMETRIZE[kind](model[2] if kind != "custom" else model[0])
    return model


CASES = [(k, w) for k in PARAMETRIZE for w in ("before", "after", "root")]


@pytest.mark.parametrize("kind, where", CASES, ids=[f"{k}-{w}" for k, w in CASES])
def test_parametrized_weights_give_the_loops_numbers(kind, where, dtype):
    model = build(kind, where, dtype)
    x = torch.randn(N, T, 5, dtype=dtype)
    y = torch.randn(model(x).shape, dtype=dtype)
    loss = nn.MSELoss(reduction="sum")
    expected = loop_grad_batch(model, loss, y, x)
    expected_jac = loop_jacobian(model, x)
    with backpack(jacext.BatchGrad(), jacext.BatchJacobian()):
        loss(model(x), y).backward()
    scale, scale_jac = overall_scale(expected), overall_scale(expected_jac)
    for name, p in trainable(model):
        assert_close(p.grad_batch, expected[name], dtype, f"grad_batch of {name}", scale)
        assert_close(p.jacobian, expected_jac[name], dtype, f"jacobian of {name}", scale_jac)
        assert_close(p.grad_batch.sum(0), p.grad, dtype, f"grad of {name}", scale)

    model.zero_grad()
    norms = torch.stack([g.flatten(1).square().sum(1) for g in expected.values()]).sum(0).sqrt()
    bound = norms.median().item()
    w = (bound / (norms + EPS)).clamp(max=1.0)
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        loss(model(x), y).backward()
    for name, p in trainable(model):
        clipped = torch.einsum("n,n...->...", w, expected[name])
        assert_close(p.grad, clipped, dtype, f"clipped sum of {name}", scale)


@pytest.mark.parametrize("extension", ["BatchGrad", "ClipGrad"])
def test_spectral_norm_in_train_mode_differentiates_the_power_step_that_ran(extension, dtype):
    """In train mode, each forward first takes a power-iteration step on the buffers u, v (without
    gradient), then computes W / (u^T W v): the per-sample results are those of the forward that
    ran, that is of the model in eval mode with the buffers as that step left them."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    parametrizations.spectral_norm(model[0])
    jacext.extend(model.train())
    x = torch.randn(N, T, 5, dtype=dtype)
    y = torch.randn(N, T, 3, dtype=dtype)
    loss = nn.MSELoss(reduction="sum")
    u = model[0].parametrizations.weight[0]._u.clone()
    ext = jacext.BatchGrad() if extension == "BatchGrad" else ClipGrad(1.0, loss_reduction="sum")
    with backpack(ext):
        loss(model(x), y).backward()
    assert not torch.equal(u, model[0].parametrizations.weight[0]._u)  # the power step ran
    ran = copy.deepcopy(model).eval()  # the buffers as the step left them, no further step
    expected = loop_grad_batch(ran, loss, y, x)
    scale = overall_scale(expected)
    if extension == "BatchGrad":
        for name, p in trainable(model):
            assert_close(p.grad_batch, expected[name], dtype, f"grad_batch of {name}", scale)
        return
    norms = torch.stack([g.flatten(1).square().sum(1) for g in expected.values()]).sum(0).sqrt()
    assert (norms > 1).all()  # every sample clipped
    w = (1.0 / (norms + EPS)).clamp(max=1.0)
    for name, p in trainable(model):
        assert_close(p.grad, torch.einsum("n,n...->...", w, expected[name]), dtype, f"clipped sum of {name}", scale)
