"""BatchGrad (and BatchJacobian in the same backward) under each supported loss."""

import pytest
import torch
from reference import check_grad_batch
from torch import nn


def mlp(dtype, out=3):
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).to(dtype)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("n", [1, 5])
def test_cross_entropy(reduction, n, dtype):
    check_grad_batch(
        mlp(dtype), nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, 3, (n,)), torch.randn(n, 4, dtype=dtype)
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cross_entropy_weighted_label_smoothing(reduction, dtype):
    loss = nn.CrossEntropyLoss(
        weight=torch.tensor([1.0, 2.0, 0.5], dtype=dtype), label_smoothing=0.1, reduction=reduction
    )
    check_grad_batch(mlp(dtype), loss, torch.randint(0, 3, (5,)), torch.randn(5, 4, dtype=dtype))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_nll(reduction, dtype):
    model = nn.Sequential(mlp(dtype), nn.LogSoftmax(dim=1))
    check_grad_batch(
        model,
        nn.NLLLoss(reduction=reduction, ignore_index=1),
        torch.randint(0, 3, (6,)),
        torch.randn(6, 4, dtype=dtype),
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mse(reduction, dtype):
    check_grad_batch(
        mlp(dtype), nn.MSELoss(reduction=reduction), torch.randn(4, 3, dtype=dtype), torch.randn(4, 4, dtype=dtype)
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bce_with_logits(reduction, dtype):
    loss = nn.BCEWithLogitsLoss(reduction=reduction, pos_weight=torch.tensor([1.0, 3.0, 0.5], dtype=dtype))
    check_grad_batch(mlp(dtype), loss, torch.rand(4, 3, dtype=dtype), torch.randn(4, 4, dtype=dtype))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_outputs(reduction, dtype):
    """Outputs (N, T, C): cross-entropy over classes in dim 1 after a transpose, MSE over all."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.emb(x))).transpose(1, 2)  # (N, C, T)

    x = torch.randint(0, 6, (3, 5))
    check_grad_batch(Tagger().to(dtype), nn.CrossEntropyLoss(reduction=reduction), torch.randint(0, 3, (3, 5)), x)
    check_grad_batch(Tagger().to(dtype), nn.MSELoss(reduction=reduction), torch.randn(3, 3, 5, dtype=dtype), x)
