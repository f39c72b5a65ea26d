"""The backward plans (jacext.engine.plan), as ``jacext.backward_plan(model)`` reports them.

BatchGrad/BatchL2Grad alone catch G in the ordinary backward (an inline plan); where that
cannot see every record (an output that does not reach the loss, ``backward(inputs=...)``)
the tape pulls back separately; BatchJacobian with ``chunk_size`` pulls back in chunks. Every
plan gives the loop's numbers. (The fused plans: test_fused_*.py.)
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian, overall_scale
from torch import nn

import jacext


class Branchy(nn.Module):
    """``unused`` runs but does not reach the output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(3, 2)

    def forward(self, x):
        self.unused(x)
        return self.b(self.a(x).tanh())


def sq_loss(out, y):
    return (out - y).square().sum()


@pytest.mark.parametrize("case", ["inline", "unused_module", "inputs", "retain_graph"])
def test_both_paths_give_the_loops_numbers(case, dtype):
    torch.manual_seed(0)
    model = Branchy() if case == "unused_module" else nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model = model.to(dtype)
    x, y = torch.randn(5, 3, dtype=dtype), torch.randn(5, 2, dtype=dtype)
    expected = loop_grad_batch(model, sq_loss, y, x)
    jacext.extend(model)
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        loss = sq_loss(model(x), y)
        plans = []
        if case == "inputs":  # prunes the first layer's node from this backward
            loss.backward(inputs=[model[2].weight])
        elif case == "retain_graph":
            loss.backward(retain_graph=True)
            plans.append(jacext.backward_plan(model))
            loss.backward()
        else:
            loss.backward()
        plans.append(jacext.backward_plan(model))
    inline = {"inline": True, "unused_module": False, "inputs": False, "retain_graph": True}[case]
    assert plans == ["inline" if inline else "pull-back"] * len(plans)
    scale = overall_scale(expected)
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], dtype, name, scale)
        assert_close(p.batch_l2, expected[name].flatten(1).square().sum(1), dtype, name, scale**2)


class Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.w


@pytest.mark.parametrize("chunk", [1, 3, 7, 20])
def test_jacobian_in_chunks_gives_the_loops_numbers(chunk, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), Scale(5)).to(dtype)
    x, y = torch.randn(3, 4, dtype=dtype), torch.randn(3, 5, dtype=dtype)

    expected_j, expected_g = loop_jacobian(model, x), loop_grad_batch(model, sq_loss, y, x)
    jacext.extend(model)
    with backpack(jacext.BatchJacobian(chunk_size=chunk), jacext.BatchGrad(), jacext.BatchL2Grad()):
        sq_loss(model(x), y).backward()
    sj, sg = overall_scale(expected_j), overall_scale(expected_g)
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected_j[name], dtype, name, sj)
        assert_close(p.grad_batch, expected_g[name], dtype, name, sg)
        assert_close(p.batch_l2, expected_g[name].flatten(1).square().sum(1), dtype, name, sg**2)


@pytest.mark.parametrize("chunk", [1, 4])
def test_jacobian_in_chunks_next_to_norms_only(chunk, dtype):
    """Chunks without the loss's seed have no norms to compute (BatchL2Grad alone on that kind)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).to(dtype)
    x, y = torch.randn(3, 4, dtype=dtype), torch.randn(3, 5, dtype=dtype)
    expected_j, expected_g = loop_jacobian(model, x), loop_grad_batch(model, sq_loss, y, x)
    jacext.extend(model)
    with backpack(jacext.BatchJacobian(chunk_size=chunk), jacext.BatchL2Grad()):
        sq_loss(model(x), y).backward()
    sj, sg = overall_scale(expected_j), overall_scale(expected_g)
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected_j[name], dtype, name, sj)
        assert_close(p.batch_l2, expected_g[name].flatten(1).square().sum(1), dtype, name, sg**2)
