"""Results written into the previous ones where nobody holds them (jacext.engine.memory).

The per-sample results of a backward reuse the memory of the previous results when the user
holds no reference to them; the Embedding's clears only the rows written last time unless the
result was changed in place since. Results the user keeps are left untouched, and memory stays
flat over many steps.
"""

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from backpack import backpack
from torch import nn

import jacext
from jacext.dp import ClipGrad
from jacext.engine.record import Tape

from .fused_nets import Tiny, assert_matches, ce_loss, data, expected, twins


def test_results_are_written_into_the_previous_ones_nobody_holds():
    torch.manual_seed(0)
    model = jacext.extend(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    weight = model[0].weight
    for ext, field in [(jacext.BatchGrad, "grad_batch"), (jacext.BatchJacobian, "jacobian")]:
        with backpack(ext()):
            model(torch.randn(5, 3)).sum().backward()
        address = getattr(weight, field).data_ptr()
        x = torch.randn(5, 3)
        with backpack(ext()):
            model(x).sum().backward()
        assert getattr(weight, field).data_ptr() == address
        expected = getattr(weight, field).clone()
        kept = getattr(weight, field)  # held by the user: the next backward must not touch it
        with backpack(ext()):
            model(2 * x).sum().backward()
        assert torch.equal(kept, expected) and getattr(weight, field).data_ptr() != address


REUSED = ["emb.weight", "up.weight", "down.weight", "head.weight"]  # results written in place


@pytest.mark.parametrize("between", ["nothing", "add_", "row_view_add_", "keep"])
def test_steps_with_the_previous_results_left_on_the_parameters(between, dtype):
    """Every step's inputs look up other Embedding rows; the results of the step before are left
    on the parameters (written over where nobody holds them), changed in place by the user, or
    kept by the user (then left untouched)."""
    torch.manual_seed(0)
    model, plain = twins(Tiny("none"), dtype)
    ptrs = None
    x_before = None
    for step in range(3):
        x, y = data(5, pool="none")
        per_sample, grads = expected(plain, ce_loss, y, x)
        model.zero_grad()
        kept = copies = None
        if step > 0:
            emb_result = model.emb.weight.grad_batch
            if between == "add_":
                emb_result.add_(1.0)
                model.up.weight.grad_batch.add_(1.0)
            elif between == "row_view_add_":  # a row the last step did not write, through a view
                row = next(e for e in range(50) if e not in x_before[1])
                emb_result[1, row].add_(1.0)
            elif between == "keep":
                kept = {name: model.get_parameter(name).grad_batch for name in REUSED}
                copies = {name: t.clone() for name, t in kept.items()}
            del emb_result
        with backpack(jacext.BatchGrad()):
            ce_loss(model(x), y).backward()
        assert_matches(model, per_sample, grads, dtype)
        now = {name: model.get_parameter(name).grad_batch.data_ptr() for name in REUSED}
        if ptrs is not None:
            if between == "keep":
                assert all(now[name] != ptrs[name] for name in REUSED)
                assert all(torch.equal(kept[name], copies[name]) for name in REUSED)
            else:
                assert now == ptrs  # the memory of the step before, written over
        ptrs, x_before = now, x
        del kept, copies


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="documented limit (docs/index.md, Memory): an in-place change through .data (or a numpy "
    "view) does not move torch's version counter, so the reused Embedding result clears only the "
    "rows written last time",
)
def test_embedding_result_changed_through_data_is_cleared():
    torch.manual_seed(0)
    model, plain = twins(Tiny("mean"), torch.float64)
    x, y = data(5)
    with backpack(jacext.BatchGrad()):
        ce_loss(model(x), y).backward()
    row = next(e for e in range(50) if e not in x[1])
    model.emb.weight.grad_batch.data[1, row].add_(1.0)
    x, y = data(5)
    per_sample, grads = expected(plain, ce_loss, y, x)
    model.zero_grad()
    with backpack(jacext.BatchGrad()):
        ce_loss(model(x), y).backward()
    assert_matches(model, per_sample, grads, torch.float64)


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_memory_is_flat_over_many_steps():
    import resource

    model = jacext.extend(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def steps(k):
        for _ in range(k):
            opt.zero_grad()
            with backpack(jacext.BatchGrad(), jacext.BatchJacobian(), jacext.BatchL2Grad()):
                nn.CrossEntropyLoss()(model(torch.randn(16, 4)), torch.randint(0, 3, (16,))).backward()
            opt.step()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB

    warm = steps(200)
    assert steps(2000) - warm < 4 * 1024, "peak memory grew by more than 4 MiB over 2000 steps"


class WithPositions(nn.Module):
    """A meet (positions without the batch), a train-mode BatchNorm and a tied head."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.norm, self.fc = nn.BatchNorm1d(4), nn.Linear(4, 4)

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        h = self.fc(self.norm(h.transpose(1, 2)).transpose(1, 2))
        return F.linear(h, self.emb.weight)


@pytest.mark.parametrize(
    "make, batchnorm",
    [
        (lambda: (jacext.BatchGrad(), jacext.BatchL2Grad()), "exact"),
        (lambda: (jacext.BatchJacobian(),), "exact"),
        (lambda: (ClipGrad(1.0, loss_reduction="sum"),), "eval"),
    ],
    ids=["BatchGrad", "BatchJacobian", "ClipGrad"],
)
def test_a_tape_is_freed_with_its_graph_not_by_the_garbage_collector(make, batchnorm):
    """No reference cycle runs through a tape: once a step's graph is gone, so are its tape and
    the activations its records hold, without waiting for the cyclic garbage collector (a
    training loop would otherwise keep earlier steps' activations and allocate fresh memory)."""
    model = jacext.extend(WithPositions(), batchnorm=batchnorm)
    ids = torch.randint(0, 7, (3, 5))
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            with backpack(*make()):
                model(ids).square().sum().backward()
        with warnings.catch_warnings():  # (isinstance on some of torch's deprecated objects warns)
            warnings.simplefilter("ignore")
            assert not any(isinstance(o, Tape) for o in gc.get_objects())
    finally:
        gc.enable()


def test_a_result_kept_only_through_its_storage_is_not_overwritten():
    model = jacext.extend(nn.Linear(3, 2).double())
    with backpack(jacext.BatchGrad()):
        model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    storage = model.weight.grad_batch.untyped_storage()
    kept = torch.empty(0, dtype=torch.float64).set_(storage).clone()
    with backpack(jacext.BatchGrad()):
        model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    assert torch.equal(torch.empty(0, dtype=torch.float64).set_(storage), kept)
