"""BatchNorm found by what it does, not by its exact class: subclasses of nn.BatchNorm*, layers
added after ``extend``, and forwards that call ``F.batch_norm(..., training=True)`` get the
``batchnorm=`` choice (the option given to ``extend``) or a JacextError naming the module and
the option, raised in the forward, before anything is written. References as in
test_batchnorm_train.py: "exact" against the loop in train mode, "eval" against the loop with
the BatchNorm layers in eval mode."""

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack
from errors.common import nothing_left_behind, untouched
from reference import assert_close, loop_jacobian, overall_scale
from torch import nn

import jacext
from jacext.rules import layer_of


class KeepsForward(nn.BatchNorm1d):
    """A subclass that only adds a method: BatchNorm's rule and policy."""

    def describe(self):
        return "mine"


class OwnForward(nn.BatchNorm1d):
    """A subclass with a forward of its own: BatchNorm's policy, the generic rule."""

    def forward(self, x):
        return super().forward(x) + 0.5


class CallsBatchNorm(nn.Module):
    """No BatchNorm at all: a forward that normalises with the batch's statistics itself."""

    def forward(self, x):
        return F.batch_norm(x, None, None, training=True, eps=1e-3)


class CallsBatchNormWithWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x):
        return F.batch_norm(x, None, None, self.w, training=True)


class ParentOfBatchNorm(nn.Module):
    """A parameter of its own (the generic rule) around a BatchNorm layer."""

    def __init__(self):
        super().__init__()
        self.scale, self.bn = nn.Parameter(torch.rand(3, 1) + 0.5), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(x) * self.scale


def net(middle, dtype):
    """(N, 2, 5) -> Conv1d -> ``middle`` -> (N, 3 * 3): N = 5 samples, 5 positions."""
    return nn.Sequential(nn.Conv1d(2, 3, 3), middle, nn.Tanh(), nn.Flatten(), nn.Linear(9, 2)).to(dtype)


def inputs(dtype):
    return torch.randn(5, 2, 5, dtype=dtype)


def with_statistics(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d) and m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model


def check(model, x, choice, dtype):
    """jacext's Jacobian (model in train mode) against the loop's reference for ``choice``."""
    expected = loop_jacobian(model.eval() if choice == "eval" else model, x)
    model.train()
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    scale = overall_scale(expected)
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected[name], dtype, name, scale)


def test_a_subclass_that_keeps_the_forward_has_batchnorms_rule():
    assert layer_of(KeepsForward(3)) is layer_of(nn.BatchNorm1d(3))
    own = layer_of(OwnForward(3))
    assert own.rule is None and own.policy is layer_of(nn.BatchNorm1d(3)).policy


MIDDLES = {
    "subclass": lambda: KeepsForward(3, track_running_stats=False),
    "subclass_stats": lambda: KeepsForward(3),
    "own_forward_without_parameters": lambda: OwnForward(3, affine=False, track_running_stats=False),
    "functional": CallsBatchNorm,
}


@pytest.mark.parametrize("middle", MIDDLES)
def test_batch_statistics_are_refused_by_default_naming_module_and_option(middle):
    model = jacext.extend(net(MIDDLES[middle](), torch.float64))
    ext = jacext.BatchJacobian()
    with backpack(ext), pytest.raises(jacext.JacextError, match=r"'1' \(\w+\).*batch statistics.*batchnorm='exact'"):
        model(inputs(torch.float64))
    assert untouched(model, ext) and nothing_left_behind()


@pytest.mark.parametrize("middle", MIDDLES)
def test_exact_differentiates_through_the_batch_statistics(middle, dtype):
    model = jacext.extend(net(MIDDLES[middle](), dtype), batchnorm="exact")
    check(model, inputs(dtype), "exact", dtype)


@pytest.mark.parametrize("middle", [KeepsForward, OwnForward])
def test_eval_uses_the_running_statistics_of_a_subclass(middle, dtype):
    model = jacext.extend(with_statistics(net(middle(3), dtype)), batchnorm="eval")
    check(model, inputs(dtype), "eval", dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("choice", ["error", "exact", "eval"])
def test_a_batchnorm_added_after_extend_gets_the_extend_option(choice, affine, dtype):
    model = jacext.extend(net(nn.Identity(), dtype), batchnorm=choice)
    model[1] = with_statistics(nn.BatchNorm1d(3, affine=affine).to(dtype))
    x = inputs(dtype)
    if choice == "error":
        ext = jacext.BatchJacobian()
        with backpack(ext), pytest.raises(jacext.JacextError, match=r"BatchNorm '1' \(BatchNorm1d\).*batchnorm='eval'"):
            model(x)
        assert untouched(model, ext) and nothing_left_behind()
        return
    check(model, x, choice, dtype)


@pytest.mark.parametrize(
    "middle,choice,match",
    [
        pytest.param(
            CallsBatchNorm, "eval", r"F.batch_norm in the forward of '1' \(CallsBatchNorm\).*no BatchNorm", id="eval"
        ),
        pytest.param(
            CallsBatchNormWithWeight,
            "exact",
            r"'1' \(CallsBatchNormWithWeight\).*no hand-written jacext rule.*batchnorm='eval'",
            id="exact_generic_rule",
        ),
        pytest.param(
            lambda: OwnForward(3), "exact", r"'1' \(OwnForward\).*no hand-written jacext rule", id="exact_own_forward"
        ),
        pytest.param(
            ParentOfBatchNorm,
            "exact",
            r"'1.bn' \(BatchNorm1d\).*inside module '1' \(ParentOfBatchNorm\).*no hand-written",
            id="exact_inside_generic_rule",
        ),
    ],
)
def test_choices_that_cannot_be_exact_are_refused_in_the_forward(middle, choice, match):
    model = jacext.extend(net(middle(), torch.float64), batchnorm=choice)
    ext = jacext.BatchGrad()
    with backpack(ext), pytest.raises(jacext.JacextError, match=match):
        model(inputs(torch.float64)).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()


class Root(nn.Module):
    """F.batch_norm in the extended module's own forward, between two layers."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.b(F.batch_norm(self.a(x), None, None, training=True).tanh())


def test_batch_statistics_in_the_roots_own_forward(dtype):
    model, x = jacext.extend(Root().to(dtype)), torch.randn(6, 4, dtype=dtype)
    with backpack(jacext.BatchJacobian()), pytest.raises(jacext.JacextError, match=r"'<root>' \(Root\)"):
        model(x)
    check(jacext.extend(model, batchnorm="exact"), x, "exact", dtype)
