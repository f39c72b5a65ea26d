"""Where jacext meets the rest of PyTorch (issue 15): in-place operations on the output, patched
forwards and extra parameters on layers with a hand-written rule, hooks that replace outputs,
``autograd.Function``, forwards called directly, double backward, interrupts. Each case is exact
against a loop over samples (one backward per sample, plain autograd) or refused with a
JacextError that leaves no result behind."""

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
from tests.errors.common import nothing_left_behind
from tests.reference import assert_close, loop_jacobian, overall_scale

N, IN, OUT = 5, 3, 2


def per_sample_loop(model, x, loss_of):
    """{name: (N, *p.shape)}: the gradient of loss_of(model, x[n:n+1]) for each n."""
    grads = []
    for n in range(x.shape[0]):
        model.zero_grad()
        loss_of(model, x[n : n + 1]).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    model.zero_grad()
    return {k: torch.stack([g[k] for g in grads]) for k in grads[0]}


def clipped_sum(per_sample, bound):
    norms = torch.stack([g.flatten(1).square().sum(1) for g in per_sample.values()]).sum(0).sqrt()
    w = (bound / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("n,n...->...", w, g) for k, g in per_sample.items()}


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, 4), nn.Tanh(), nn.Linear(4, OUT)).to(dtype)


def squares(model, x):
    return model(x).square().sum()


def earlier_batch(model, dtype, loss_of=squares):
    """A BatchGrad step on a batch of another size, so that a stale result shows in its shape."""
    with backpack(jacext.BatchGrad()):
        loss_of(model, torch.randn(N + 3, IN, dtype=dtype)).backward()
    model.zero_grad()


def check_batch_grad(model, x, loss_of, dtype):
    expected = per_sample_loop(model, x, loss_of)
    earlier_batch(model, dtype, loss_of)
    with backpack(jacext.BatchGrad()):
        loss_of(model, x).backward()
    scale = overall_scale(expected)
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], dtype, name, scale)
        assert_close(p.grad, expected[name].sum(0), dtype, name, scale)


def check_clipped(model, x, loss_of, dtype, bound=0.05):
    expected = clipped_sum(per_sample_loop(model, x, loss_of), bound)
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        loss_of(model, x).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, expected[name], dtype, name, overall_scale(expected))


def divided(model, x):
    out = model(x)
    out /= 3.0
    return out.square().sum()


def relu_in_place(model, x):
    out = model(x)
    out.relu_()
    return out.square().sum()


def column_zeroed(model, x):
    out = model(x)
    out[:, 0] = 0
    return out.square().sum()


IN_PLACE = {"divided": divided, "relu_": relu_in_place, "setitem": column_zeroed}


@pytest.mark.parametrize("loss_of", IN_PLACE.values(), ids=IN_PLACE.keys())
def test_in_place_operation_on_the_output(loss_of, dtype):
    model = jacext.extend(mlp(dtype))
    x = torch.randn(N, IN, dtype=dtype)
    check_batch_grad(model, x, loss_of, dtype)
    check_clipped(model, x, loss_of, dtype)


def test_jacobian_is_of_the_output_the_model_computed_before_an_in_place_change(dtype):
    model = jacext.extend(mlp(dtype))
    x = torch.randn(N, IN, dtype=dtype)
    with backpack(jacext.BatchJacobian()):
        out = model(x)
        out *= 0  # changes the loss, not the model's Jacobian
        out.sum().backward()
    expected = jacext.jacobian(model, x)
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected[name], dtype, name)


class LoRA(nn.Module):
    """A low-rank adapter patched onto an existing ``nn.Linear`` instance, as PEFT-style code does."""

    @staticmethod
    def patch(linear: nn.Linear, rank: int = 2) -> None:
        linear.lora_a = nn.Parameter(torch.randn(rank, linear.in_features, dtype=linear.weight.dtype))
        linear.lora_b = nn.Parameter(torch.randn(linear.out_features, rank, dtype=linear.weight.dtype))
        base = linear.forward
        linear.forward = lambda x: base(x) + F.linear(F.linear(x, linear.lora_a), linear.lora_b)


def lora_after_extend(dtype):
    model = jacext.extend(mlp(dtype))
    LoRA.patch(model[0])
    return model


def lora_before_extend(dtype):
    model = mlp(dtype)
    LoRA.patch(model[2])
    return jacext.extend(model)


def doubled_forward(dtype):
    model = jacext.extend(mlp(dtype))
    base = model[0].forward
    model[0].forward = lambda x: 2 * base(x)
    return model


PATCHED = {"lora_after_extend": lora_after_extend, "lora_before_extend": lora_before_extend, "doubled": doubled_forward}


@pytest.mark.parametrize("build", PATCHED.values(), ids=PATCHED.keys())
def test_patched_forward_or_extra_parameter_on_a_layer_with_a_rule(build, dtype):
    """The call is not what Linear's rule assumes: the generic rule differentiates it as it ran."""
    model = build(dtype)
    x = torch.randn(N, IN, dtype=dtype)

    def loss_of(m, x):
        return m(x).square().sum()

    check_batch_grad(model, x, loss_of, dtype)
    check_clipped(model, x, loss_of, dtype)


class Mul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w):
        ctx.save_for_backward(a, w)
        return a @ w.t()

    @staticmethod
    def backward(ctx, g):
        a, w = ctx.saved_tensors
        return g @ w, g.t() @ a


class ThroughFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(IN, 4), nn.Linear(4, OUT)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)) + Mul.apply(x, self.inner.weight))


def test_parameter_used_through_an_autograd_function_outside_its_module_is_refused():
    model = jacext.extend(ThroughFunction().double())
    with pytest.raises(jacext.JacextError, match="inner.weight"):
        with backpack(jacext.BatchGrad()):
            model(torch.randn(N, IN, dtype=torch.float64)).sum().backward()
    assert nothing_left_behind() and all(p.grad is None for p in model.parameters())


def test_forward_called_directly_is_refused_without_leaving_results():
    model = jacext.extend(mlp())
    earlier_batch(model, torch.float64)
    with backpack(jacext.BatchGrad()):
        model(torch.randn(N + 3, IN, dtype=torch.float64)).sum().backward()
    with pytest.raises(jacext.JacextError, match=r"model\(x\), not model.forward\(x\)"):
        with backpack(jacext.BatchGrad()):
            model.forward(torch.randn(N, IN, dtype=torch.float64)).sum().backward()
    assert not any(hasattr(p, "grad_batch") for p in model.parameters())


def test_other_extensions_results_of_an_earlier_batch_are_dropped():
    model = jacext.extend(mlp())
    earlier_batch(model, torch.float64)
    with backpack(jacext.BatchL2Grad()):
        model(torch.randn(N, IN, dtype=torch.float64)).sum().backward()
    assert all(not hasattr(p, "grad_batch") and p.batch_l2.shape == (N,) for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_clip_grad_clips_under_create_graph(dtype):
    model = jacext.extend(mlp(dtype))
    x = torch.randn(N, IN, dtype=dtype)

    def loss_of(m, x):
        return m(x).square().sum()

    expected = clipped_sum(per_sample_loop(model, x, loss_of), 0.05)
    try:
        with backpack(ClipGrad(0.05, loss_reduction="sum")):
            loss_of(model, x).backward(create_graph=True)
        for name, p in model.named_parameters():
            assert_close(p.grad, expected[name], dtype, name, overall_scale(expected))
            assert p.grad.requires_grad
    finally:
        for p in model.parameters():
            p.grad = None  # the graph of a create_graph gradient holds the parameter: a cycle


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_no_tape_outlives_its_create_graph_backward():
    model = jacext.extend(mlp())
    for _ in range(50):
        with backpack(jacext.BatchGrad()):
            model(torch.randn(N, IN, dtype=torch.float64)).square().sum().backward(create_graph=True)
        for p in model.parameters():
            p.grad = None
    gc.collect()
    with warnings.catch_warnings():  # (isinstance on some of torch's deprecated objects warns)
        warnings.simplefilter("ignore")
        assert sum(isinstance(o, Tape) for o in gc.get_objects()) <= 1


class Interrupted(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(IN, IN)

    def forward(self, x):
        self.inner(x)
        raise KeyboardInterrupt


def test_keyboard_interrupt_in_a_forward_leaves_nothing_behind():
    depth = torch._C._len_torch_function_stack()
    broken = jacext.extend(nn.Sequential(nn.Linear(IN, IN), Interrupted()).double())
    with pytest.raises(KeyboardInterrupt):
        with backpack(jacext.BatchGrad()):
            broken(torch.randn(N, IN, dtype=torch.float64))
    # the next parameter use anywhere notices the forward ended, and stops recording
    nn.Linear(IN, IN)(torch.randn(2, IN)).sum().backward()
    assert torch._C._len_torch_function_stack() == depth and nothing_left_behind()
    model = jacext.extend(mlp())
    x = torch.randn(N, IN, dtype=torch.float64)
    check_batch_grad(model, x, lambda m, x: m(x).square().sum(), torch.float64)


def test_keyboard_interrupt_then_another_extended_forward():
    broken = jacext.extend(nn.Sequential(nn.Linear(IN, IN), Interrupted()).double())
    with pytest.raises(KeyboardInterrupt):
        with backpack(jacext.BatchGrad()):
            broken(torch.randn(N, IN, dtype=torch.float64))
    model = jacext.extend(mlp())
    x = torch.randn(N, IN, dtype=torch.float64)
    check_batch_grad(model, x, lambda m, x: m(x).square().sum(), torch.float64)
    assert nothing_left_behind()


def test_two_threads_each_with_its_own_model_and_context():
    """BackPACK's context is per thread: neither thread sees the other's block, or its end."""
    import threading

    from backpack.context import CTX

    wrong = []

    def train(seed):
        torch.manual_seed(seed)
        model = jacext.extend(nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, OUT)).double())
        for step in range(30):
            x = torch.randn(N + step % 3, IN, dtype=torch.float64)
            expected = per_sample_loop(model, x, lambda m, x: m(x).square().sum())
            with backpack(jacext.BatchGrad()):
                model(x).square().sum().backward()
            if any(p.grad_batch.shape != expected[k].shape or not torch.allclose(p.grad_batch, expected[k])
                   for k, p in model.named_parameters()):
                wrong.append(step)
            model.zero_grad()

    threads = [threading.Thread(target=train, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [] and CTX.get_active_exts() == ()


class Caching(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(IN, dtype=torch.float64))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.cached = x * self.scale
        return self.cached


def test_generic_rule_leaves_the_attributes_its_forward_wrote():
    model = jacext.extend(nn.Sequential(Caching(), nn.Linear(IN, OUT).double()))
    x = torch.randn(N, IN, dtype=torch.float64)
    with backpack(jacext.BatchGrad()):
        model(x).square().sum().backward()
    assert model[0].calls == 1
    assert_close(model[0].cached, x * model[0].scale.detach(), torch.float64)


class ComplexOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.re, self.im = nn.Linear(IN, OUT), nn.Linear(IN, OUT)

    def forward(self, x):
        return torch.complex(self.re(x), self.im(x))


def test_complex_output_real_parameters(dtype):
    """BatchGrad differentiates a real loss of a complex output exactly; BatchJacobian refuses
    (real seeds would give the real part only) and names view_as_real."""
    torch.manual_seed(0)
    model = jacext.extend(ComplexOutput().to(dtype))
    x = torch.randn(N, IN, dtype=dtype)
    check_batch_grad(model, x, lambda m, x: (m(x) * (1 + 2j)).abs().square().sum(), dtype)
    with pytest.raises(jacext.JacextError, match="view_as_real"):
        with backpack(jacext.BatchJacobian()):
            model(x).abs().sum().backward()


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(IN, 4), nn.Linear(4, OUT), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"logits": self.a(h), "aux": self.b(h), "loss": h.square().mean()}


def test_batch_jacobian_of_a_named_output():
    model = jacext.extend(TwoHeads().double())
    x = torch.randn(N, IN, dtype=torch.float64)
    for select in ("logits", lambda out: out["logits"]):
        with backpack(jacext.BatchJacobian(output=select)):
            model(x)["logits"].sum().backward()
        expected = loop_jacobian(nn.Sequential(model.body, nn.Tanh(), model.a), x)
        for name, p in [("0.weight", model.body.weight), ("2.weight", model.a.weight)]:
            assert_close(p.jacobian, expected[name], torch.float64, name)
        assert all(p.jacobian.shape == (N, OUT, *p.shape) and not p.jacobian.any() for p in model.b.parameters())
        model.zero_grad()


def test_batch_jacobian_of_an_ambiguous_output_lists_the_candidates():
    model = jacext.extend(TwoHeads().double())
    with pytest.raises(jacext.JacextError, match=r"output\['logits'\] \(5, 2\), output\['aux'\] \(5, 3\)"):
        with backpack(jacext.BatchJacobian()):
            model(torch.randn(N, IN, dtype=torch.float64))
