"""The public API: shapes, several extensions at once, errors, hooks and state."""


import backpack.extensions as bpext
import pytest
import torch
from backpack import backpack
from reference import assert_close, check_grad_batch, loop_grad_batch, loop_jacobian
from torch import nn
from torch.overrides import TorchFunctionMode

import jacext
from jacext.state import state_of


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


class Reshaped(nn.Module):
    def __init__(self, out_shape):
        super().__init__()
        self.out_shape = out_shape
        self.lin = nn.Linear(4, out_shape[1:].numel())

    def forward(self, x):
        return self.lin(x).reshape(self.out_shape)


@pytest.mark.parametrize("out_shape", [(6,), (6, 3), (6, 2, 3)])
def test_jacobian_shape_follows_output(out_shape):
    model = jacext.extend(Reshaped(torch.Size(out_shape)))
    with backpack(jacext.BatchJacobian()):
        model(torch.randn(6, 4)).sum().backward()
    c = torch.Size(out_shape[1:]).numel()
    assert model.lin.weight.jacobian.shape == (*out_shape, c, 4)
    assert model.lin.bias.jacobian.shape == (*out_shape, c)


def test_flat_jacobian_orders_parameters_like_model_parameters():
    model = mlp()
    x = torch.randn(4, 4)
    parts = jacext.jacobian(model, x)
    flat = jacext.jacobian(model, x, flat=True)
    assert flat.shape == (4, 3, sum(p.numel() for p in model.parameters()))
    assert torch.equal(flat, torch.cat([parts[n].reshape(4, 3, -1) for n, _ in model.named_parameters()], dim=2))


def test_jacobian_leaves_model_and_grads_untouched():
    model = mlp()
    jacext.jacobian(model, torch.randn(2, 4))
    assert all(p.grad is None and not hasattr(p, "jacobian") for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_extend_is_idempotent_and_unextend_removes_everything():
    model = jacext.extend(jacext.extend(mlp()))
    assert len(model._forward_hooks) == 1 and len(model[0]._forward_hooks) == 1
    jacext.unextend(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(k.startswith("_jacext") for m in model.modules() for k in vars(m))


def test_results_are_replaced_by_each_backward():
    model = jacext.extend(mlp())
    for n in (5, 2):
        with backpack(jacext.BatchGrad()):
            nn.CrossEntropyLoss()(model(torch.randn(n, 4)), torch.zeros(n, dtype=torch.long)).backward()
        assert model[0].weight.grad_batch.shape == (n, 5, 4)


def test_no_context_no_attributes_and_same_grad():
    model = jacext.extend(mlp())
    model(torch.randn(3, 4)).sum().backward()
    assert not any(hasattr(p, "grad_batch") or hasattr(p, "jacobian") for p in model.parameters())


def test_frozen_parameters_are_skipped():
    model = mlp().double()
    model[0].weight.requires_grad_(False)
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    jacext.extend(model)
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    assert not hasattr(model[0].weight, "jacobian")
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.jacobian, expected[name], torch.float64, name)


def test_unused_parameters_get_zeros():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = jacext.extend(Branchy())
    with backpack(jacext.BatchJacobian()):
        model(torch.randn(3, 2)).sum().backward()
    assert torch.equal(model.unused.weight.jacobian, torch.zeros(3, 2, 2, 2))


class Custom(nn.Module):
    """Not quasi-linear and without a hand-written rule: the generic rule serves it."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * torch.sin(self.scale) ** 2


class Branching(Custom):
    """Data-dependent control flow: torch.func cannot vmap it, so no rule can serve it."""

    def forward(self, x):
        return x * self.scale if bool((x > 0).all()) else x


def test_module_added_after_extend_is_covered():
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3))).double()
    model.append(Custom().double())
    x = torch.randn(2, 2, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    assert_close(model[1].scale.jacobian, expected["1.scale"], torch.float64)


def test_module_no_rule_can_serve_names_path_and_class():
    model = jacext.extend(nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), Branching())))
    with backpack(jacext.BatchGrad()):
        out = model(torch.randn(2, 2))
        with pytest.raises(jacext.JacextError, match=r"'1\.1' \(Branching\).*generic rule.*register"):
            out.sum().backward()


def test_frozen_unsupported_module_is_fine():
    model = nn.Sequential(nn.Linear(2, 3), Custom().requires_grad_(False))
    jacext.jacobian(model, torch.randn(2, 2))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin(x), x


def test_tuple_output_is_a_clear_error():
    model = jacext.extend(TwoOutputs())
    with backpack(jacext.BatchJacobian()), pytest.raises(jacext.JacextError, match="returned tuple"):
        model(torch.randn(2, 2))


def test_modified_input_is_a_clear_error():
    model = jacext.extend(nn.Linear(2, 2))
    x = torch.randn(3, 2)
    with backpack(jacext.BatchGrad()):
        out = model(x)
        x.add_(1.0)
        with pytest.raises(jacext.JacextError, match="modified in place"):
            out.sum().backward()


def test_backpack_extension_needs_backpack_hooks():
    model = jacext.extend(mlp())
    with backpack(bpext.BatchL2Grad()), pytest.raises(jacext.JacextError, match="backpack=True"):
        model(torch.randn(2, 4))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_combined_with_backpack_extensions_and_agrees_with_backpack_batchgrad():
    model = jacext.extend(mlp().double(), backpack=True)
    lossfunc = nn.CrossEntropyLoss()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with backpack(bpext.BatchGrad()):
        lossfunc(model(x), y).backward()
    theirs = [p.grad_batch.clone() for p in model.parameters()]
    with backpack(jacext.BatchGrad(), jacext.BatchJacobian(), bpext.BatchL2Grad()):
        lossfunc(model(x), y).backward()
    for p, t in zip(model.parameters(), theirs):
        assert_close(p.grad_batch, t, torch.float64)
        assert_close(p.batch_l2, (t**2).flatten(1).sum(1), torch.float64)


def test_no_grad_forward_records_nothing():
    model = jacext.extend(mlp())
    with backpack(jacext.BatchGrad()), torch.no_grad():
        model(torch.randn(2, 4))


def test_reference_catches_a_wrong_rule(monkeypatch):
    """The oracle is not vacuous: a rule that is off by a factor fails the comparison."""
    from dataclasses import replace

    from jacext.rules import LAYERS

    model = mlp().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    expected = loop_grad_batch(model, nn.CrossEntropyLoss(), y, x)
    right = LAYERS[nn.Linear].rule
    wrong = replace(LAYERS[nn.Linear], rule=lambda m, a, k, g: {n: v * (1 + 1e-8) for n, v in right(m, a, k, g).items()})
    monkeypatch.setitem(LAYERS, nn.Linear, wrong)
    jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        nn.CrossEntropyLoss()(model(x), y).backward()
    with pytest.raises(AssertionError):
        assert_close(model[0].weight.grad_batch, expected["0.weight"], torch.float64)


class Pair(nn.Module):
    """Two outputs, the second computed from the first inside the module."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 2))
        self.bias = nn.Parameter(torch.randn(2))

    def forward(self, x):
        a = nn.functional.linear(x, self.weight, self.bias)
        return a, torch.tanh(a) * self.bias


class PairUser(nn.Module):
    def __init__(self, inplace=False):
        super().__init__()
        self.pair, self.inplace = Pair(), inplace

    def forward(self, x):
        a, b = self.pair(x)
        return (a.mul_(2.0) if self.inplace else a * 2.0) + b


def test_outputs_computed_from_each_other_get_their_own_cotangents():
    model = PairUser().double()
    x = torch.randn(3, 2, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    got = jacext.jacobian(model, x)
    for name in expected:
        assert_close(got[name], expected[name], torch.float64, name)


def test_in_place_change_of_an_aliased_output_is_a_clear_error():
    model = jacext.extend(PairUser(inplace=True))
    with backpack(jacext.BatchGrad()):
        out = model(torch.randn(3, 2))
        with pytest.raises(jacext.JacextError, match="modified in place"):
            out.sum().backward()


class FunctionalTie(nn.Module):
    """Uses the embedding matrix functionally in the parent's forward: not attributable."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return nn.functional.linear(self.lin(self.emb(x)), self.emb.weight)


class UsesChildBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * self.lin.bias


@pytest.mark.parametrize(
    "model,x,where",
    [
        (FunctionalTie(), torch.tensor([[1, 2]]), r"'emb\.weight' is used in the forward of a module without parameters"),
        (nn.Sequential(UsesChildBias()), torch.randn(2, 2), r"'0\.lin\.bias' is used in"),
    ],
)
def test_parameter_used_outside_its_module_is_a_clear_error(model, x, where):
    jacext.extend(model)
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match=where):
        model(x)


class CountingMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class InsideMode(nn.Module):
    """Runs its body inside a torch-function mode of its own, so that jacext's parameter-use
    guard is not the innermost mode while the body's layers run and are recorded."""

    def __init__(self, body):
        super().__init__()
        self.body, self.mode = body, CountingMode()

    def forward(self, x):
        with self.mode:
            return self.body(x)


def test_a_torch_function_mode_inside_the_forward(dtype):
    torch.manual_seed(0)
    model = InsideMode(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).to(dtype)
    check_grad_batch(model, nn.MSELoss(reduction="sum"), torch.randn(5, 2, dtype=dtype), torch.randn(5, 3, dtype=dtype))
    assert model.mode.calls > 0
    misuse = jacext.extend(InsideMode(UsesChildBias()))  # the guard still sees the body's uses
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match=r"'body\.lin\.bias' is used in"):
        misuse(torch.randn(2, 2))


def test_parameter_metadata_outside_its_module_is_fine():
    class Peeks(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            scale = self.lin.weight.detach().norm()  # no gradient flows: not a use
            return self.lin(x) / scale

    jacext.jacobian(Peeks(), torch.randn(2, 2))


def test_empty_batch_gives_empty_results_and_the_usual_grad():
    model = jacext.extend(mlp())
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad(), jacext.BatchL2Grad()):
        nn.CrossEntropyLoss(reduction="sum")(model(torch.randn(0, 4)), torch.zeros(0, dtype=torch.long)).backward()
    for p in model.parameters():
        assert p.jacobian.shape == (0, 3, *p.shape) and p.grad_batch.shape == (0, *p.shape) and p.batch_l2.shape == (0,)
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_model_never_extended_is_a_clear_error():
    model = mlp()
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="jacext.extend"):
        model(torch.randn(2, 4))


def test_wrapper_around_an_extended_model_and_loss_modules_are_fine():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = jacext.extend(mlp())

        def forward(self, x):
            return self.net(x)

    model = Wrapper()
    with backpack(jacext.BatchGrad()):
        nn.CrossEntropyLoss()(model(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
    assert model.net[0].weight.grad_batch.shape == (2, 5, 4)


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, fail=False):
        h = self.lin(x)
        if fail:
            raise ValueError("boom")
        return h


def test_exception_in_forward_leaves_nothing_behind():
    model = jacext.extend(Failing()).double()
    x = torch.randn(3, 2, dtype=torch.float64)
    with backpack(jacext.BatchJacobian()):
        with pytest.raises(ValueError, match="boom"):
            model(x, fail=True)
        model(x).sum().backward()
    assert jacext.engine.hooks.recording() is None
    assert_close(model.lin.weight.jacobian, loop_jacobian(model, x)["lin.weight"], torch.float64)
    assert not torch.overrides._get_current_function_mode_stack()


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


def test_jacobian_of_a_wrapper_keeps_the_inner_extension():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    inner = jacext.extend(mlp())
    hooks = [dict(m._forward_hooks) for m in inner.modules()]
    jacext.jacobian(Wrapper(inner), torch.randn(2, 4))
    assert [dict(m._forward_hooks) for m in inner.modules()] == hooks
    assert state_of(inner[0]).path == "0"
