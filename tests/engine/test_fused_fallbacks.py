"""When calls are fused and their nodes contract inside the backward, and every fallback.

* Only BatchGrad (optionally with BatchL2Grad) alone, at >= 16 positions, contracts in the fused
  nodes (the "inline, fused" plan); ClipGrad fuses every call but computes its sums at the end.
* The fallbacks give the same numbers: ``backward(inputs=...)``, ``autograd.grad``,
  ``retain_graph``, an output that does not reach the loss, ``create_graph=True``, and the
  batched pull-back of coupled samples (``batchnorm="exact"``) through fused nodes.
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, overall_scale
from torch import nn

import jacext
import jacext.engine.plan as plans
from jacext.dp import ClipGrad

from .fused_nets import FUSED, Tiny, assert_matches, ce_loss, data, expected, sq_loss, twins, watch


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "case, fused, contracted",  # contracted: an "inline, fused" plan, whose nodes run the rule (BatchGrad's sums)
    [
        ("T=16", True, True),
        ("T=15", False, False),
        ("BatchL2Grad", False, False),
        ("BatchJacobian", False, False),
        ("BatchGrad+BatchJacobian", False, False),
        ("ClipGrad", True, False),  # every call with a rule; its clipped sums come at the end
        ("backpack=True", False, False),
        ("no extension", False, False),
    ],
)
def test_fused_path_taken_only_for_batch_grad_with_many_positions(case, fused, contracted):
    torch.manual_seed(0)
    model, plain = twins(Tiny("mean"), torch.float64)
    jacext.extend(model, backpack=case == "backpack=True")
    t = 15 if case == "T=15" else 16
    x, y = data(5, t=t)
    exts = {
        "BatchL2Grad": [jacext.BatchL2Grad()],
        "BatchJacobian": [jacext.BatchJacobian()],
        "BatchGrad+BatchJacobian": [jacext.BatchGrad(), jacext.BatchJacobian()],
        "ClipGrad": [ClipGrad(1.0, loss_reduction="sum")],
        "no extension": [],
    }.get(case, [jacext.BatchGrad()])
    seen = watch(model, "up", "down")
    per_sample, grads = expected(plain, ce_loss, y, x)
    with backpack(*exts):
        ce_loss(model(x), y).backward()
    assert {name: [k == FUSED for k in kinds] for name, kinds in seen.items()} == {"up": [fused], "down": [fused]}
    assert (jacext.backward_plan(model) == "inline, fused") == contracted
    if case.startswith("T="):  # both sides of the threshold give the loop's numbers
        assert_matches(model, per_sample, grads, torch.float64)
    if case == "ClipGrad":  # p.grad: the sum of the per-sample gradients clipped to norm 1
        norms = sum(g.flatten(1).square().sum(1) for g in per_sample.values()).sqrt()
        assert (norms > 1).any() and (norms < 1).any()
        w = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        clipped = {name: (g * w.view(-1, *[1] * (g.dim() - 1))).sum(0) for name, g in per_sample.items()}
        for name, p in model.named_parameters():
            assert_close(p.grad, clipped[name], torch.float64, f"clipped grad of {name}", overall_scale(clipped))


FALLBACKS = ["inputs_pruned", "inputs_all_nodes", "autograd_grad", "retain_graph", "unused_output"]


@pytest.mark.parametrize("case", FALLBACKS)
def test_fallbacks_give_the_same_numbers(case, dtype, contractions):
    torch.manual_seed(0)
    model, plain = twins(Tiny("mean", side=case == "unused_output"), dtype)
    x, y = data(5)
    per_sample, grads = expected(plain, ce_loss, y, x)
    seen = watch(model, "up", "down")
    inputs = {"inputs_pruned": ["down.weight", "head.bias"], "inputs_all_nodes": ["emb.weight", "up.bias"]}.get(case)
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        loss = ce_loss(model(x), y)
        if inputs:
            loss.backward(inputs=[model.get_parameter(name) for name in inputs])
        elif case == "autograd_grad":
            got = torch.autograd.grad(loss, list(model.parameters()))
        elif case == "retain_graph":
            loss.backward(retain_graph=True)
            loss.backward()
        else:
            loss.backward()
    assert seen == {"up": [FUSED], "down": [FUSED]}
    # which backward ran the fused nodes' rules: none where the tape pulled back separately
    ran = {"inputs_pruned": [], "unused_output": [], "retain_graph": ["up", "down"] * 2}.get(case, ["up", "down"])
    assert sorted(contractions) == sorted(ran)
    factor = 2.0 if case == "retain_graph" else 1.0  # p.grad accumulates, grad_batch is one backward's
    whole = not inputs and case != "autograd_grad"  # p.grad of every parameter
    assert_matches(model, per_sample, grads, dtype, l2=True, grad=whole, grad_factor=factor)
    scale = overall_scale(grads)
    if inputs:
        for name, p in model.named_parameters():
            if name in inputs:
                assert_close(p.grad, grads[name], dtype, f"grad of {name}", scale)
            else:
                assert p.grad is None, name
    if case == "autograd_grad":
        assert all(p.grad is None for p in model.parameters())
        for (name, _), g in zip(model.named_parameters(), got, strict=True):
            assert_close(g, grads[name], dtype, f"autograd.grad of {name}", scale)
    if case == "unused_output":
        assert "side.weight" not in grads and not model.side.weight.grad_batch.any()


def double_backward(model):
    """d sum_p ||p.grad||^2 / d p, by name."""
    params = list(model.parameters())
    assert all(p.grad.requires_grad for p in params)
    total = sum(p.grad.square().sum() for p in params)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(total, params), strict=True))


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("pool", ["mean", "none"])
def test_create_graph_through_the_fused_nodes_gives_the_plain_double_backward(pool, dtype, monkeypatch):
    """The fused nodes' ordinary, differentiable backward (``create_graph=True``): p.grad and the
    gradient of sum ||p.grad||^2 as on the plain model. The per-sample results, computed when the
    backward ends, are left out here (see the test below)."""
    torch.manual_seed(0)
    monkeypatch.setattr(plans.Inline, "at_end", lambda self: None)
    model, plain = twins(Tiny(pool), dtype)
    x, y = data(5, pool=pool)
    seen = watch(model, "up", "down")
    with backpack(jacext.BatchGrad()):
        ce_loss(model(x), y).backward(create_graph=True)
    ce_loss(plain(x), y).backward(create_graph=True)
    assert seen == {"up": [FUSED], "down": [FUSED]}
    scale = overall_scale({n: p.grad for n, p in plain.named_parameters()})
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert_close(p.grad, q.grad, dtype, f"grad of {name}", scale)
    ours, theirs = double_backward(model), double_backward(plain)
    scale = overall_scale(theirs)
    for name, value in theirs.items():
        assert_close(ours[name], value, dtype, f"d sum(grad^2) / d {name}", scale)
    for p in list(model.parameters()) + list(plain.parameters()):
        p.grad = None  # the graph of a create_graph gradient holds the parameter: a cycle


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_with_batch_grad(dtype):
    """The per-sample results of a create_graph backward are the loop's (computed without
    grad mode, not differentiable, as BackPACK's), and the double backward through p.grad is
    the plain model's. That double backward passes through the model output again, so it
    replaces the attributes, as any later backward through it does: checked before it."""
    torch.manual_seed(0)
    model, plain = twins(Tiny("none"), dtype)
    x, y = data(5, pool="none")
    per_sample, grads = expected(plain, ce_loss, y, x)
    try:
        with backpack(jacext.BatchGrad()):
            ce_loss(model(x), y).backward(create_graph=True)
        assert not any(p.grad_batch.requires_grad for p in model.parameters())
        assert_matches(model, per_sample, grads, dtype)
        ce_loss(plain(x), y).backward(create_graph=True)
        ours, theirs = double_backward(model), double_backward(plain)
        for name, value in theirs.items():
            assert_close(ours[name], value, dtype, f"d sum(grad^2) / d {name}", overall_scale(theirs))
    finally:
        for p in list(model.parameters()) + list(plain.parameters()):
            p.grad = None


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_fused_nodes_in_the_batched_pull_back_of_coupled_samples(layer, dtype):
    """batchnorm="exact" couples the samples: the tape pulls back one seed per sample, batched
    (vmap over the backward), through the fused nodes, whose input gradient must not branch on
    values there (Linear's check for a cotangent constant over the positions)."""
    torch.manual_seed(0)
    if layer == "linear":
        model = nn.Sequential(
            nn.Linear(2, 3), nn.BatchNorm1d(20, affine=False), nn.Linear(3, 3), nn.Flatten(), nn.Linear(60, 2)
        )
        x = torch.randn(4, 20, 2, dtype=dtype)
    else:
        model = nn.Sequential(
            nn.Conv1d(1, 2, 3, padding=1), nn.BatchNorm1d(2), nn.Conv1d(2, 2, 3), nn.Flatten(), nn.Linear(36, 2)
        )
        x = torch.randn(4, 1, 20, dtype=dtype)
    model = model.to(dtype)
    y = torch.randn(4, 2, dtype=dtype)
    per_sample = loop_grad_batch(model, sq_loss, y, x)
    jacext.extend(model, batchnorm="exact")
    with backpack(jacext.BatchGrad()):
        out = model(x)
        assert type(out.grad_fn).__name__ != FUSED
        sq_loss(out, y).backward()
    scale = overall_scale(per_sample)
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, per_sample[name], dtype, f"grad_batch of {name}", scale)
