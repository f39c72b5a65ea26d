"""What jacext refuses up front, with an error that says what to do: a ClipGrad it cannot
serve, results or cotangents that cannot fit in memory
(pointing to fewer outputs or ``chunk_size``), a ``chunk_size`` that is not positive.
"""

import pytest
import torch
from backpack import backpack
from common_models import compiled_model
from reference import assert_close, loop_jacobian
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


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_batch_jacobian_on_a_compiled_module():
    """torch.compile breaks its graph at jacext's torch-function mode: the layers run as recorded."""
    model = compiled_model()
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = loop_jacobian(model, x)
    with backpack(jacext.BatchJacobian()):
        model(x).sum().backward()
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected[name], torch.float64, name)


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


def test_cotangents_that_cannot_fit_point_to_chunk_size(monkeypatch):
    model = jacext.extend(nn.Sequential(nn.Linear(30, 40), nn.Tanh(), nn.Linear(40, 10)))
    monkeypatch.setattr(jacext.engine.memory, "available_bytes", lambda device, wanted=0: 8 * 40 * 4 * 5)
    with backpack(jacext.BatchJacobian()), pytest.raises(jacext.JacextError, match="chunk_size"):
        model(torch.randn(8, 30)).sum().backward()
