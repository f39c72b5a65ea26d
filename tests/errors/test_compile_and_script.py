"""torch.compile and TorchScript with an extended model.

torch.compile keeps jacext's hooks running (they break the graph where they run), so every
extension is exact; BatchJacobian pulls its seeds back one at a time through graphs that
torch.compile made (their kernels take no vmap-batched tensors). TorchScript runs no Python
hooks: scripting an extended model, extending a scripted or traced one, or running one inside
a context is a JacextError that says what to do, before anything is written.
"""

import copy

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian, overall_scale
from torch import nn

import jacext

from .common import mlp, nothing_left_behind, untouched

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def inductor_available() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        return False
    return True


class Sequence(nn.Module):
    """Tokens (N, T) -> (N, 3): an embedding, a Linear on every position, a mean over them."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.emb(x).tanh()).mean(1)


@pytest.fixture(autouse=True)
def _fresh_compilations():
    """Each test compiles for itself (Dynamo would reuse another test's graphs for the same code)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def check_compiled(model, compiled, x, dtype, chunk=None):
    expected_j = loop_jacobian(model, x)
    expected_g = loop_grad_batch(model, lambda out, y: out.square().sum(), None, x)
    with backpack(jacext.BatchJacobian(chunk_size=chunk)):
        out = compiled(x)
        out.backward(torch.ones_like(out))
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected_j[name], dtype, name, overall_scale(expected_j))
    with backpack(jacext.BatchGrad()):
        compiled(x).square().sum().backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected_g[name], dtype, name, overall_scale(expected_g))


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("build", ["sequence", "mlp"])
def test_compiled_models_give_the_loops_numbers(build, chunk, dtype):
    """AOTAutograd's graphs (backend aot_eager: no C++ compiler needed); N = T = 5."""
    torch.manual_seed(0)
    if build == "sequence":
        model, x = Sequence().to(dtype), torch.randint(0, 10, (5, 5))
    else:
        model, x = mlp().to(dtype), torch.randn(5, 4, dtype=dtype)
    jacext.extend(model)
    check_compiled(model, torch.compile(model, backend="aot_eager"), x, dtype, chunk)


@pytest.mark.skipif(not inductor_available(), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("build", ["sequence", "mlp"])
def test_inductor_gives_the_loops_numbers(build):
    """Inductor's kernels take no vmap-batched tensors: once 'Cannot access data pointer of Tensor
    that doesn't have storage' (sequence) and 'Batching rule not implemented for aten::mm.out' (mlp)."""
    torch.manual_seed(0)
    if build == "sequence":
        model, x = Sequence().double(), torch.randint(0, 10, (5, 5))
    else:
        model, x = mlp().double(), torch.randn(5, 4, dtype=torch.float64)
    jacext.extend(model).compile()
    with torch._functorch.config.patch(donated_buffer=False):
        check_compiled(model, model, x, torch.float64)


@pytest.mark.skipif(not inductor_available(), reason="inductor needs a C++ compiler")
def test_a_backward_compiled_with_donated_buffers_is_exact_or_a_clear_error():
    """Inductor lets a backward whose saved tensors it can reuse run only once; the pull-back runs
    it before the ordinary backward. Whether inductor donates them depends on where the graph
    breaks: either the loop's numbers or the error naming the option, never a crash."""
    model = jacext.extend(mlp().double())
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    model.compile()
    ext = jacext.BatchJacobian()
    try:
        with backpack(ext):
            model(x).sum().backward()
    except jacext.JacextError as error:
        assert "donated_buffer = False" in str(error)
        assert untouched(model, ext) and nothing_left_behind()
        return
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected[name], torch.float64, name)


def test_scripting_an_extended_model_says_what_to_do():
    model = jacext.extend(mlp())
    with pytest.raises(jacext.JacextError, match=r"'<root>' is extended by jacext.*unextend\(copy.deepcopy"):
        torch.jit.script(model)
    with pytest.raises(jacext.JacextError, match=r"'0' is extended"):
        torch.jit.script(model[0])
    scripted = torch.jit.script(jacext.unextend(copy.deepcopy(model)))  # what the message advises
    x = torch.randn(3, 4)
    torch.testing.assert_close(scripted(x), model(x))
    assert jacext.extending.is_extended(model)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_modules_are_refused_by_extend_and_inside_a_context(how):
    x = torch.randn(3, 4)
    plain = mlp()
    compiled = torch.jit.script(plain) if how == "script" else torch.jit.trace(plain, x)
    with pytest.raises(jacext.JacextError, match=r"'<root>' \(\w+\) is a TorchScript module.*eager model"):
        jacext.extend(compiled)
    inside = nn.Sequential(nn.Linear(4, 4), compiled)
    with pytest.raises(jacext.JacextError, match=r"'1' \(\w+\) is a TorchScript module"):
        jacext.extend(inside)
    assert all(not vars(m).get("_jacext") for m in inside.modules())
    ext = jacext.BatchGrad()
    with backpack(ext), pytest.raises(jacext.JacextError, match="is a TorchScript module"):
        compiled(x).sum().backward()
    assert untouched(compiled, ext) and nothing_left_behind()


def test_a_traced_extended_model_is_refused_inside_a_context():
    """torch.jit.trace of an extended model works outside a context (the hooks do nothing
    there) and makes a TorchScript module without them, which a context refuses."""
    model, x = jacext.extend(mlp()), torch.randn(3, 4)
    traced = torch.jit.trace(model, x)
    ext = jacext.BatchGrad()
    with backpack(ext), pytest.raises(jacext.JacextError, match="TracedModule.*is a TorchScript module"):
        traced(x).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()
