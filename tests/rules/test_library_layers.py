"""Hand-written rules for layers of other libraries, registered by name: HuggingFace's Conv1D
and timm's BatchNormAct2d, against the loops for every extension (BatchGrad, BatchL2Grad,
BatchJacobian, ClipGrad), with their rules counted so that a silent fall back to the generic
rule fails."""

from dataclasses import replace

import pytest
import torch
from backpack import backpack
from reference import assert_close, check_grad_batch, check_jacobian, loop_grad_batch, loop_jacobian, overall_scale
from torch import nn

import jacext
from jacext.dp import ClipGrad
from jacext.rules import NAMED

pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
norm_act = pytest.importorskip("timm.layers.norm_act")
CONV1D, BN_ACT = "transformers.pytorch_utils.Conv1D", "timm.layers.norm_act.BatchNormAct2d"


@pytest.fixture
def calls(monkeypatch):
    """How often each named rule ran."""
    counts = {CONV1D: 0, BN_ACT: 0}
    for name in counts:
        rule = NAMED[name].rule

        def counted(*args, _name=name, _rule=rule):
            counts[_name] += 1
            return _rule(*args)

        monkeypatch.setitem(NAMED, name, replace(NAMED[name], rule=counted))
    return counts


def check_clipping_and_norms(model, lossfunc, y, x, dtype):
    """ClipGrad (a bound that clips some samples, not others) and BatchL2Grad against the loop."""
    grads = loop_grad_batch(model, lossfunc, y, x)
    l2 = {name: g.flatten(1).square().sum(1) for name, g in grads.items()}
    norms = sum(l2.values()).sqrt()
    bound = norms.median().item()
    w = (bound / (norms + 1e-6)).clamp(max=1.0)
    assert (w < 1).any() and ((w == 1).any() or len(w) == 1)
    model.zero_grad()
    with backpack(jacext.BatchL2Grad()):
        lossfunc(model(x), y).backward()
    scale_l2 = overall_scale(l2)
    for name, p in model.named_parameters():
        assert_close(p.batch_l2, l2[name], dtype, f"batch_l2 of {name}", scale_l2)
    model.zero_grad()
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        lossfunc(model(x), y).backward()
    clipped = {name: torch.einsum("n,n...->...", w, g) for name, g in grads.items()}
    for name, p in model.named_parameters():
        assert_close(p.grad, clipped[name], dtype, f"clipped grad of {name}", overall_scale(clipped))
        assert_close(p.per_sample_l2, l2[name], dtype, f"per_sample_l2 of {name}", scale_l2)


def every_extension(model, x, y, dtype):
    check_jacobian(model, x)
    check_grad_batch(model, nn.CrossEntropyLoss(reduction="sum"), y, x)
    check_clipping_and_norms(model, nn.CrossEntropyLoss(reduction="sum"), y, x, dtype)


class Conv1DNet(nn.Module):
    """Two Conv1D as GPT-2's MLP (many positions: fused under BatchGrad), a mean over positions."""

    def __init__(self):
        super().__init__()
        self.fc, self.proj = pytorch_utils.Conv1D(5, 4), pytorch_utils.Conv1D(3, 5)

    def forward(self, x):
        h = self.proj(torch.tanh(self.fc(x)))
        return h.mean(tuple(range(1, h.dim() - 1))) if h.dim() > 2 else h


@pytest.mark.parametrize("shape", [(5, 4), (1, 4), (5, 3, 4), (4, 2, 3, 4), (5, 16, 4)],
                         ids=["N", "N=1", "NT", "NAB", "NT-many"])
def test_conv1d(shape, dtype, calls):
    torch.manual_seed(0)
    model = Conv1DNet().to(dtype)
    with torch.no_grad():
        model.fc.bias.normal_()
    every_extension(model, torch.randn(*shape, dtype=dtype), torch.randint(0, 3, shape[:1]), dtype)
    assert calls[CONV1D] > 0


def test_conv1d_frozen_bias(dtype, calls):
    model = Conv1DNet().to(dtype)
    model.fc.bias.requires_grad_(False)
    check_jacobian(model, torch.randn(4, 3, 4, dtype=dtype))
    assert not hasattr(model.fc.bias, "jacobian") and calls[CONV1D] > 0


def bn_act_net(dtype, **kwargs):
    """Conv2d, BatchNormAct2d (random running statistics and affine parameters), Linear."""
    bn = norm_act.BatchNormAct2d(3, **kwargs)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    return nn.Sequential(nn.Conv2d(2, 3, 3), bn, nn.Flatten(), nn.Linear(27, 3)).to(dtype)


ACTS = {
    "relu in place": {},
    "silu in place": dict(act_layer=nn.SiLU),
    "no act": dict(apply_act=False),
    "gelu": dict(act_layer=nn.GELU),  # a new output tensor: the engine takes the generic rule
}


@pytest.mark.parametrize("act", ACTS)
def test_batchnorm_act_eval(act, dtype, calls):
    torch.manual_seed(0)
    model = bn_act_net(dtype, **ACTS[act]).eval()
    every_extension(model, torch.randn(6, 2, 5, 5, dtype=dtype), torch.randint(0, 3, (6,)), dtype)
    assert calls[BN_ACT] > 0 or act == "gelu"


def test_batchnorm_act_train_mode_needs_the_choice():
    model = bn_act_net(torch.float64)
    jacext.extend(model)
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="batchnorm='eval'"):
        model(torch.randn(4, 2, 5, 5, dtype=torch.float64))


def test_batchnorm_act_train_mode_eval_choice(dtype, calls):
    torch.manual_seed(0)
    model, x = bn_act_net(dtype, act_layer=nn.SiLU), torch.randn(5, 2, 5, 5, dtype=dtype)
    bn, y = model[1], torch.randint(0, 3, (5,))
    expected = loop_grad_batch(model.eval(), nn.CrossEntropyLoss(), y, x)
    model.train()
    before = bn.running_mean.clone()
    jacext.extend(model, batchnorm="eval")
    with backpack(jacext.BatchGrad()):
        nn.CrossEntropyLoss()(model(x), y).backward()
    assert bn.training and torch.equal(bn.running_mean, before) and calls[BN_ACT] > 0
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], dtype, name, overall_scale(expected))


def test_batchnorm_act_train_mode_exact_choice(dtype, calls):
    """Each sample's output through the batch statistics, the activation at the batch-normalised z."""
    torch.manual_seed(0)
    model, x = bn_act_net(dtype), torch.randn(5, 2, 5, 5, dtype=dtype)
    y = torch.randint(0, 3, (5,))
    expected_j, expected_g = loop_jacobian(model, x), loop_grad_batch(model, nn.CrossEntropyLoss(), y, x)
    jacext.extend(model, batchnorm="exact")
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad()):
        nn.CrossEntropyLoss()(model(x), y).backward()
    sj, sg = overall_scale(expected_j), overall_scale(expected_g)
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected_j[name], dtype, name, sj)
        assert_close(p.grad_batch, expected_g[name], dtype, name, sg)
    assert calls[BN_ACT] > 0


def test_batchnorm_act_drop_layer_in_train_mode_is_refused():
    model = bn_act_net(torch.float64, drop_layer=lambda: nn.Dropout(0.5)).eval()
    model[1].drop.train()
    jacext.extend(model)
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match=r"module.drop.eval\(\)"):
        model(torch.randn(4, 2, 5, 5, dtype=torch.float64))
