"""BatchNorm with batch statistics: an error by default, and the two explicit choices."""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian, overall_scale
from torch import nn

import jacext


def net(dtype, d=2):
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}[d]
    return nn.Sequential(conv(2, 3, 3), bn(3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).to(dtype)


def inputs(dtype, d=2, n=4):
    return torch.randn(n, 2, *([5] * d), dtype=dtype)


@pytest.mark.parametrize("d", [1, 2])
def test_exact_differentiates_through_the_batch_statistics(d, dtype):
    model, x = net(dtype, d), inputs(dtype, d)
    model(x)  # materialise the lazy layer
    y = torch.randint(0, 2, (x.shape[0],))
    expected_j, expected_g = loop_jacobian(model, x), loop_grad_batch(model, nn.CrossEntropyLoss(), y, x)
    jacext.extend(model, batchnorm="exact")
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad()):
        nn.CrossEntropyLoss()(model(x), y).backward()
    sj, sg = overall_scale(expected_j), overall_scale(expected_g)
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected_j[name], dtype, name, sj)
        assert_close(p.grad_batch, expected_g[name], dtype, name, sg)
        assert_close(p.grad_batch.sum(0), p.grad, dtype, name, sg)


def test_eval_choice_uses_running_statistics_while_recording(dtype):
    model, x = net(dtype), inputs(dtype)
    model(x)
    bn = model[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    before = bn.running_mean.clone()
    expected = loop_jacobian(model.eval(), x)
    model.train()
    jacext.extend(model, batchnorm="eval")
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    assert bn.training and torch.equal(bn.running_mean, before)
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected[name], dtype, name, overall_scale(expected))
    model(x)  # outside the context BatchNorm trains as usual
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize("choice", ["error", "exact"])
def test_batchnorm_without_parameters_is_seen(choice, dtype):
    """An affine=False BatchNorm in train mode couples the samples of the layers before it; it
    has no parameters (so no record of its own) and is still refused, or made exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    x = torch.randn(5, 3, dtype=dtype)
    jacext.extend(model, batchnorm=choice)
    if choice == "error":
        with backpack(jacext.BatchJacobian()), pytest.raises(jacext.JacextError, match="batchnorm='eval'"):
            model(x)
        return
    expected = loop_jacobian(model, x)  # each output through the whole batch's statistics
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected[name], dtype, name, overall_scale(expected))


def test_sync_batchnorm_outside_a_process_group_is_batchnorm(dtype):
    """nn.SyncBatchNorm (what convert_sync_batchnorm gives DDP models) follows the same choices."""
    model = nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.SyncBatchNorm(3, track_running_stats=False), nn.Flatten(), nn.Linear(9, 2)
    )
    model = model.to(dtype)
    x = inputs(dtype, d=1, n=5)[..., :4]
    expected = loop_jacobian(model, x)
    jacext.extend(model, batchnorm="exact")
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected[name], dtype, name, overall_scale(expected))
