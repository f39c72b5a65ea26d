"""Layers that refuse an input or a mode: BatchNorm with batch statistics and no explicit
choice (before the model's own backward, nothing changed), an unknown ``batchnorm`` choice,
an unbatched input to InstanceNorm, dropout in train mode in MultiheadAttention. (Recurrent
layers: test_recurrent_input.py.)
"""

import pytest
import torch
from backpack import backpack
from common_models import Attend
from torch import nn

import jacext

from .common import EXTENSIONS, batchnorm_net, cases, nothing_left_behind, untouched


@pytest.mark.parametrize("make", cases(**EXTENSIONS))
def test_batchnorm_train_without_choice_changes_nothing(make):
    """The error (test_default_is_a_clear_error_naming_the_choices checks its wording) comes before
    the model's own backward: no p.grad, no attribute; after model.eval() the same model works."""
    model = jacext.extend(batchnorm_net())
    ext = make()
    x = torch.randn(6, 4)
    with backpack(ext):
        with pytest.raises(jacext.JacextError, match=r"'1'.*batchnorm='eval'"):
            model(x).sum().backward()
        assert untouched(model, ext) and nothing_left_behind()
        model.eval()
        model(x).sum().backward()
    assert all(getattr(p, ext.savefield).shape[0] == 6 for p in model.parameters())


def test_batchnorm_train_without_choice_in_jacobian_leaves_the_model_as_it_was():
    model = batchnorm_net()
    with pytest.raises(jacext.JacextError, match="batchnorm='eval'"):
        jacext.jacobian(model, torch.randn(6, 4))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_jacext") for m in model.modules() for k in vars(m))
    assert all(p.grad is None for p in model.parameters()) and nothing_left_behind()


@pytest.mark.parametrize(
    "make", [lambda: nn.BatchNorm1d(3), lambda: nn.BatchNorm1d(3, track_running_stats=False).eval()]
)
def test_batchnorm_batch_statistics_raise(make):
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3), make()))
    with (
        backpack(jacext.BatchJacobian()),
        pytest.raises(jacext.JacextError, match="batch statistics.*batchnorm=.eval."),
    ):
        model(torch.randn(4, 2)).sum().backward()


def net(dtype, d=2):
    conv, bn = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}[d]
    return nn.Sequential(conv(2, 3, 3), bn(3), nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).to(dtype)


def inputs(dtype, d=2, n=4):
    return torch.randn(n, 2, *([5] * d), dtype=dtype)


def test_default_is_a_clear_error_naming_the_choices():
    model, x = net(torch.float32), inputs(torch.float32)
    model(x)
    jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        with pytest.raises(jacext.JacextError, match="'1'.*batchnorm='eval'.*batchnorm='exact'"):
            model(x)  # refused as the forward records it, before anything is computed


def test_unknown_choice():
    with pytest.raises(ValueError, match="batchnorm"):
        jacext.extend(nn.BatchNorm1d(2), batchnorm="running")


def test_unbatched_input_is_a_clear_error():
    model = jacext.extend(nn.InstanceNorm1d(3, affine=True))
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="batch dimension"):
        model(torch.randn(3, 5)).sum().backward()


def test_dropout_in_train_mode_is_a_clear_error():
    model = jacext.extend(Attend(nn.MultiheadAttention(4, 1, dropout=0.1, batch_first=True)))
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="dropout"):
        model(torch.randn(2, 3, 4)).sum().backward()
