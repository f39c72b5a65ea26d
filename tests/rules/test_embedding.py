import pytest
import torch
from backpack import backpack
from torch import nn

import jacext
from reference import check_jacobian


class EmbedThenLinear(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.emb = nn.Embedding(7, 3, **options)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.emb(x))


@pytest.mark.parametrize(
    "options", [dict(), dict(padding_idx=0), dict(max_norm=0.5), dict(sparse=True)], ids=["plain", "padding_idx", "max_norm", "sparse"]
)
@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 2)], ids=["N", "NT", "NAB"])
def test_embedding(options, shape, dtype):
    model = EmbedThenLinear(**options).to(dtype)
    x = torch.randint(0, 7, shape)
    x[0, ...] = 0  # padding index present, and repeated indices within a sample
    check_jacobian(model, x)


def test_embedding_alone(dtype):
    check_jacobian(nn.Embedding(5, 2, padding_idx=4).to(dtype), torch.tensor([[4, 1, 1], [0, 4, 2]]))


def test_scale_grad_by_freq_raises():
    model = jacext.extend(nn.Embedding(5, 2, scale_grad_by_freq=True))
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="scale_grad_by_freq"):
        model(torch.tensor([[1, 1]])).sum().backward()
