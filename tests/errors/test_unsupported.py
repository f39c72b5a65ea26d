"""What jacext refuses up front, with an error that says what to do: a ClipGrad it cannot
serve, results, seeds (all C of them, or a chunk) or cotangents that cannot fit in memory
(pointing to fewer outputs or ``chunk_size``), a ``chunk_size`` that is not positive.
"""

import pytest
import torch
from backpack import backpack
from torch import nn

import jacext
import jacext.engine.memory
from jacext.dp import ClipGrad

from .common import batchnorm_net, mlp, nothing_left_behind, untouched


@pytest.mark.parametrize(
    "exts,build,options",
    [
        pytest.param((ClipGrad(1.0, "sum"), ClipGrad(2.0, "sum")), mlp, {}, id="two_ClipGrad"),
        pytest.param((ClipGrad(1.0, "sum"),), batchnorm_net, {"batchnorm": "exact"}, id="ClipGrad_batchnorm_exact"),
    ],
)
def test_clip_grad_it_cannot_serve_is_an_error_before_anything_is_set(exts, build, options):
    model = jacext.extend(build(), **options)
    with backpack(*exts), pytest.raises(jacext.JacextError, match="exactly one"):
        model(torch.randn(4, 4)).sum().backward()
    assert untouched(model, exts[0]) and nothing_left_behind()


def test_results_that_cannot_fit_are_refused_before_allocating(monkeypatch):
    monkeypatch.setattr(jacext.engine.memory, "available_bytes", lambda device, wanted=0: 1000)
    model = jacext.extend(nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 10)))
    with backpack(jacext.BatchJacobian()), pytest.raises(jacext.JacextError, match=r"GiB.*fewer outputs"):
        model(torch.randn(8, 30)).sum().backward()
    assert all(not hasattr(p, "jacobian") and p.grad is None for p in model.parameters())
    with backpack(jacext.BatchL2Grad()):  # norms are not materialised: nothing to refuse
        model(torch.randn(8, 30)).sum().backward()
    assert model[0].weight.batch_l2.shape == (8,)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        jacext.BatchJacobian(chunk_size=0)


class Wide(nn.Module):
    """C = ``c`` outputs per sample from four parameters: out[n, i] = w_i lin(x_n)."""

    def __init__(self, c: int):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.register_buffer("w", torch.linspace(-1, 1, c))

    def forward(self, x):
        return self.lin(x) * self.w


@pytest.mark.parametrize("chunk", [None, 30_000], ids=["unchunked", "chunk_too_large"])
def test_seeds_that_cannot_fit_are_jacexts_error_naming_chunk_size(chunk):
    """C = 60000 outputs of 64 samples: all seeds are 60000 x 64 x 60000 floats (860 GiB), half
    of them 430 GiB; refused with their size before anything is allocated or written."""
    model = jacext.extend(Wide(60_000))
    ext = jacext.BatchJacobian(chunk_size=chunk)
    advice = "Pass chunk_size" if chunk is None else r"smaller chunk_size to BatchJacobian \(now 30000\)"
    with backpack(ext), pytest.raises(jacext.JacextError, match=rf"seeds .* GiB on cpu.*{advice}"):
        model(torch.randn(64, 3)).sum().backward()
    assert untouched(model, ext) and nothing_left_behind()


def test_cotangents_that_cannot_fit_point_to_chunk_size(monkeypatch):
    model = jacext.extend(nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 10)))
    monkeypatch.setattr(jacext.engine.memory, "available_bytes", lambda device, wanted=0: 8 * 40 * 4 * 5)
    with backpack(jacext.BatchJacobian()), pytest.raises(jacext.JacextError, match="chunk_size"):
        model(torch.randn(8, 30)).sum().backward()
