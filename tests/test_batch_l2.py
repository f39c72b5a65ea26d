"""BatchL2Grad: squared per-sample gradient norms, against the loop oracle's per-sample gradients."""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, overall_scale, trainable
from torch import nn

import jacext


def check_l2(model, lossfunc, y, *args, with_grad_batch=False):
    dtype = next(model.parameters()).dtype
    expected = {k: v.flatten(1).square().sum(1) for k, v in loop_grad_batch(model, lossfunc, y, *args).items()}
    jacext.extend(model)
    exts = (jacext.BatchL2Grad(), jacext.BatchGrad()) if with_grad_batch else (jacext.BatchL2Grad(),)
    with backpack(*exts):
        lossfunc(model(*args), y).backward()
    for name, p in trainable(model):
        assert_close(p.batch_l2, expected[name], dtype, f"batch_l2 of {name}", overall_scale(expected))
        assert not with_grad_batch or torch.equal(p.batch_l2, p.grad_batch.flatten(1).square().sum(1))


class Seq(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(layer.out_features, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x)).mean(1))


@pytest.mark.parametrize("t", [1, 2, 40], ids=["T=1", "gram", "materialised"])
def test_linear_over_sequences(t, dtype):
    model = Seq(nn.Linear(6, 5)).to(dtype)
    check_l2(model, nn.CrossEntropyLoss(), torch.randint(0, 2, (4,)), torch.randn(4, t, 6, dtype=dtype))


@pytest.mark.parametrize(
    "conv,size",
    [
        (nn.Conv1d(4, 6, 3, groups=2), (9,)),
        (nn.Conv2d(4, 2, 3, padding=1, stride=2), (5, 6)),
        (nn.Conv2d(2, 64, 2), (3, 3)),
        (nn.Conv3d(2, 2, 2, dilation=2, padding_mode="circular", padding=1), (4, 4, 3)),
    ],
    ids=["1d_groups", "2d_stride", "2d_wide", "3d"],
)
def test_convolutions(conv, size, dtype):
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).to(dtype)
    x = torch.randn(3, conv.in_channels, *size, dtype=dtype)
    model(x)
    check_l2(model, nn.MSELoss(), torch.randn(3, 3, dtype=dtype), x)


@pytest.mark.parametrize(
    "options", [dict(), dict(padding_idx=0), dict(scale_grad_by_freq=True)], ids=["plain", "padding", "freq"]
)
def test_embedding(options, dtype):
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(6, 3, **options), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.emb(x).sum(1))

    x = torch.tensor([[1, 1, 0, 2], [3, 0, 0, 3], [5, 4, 1, 1]])
    check_l2(Bag().to(dtype), nn.CrossEntropyLoss(), torch.tensor([0, 1, 1]), x)


def test_shared_module_and_layers_without_norm_rule(dtype):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm, self.head = nn.Linear(3, 3), nn.LayerNorm(3), nn.Bilinear(3, 3, 2)

        def forward(self, x):
            h = self.lin(torch.tanh(self.lin(x)))
            return self.head(self.norm(h), x)

    check_l2(
        Shared().to(dtype), nn.MSELoss(reduction="sum"), torch.randn(4, 2, dtype=dtype), torch.randn(4, 3, dtype=dtype)
    )


def test_together_with_batch_grad_and_jacobian(dtype):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    check_l2(
        model, nn.CrossEntropyLoss(), torch.tensor([0, 1, 1]), torch.randn(3, 3, dtype=dtype), with_grad_batch=True
    )


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_agrees_with_backpack():
    import backpack.extensions as bpext

    model = jacext.extend(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)).double(), backpack=True
    )
    x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with backpack(bpext.BatchL2Grad()):
        nn.CrossEntropyLoss()(model(x), y).backward()
    theirs = [p.batch_l2.clone() for p in model.parameters()]
    with backpack(jacext.BatchL2Grad()):
        nn.CrossEntropyLoss()(model(x), y).backward()
    for p, t in zip(model.parameters(), theirs, strict=True):
        assert_close(p.batch_l2, t, torch.float64)
