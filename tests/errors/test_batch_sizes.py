"""Batches of no sample and of one sample, through every layer kind and every extension:
empty results and zero gradients for N = 0, the loop's numbers for N = 1.
"""

from typing import Any, Callable

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian
from torch import nn

import jacext
from jacext.dp import ClipGrad

from .common import mlp


def test_empty_batch_gives_empty_results_and_the_usual_grad():
    model = jacext.extend(mlp())
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad(), jacext.BatchL2Grad()):
        nn.CrossEntropyLoss(reduction="sum")(model(torch.randn(0, 4)), torch.zeros(0, dtype=torch.long)).backward()
    for p in model.parameters():
        assert p.jacobian.shape == (0, 3, *p.shape) and p.grad_batch.shape == (0, *p.shape) and p.batch_l2.shape == (0,)
        assert torch.equal(p.grad, torch.zeros_like(p))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.gn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.GroupNorm(1, 3)
        self.head = nn.Linear(3 * 16, 2)

    def forward(self, x):
        return self.head(self.gn(self.bn(self.conv(x)).relu()).flatten(1))


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lstm = nn.Embedding(7, 4), nn.LSTM(4, 4, batch_first=True)
        self.attn, self.norm, self.head = (
            nn.MultiheadAttention(4, 2, batch_first=True),
            nn.LayerNorm(4),
            nn.Linear(4, 2),
        )

    def forward(self, x):
        h = self.lstm(self.emb(x))[0]
        return self.head(self.norm(self.attn(h, h, h)[0]).mean(1))


# (model in float64, input of N samples, extend's options)
NETS: dict[str, tuple[Callable, Callable, dict[str, Any]]] = {
    "conv_bn_eval": (lambda: ConvNet().double().eval(), lambda n: torch.randn(n, 2, 4, 4, dtype=torch.float64), {}),
    "conv_bn_exact": (
        lambda: ConvNet().double(),
        lambda n: torch.randn(n, 2, 4, 4, dtype=torch.float64),
        {"batchnorm": "exact"},
    ),
    "embedding_lstm_attention": (lambda: SeqNet().double(), lambda n: torch.randint(0, 7, (n, 5)), {}),
}


def mse_sum(out, y):
    return nn.MSELoss(reduction="sum")(out, y)


@pytest.mark.parametrize("net", [k for k in NETS if k != "conv_bn_exact"])
def test_empty_batch_through_every_layer_kind(net):
    build, data, options = NETS[net]
    model, x = build(), data(0)
    y = torch.zeros(0, 2, dtype=torch.float64)
    jacext.extend(model, **options)
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad(), jacext.BatchL2Grad()):
        mse_sum(model(x), y).backward()
    for p in model.parameters():
        assert p.jacobian.shape == (0, 2, *p.shape) and p.grad_batch.shape == (0, *p.shape)
        assert p.batch_l2.shape == (0,) and torch.equal(p.grad, torch.zeros_like(p))
    model.zero_grad()
    with backpack(ClipGrad(1.0, loss_reduction="mean")):
        mse_sum(model(x), y).backward()
    assert all(p.per_sample_l2.shape == (0,) and not p.grad.any() for p in model.parameters())
    jac = jacext.jacobian(model, x)
    assert all(jac[name].shape == (0, 2, *p.shape) for name, p in model.named_parameters())
    assert jacext.jacobian(model, x, flat=True).shape == (0, 2, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("net", NETS)
def test_single_sample(net):
    build, data, options = NETS[net]
    model, x = build(), data(1)
    y = torch.randn(1, 2, dtype=torch.float64)
    expected_jac = loop_jacobian(model, x)
    expected = loop_grad_batch(model, mse_sum, y, x)
    jacext.extend(model, **options)
    with backpack(jacext.BatchJacobian(), jacext.BatchGrad()):
        mse_sum(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.jacobian, expected_jac[name], torch.float64, f"jacobian of {name}")
        assert_close(p.grad_batch, expected[name], torch.float64, f"grad_batch of {name}")
    model.zero_grad()
    with backpack(jacext.BatchL2Grad()):
        mse_sum(model(x), y).backward()
    for name, p in model.named_parameters():
        assert not hasattr(p, "grad_batch") and not hasattr(p, "jacobian")  # another batch's
        assert_close(p.batch_l2, expected[name].flatten(1).square().sum(1), torch.float64, f"batch_l2 of {name}")
    if options:  # ClipGrad refuses coupled samples (test_clip_grad_it_cannot_serve...)
        return
    norm = sum(g.square().sum() for g in expected.values()).sqrt()
    model.zero_grad()
    with backpack(ClipGrad(0.5 * norm.item(), loss_reduction="mean")):
        mse_sum(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, 0.5 * expected[name][0] * norm / (norm + 1e-6), torch.float64, f"clipped grad of {name}")
