"""Recording the forward pass (jacext.engine.hooks, jacext.engine.record).

Nothing is recorded without grad mode; a compiled module is recorded for BatchGrad; a forward
hook that replaces a module's output before jacext's record keeps that call from being fused
(and, a known bug, leaves its per-sample results without the hook's factor).
"""

import pytest
import torch
from backpack import backpack
from common_models import compiled_model
from reference import assert_close, loop_grad_batch, overall_scale
from torch import nn

import jacext
import jacext.engine.record
from jacext.dp import ClipGrad
from jacext.state import state_of

from .fused_nets import Tiny, assert_clipped, assert_matches, ce_loss, clipped_reference, data, expected, twins


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_no_grad_forward_records_nothing():
    model = jacext.extend(mlp())
    with backpack(jacext.BatchGrad()), torch.no_grad():
        model(torch.randn(2, 4))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_batch_grad_on_a_compiled_module():
    model = compiled_model()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    expected = loop_grad_batch(model, nn.MSELoss(reduction="sum"), y, x)
    with backpack(jacext.BatchGrad()):
        nn.MSELoss(reduction="sum")(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], torch.float64, name)


def doubled(module, args, output):
    return output * 2


@pytest.fixture
def fused_calls(monkeypatch):
    """The modules whose call the tape hung from a FusedGrads node (jacext.engine.fused.fused_output)."""
    calls = []
    original = jacext.engine.record.fused_output

    def spy(module, *args):
        calls.append(state_of(module).path)
        return original(module, *args)

    monkeypatch.setattr(jacext.engine.record, "fused_output", spy)
    return calls


def hooked_twins(hook, dtype):
    """Tiny("none") and its plain copy, both with ``doubled`` on up's output: registered with
    prepend=True before or after jacext.extend, or as a global forward hook (its handle returned)."""
    net = Tiny("none")
    if hook == "prepend_before_extend":
        net.up.register_forward_hook(doubled, prepend=True)
    model, plain = twins(net, dtype)  # the copy has the hook too
    handle = None
    if hook == "prepend_after_extend":
        for m in (model, plain):
            m.up.register_forward_hook(doubled, prepend=True)
    elif hook == "global":
        hooked = (model.up, plain.up)
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, out: doubled(m, args, out) if m in hooked else None
        )
    return model, plain, handle


HOOKS = ["prepend_after_extend", "global", "prepend_before_extend"]


@pytest.mark.parametrize("hook", HOOKS)
def test_forward_hook_that_replaces_the_output_before_the_record_is_not_fused(hook, dtype, fused_calls):
    """A forward hook that runs before jacext's (registered with prepend=True after jacext.extend,
    or a global one) and replaces up's output: up's own gradients would miss the hook's factor 2,
    so the call is not fused (with a global hook, no call is) and p.grad is the plain model's.
    Registered with prepend=True before extend, the hook runs after jacext's: fused, and exact."""
    torch.manual_seed(0)
    model, plain, handle = hooked_twins(hook, dtype)
    try:
        x, y = data(5, pool="none")
        per_sample, grads = expected(plain, ce_loss, y, x)
        with backpack(jacext.BatchGrad()):
            ce_loss(model(x), y).backward()
    finally:
        if handle is not None:
            handle.remove()
    fused = {"prepend_after_extend": ["down", "head"], "global": []}.get(hook, ["up", "down", "head"])
    assert fused_calls == fused
    scale = overall_scale(grads)
    for name, p in model.named_parameters():
        assert_close(p.grad, grads[name], dtype, f"grad of {name}", scale)
    if hook == "prepend_before_extend":
        assert_matches(model, per_sample, grads, dtype)


@pytest.mark.parametrize("exts", ["BatchGrad", "ClipGrad"])
@pytest.mark.parametrize("hook", ["prepend_after_extend", "global"])
def test_per_sample_results_with_a_hook_that_replaces_the_output_before_the_record(hook, exts):
    """The record sees 2 * up(x), not up's own output: the generic rule differentiates the call
    as it ran, hooks included."""
    torch.manual_seed(0)
    model, plain, handle = hooked_twins(hook, torch.float64)
    try:
        x, y = data(5, pool="none")
        per_sample, grads = expected(plain, ce_loss, y, x)
        bound, clipped, l2 = clipped_reference(per_sample, "sum")
        with backpack(jacext.BatchGrad() if exts == "BatchGrad" else ClipGrad(bound, loss_reduction="sum")):
            ce_loss(model(x), y).backward()
    finally:
        if handle is not None:
            handle.remove()
    if exts == "BatchGrad":
        assert_matches(model, per_sample, grads, torch.float64)
    else:
        assert_clipped(model, clipped, l2, torch.float64)
