"""``BatchJacobian(chunk_size=k)``: each chunk's seeds are made when it is pulled back, so no
allocation of the pull-back grows with the number of outputs C beyond the result itself (k N C
seed entries; N k N C where BatchNorm couples the samples); the memory estimate covers the seeds,
so a request that cannot fit is jacext's own error, naming ``chunk_size``."""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_jacobian, overall_scale
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import jacext


class Wide(nn.Module):
    """C = ``c`` outputs per sample, from a few parameters: out[n, i] = w_i lin(x_n)."""

    def __init__(self, c: int, batchnorm: bool = False):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.norm = nn.BatchNorm1d(3) if batchnorm else nn.Identity()
        self.register_buffer("w", torch.linspace(-1, 1, c))

    def forward(self, x):
        return self.lin(self.norm(x)) * self.w


class Sequence(nn.Module):
    """(N, T, D) -> (N, T, 2): C = 2 T outputs per sample."""

    def __init__(self, batchnorm=False):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(3) if batchnorm else nn.Identity()

    def forward(self, x):
        h = self.norm(self.a(x).transpose(1, 2)).transpose(1, 2)
        return self.b(h.tanh())


@pytest.mark.parametrize("coupled", [False, True], ids=["independent", "batchnorm_exact"])
@pytest.mark.parametrize("chunk", [1, 4, 5, None])
def test_chunks_give_the_loops_numbers(chunk, coupled, dtype):
    """N = T = 3: six outputs per sample, in chunks that do and do not divide them."""
    model = Sequence(coupled).to(dtype)
    x = torch.randn(3, 3, 4, dtype=dtype)
    expected = loop_jacobian(model, x)
    jacext.extend(model, batchnorm="exact" if coupled else "error")
    with backpack(jacext.BatchJacobian(chunk_size=chunk), jacext.BatchGrad()):
        out = model(x)
        out.backward(torch.ones_like(out))
    assert jacext.backward_plan(model) == ("pull-back" if chunk is None else "chunked pull-back")
    scale = overall_scale(expected)
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected[name], dtype, name, scale)
        assert_close(p.grad_batch, expected[name].flatten(1, 2).sum(1), dtype, name, scale)


class LargestStorage(TorchDispatchMode):
    """The largest storage any operation returns while the mode is on (views share their base's)."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("coupled", [False, True], ids=["independent", "batchnorm_exact"])
def test_no_allocation_of_the_backward_outgrows_the_chunk(coupled):
    """C = 2000 outputs, N = 4, chunk_size = 10: all C one-hot seeds (C N C entries, 64 MB in
    float32) would be 200 times a chunk's seeds; the largest allocation is the larger of a
    chunk's seeds and the result (N C P entries)."""
    c, n, chunk = 2000, 4, 10
    model = jacext.extend(Wide(c, coupled), batchnorm="exact" if coupled else "error")
    x = torch.randn(n, 3)
    with backpack(jacext.BatchJacobian(chunk_size=chunk)):
        out = model(x)
        with LargestStorage() as seen:
            out.sum().backward()
    per_chunk = (n if coupled else 1) * chunk * n * c * 4
    result = n * c * model.lin.weight.numel() * 4
    assert seen.nbytes <= max(per_chunk, result), (seen.nbytes, per_chunk, result)
    if not coupled:  # d out[n, i] / d bias = w_i
        torch.testing.assert_close(model.lin.bias.jacobian, model.w.expand(n, c).reshape(n, c, 1))
