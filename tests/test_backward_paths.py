"""The two ways the tape gets its cotangents, and where results are written.

BatchGrad/BatchL2Grad alone catch G in the ordinary backward (an inline plan); where that
cannot see every record (an output that does not reach the loss, ``backward(inputs=...)``,
coupled samples, a module on the generic rule) the tape pulls back separately. Both must give
the loop's numbers. Results are written into the previous result where nobody else holds it
(``jacext.engine.memory``), and refused before allocating when they cannot fit.
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian, overall_scale
from torch import nn

import jacext
import jacext.engine.memory


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


def test_results_that_cannot_fit_are_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(jacext.engine.memory, "available_bytes", lambda device, wanted=0: 1000)
    model = jacext.extend(nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 10)))
    with backpack(jacext.BatchJacobian()), pytest.raises(jacext.JacextError, match=r"GiB.*fewer outputs"):
        model(torch.randn(8, 30)).sum().backward()
    assert all(not hasattr(p, "jacobian") and p.grad is None for p in model.parameters())
    with backpack(jacext.BatchL2Grad()):  # norms are not materialised: nothing to refuse
        model(torch.randn(8, 30)).sum().backward()
    assert model[0].weight.batch_l2.shape == (8,)


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


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        jacext.BatchJacobian(chunk_size=0)


def test_cotangents_that_cannot_fit_point_to_chunk_size(monkeypatch):
    model = jacext.extend(nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 10)))
    monkeypatch.setattr(jacext.engine.memory, "available_bytes", lambda device, wanted=0: 8 * 40 * 4 * 5)
    with backpack(jacext.BatchJacobian()), pytest.raises(jacext.JacextError, match="chunk_size"):
        model(torch.randn(8, 30)).sum().backward()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_inline_path_next_to_backpacks_own_extensions():
    """BackPACK's module hooks run in the same ordinary backward that jacext catches G in."""
    import copy

    import backpack.extensions as bpext
    from backpack import extend as backpack_extend

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    twin, lossfunc = backpack_extend(copy.deepcopy(model)), backpack_extend(nn.CrossEntropyLoss())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = loop_grad_batch(model, lossfunc, y, x)
    jacext.extend(model, backpack=True)
    with backpack(jacext.BatchGrad(), bpext.DiagGGNExact(), bpext.BatchL2Grad()):
        lossfunc(model(x), y).backward()
    with backpack(bpext.DiagGGNExact(), bpext.BatchL2Grad()):
        lossfunc(twin(x), y).backward()
    assert jacext.backward_plan(model) == "inline"
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.grad_batch, expected[name], torch.float64, name)
        for field in ("diag_ggn_exact", "batch_l2", "grad"):
            assert_close(getattr(p, field), getattr(q, field), torch.float64, f"{name}.{field}")
