"""The benchmark's workloads: a model, a batch and a loss, at full or quick size.

Every workload asks for one quantity of every parameter, as a list in
``model.parameters()`` order: per-sample gradients ``(N, *p.shape)`` of a
``CrossEntropyLoss(reduction="sum")`` ("grad"), or per-sample Jacobians
``(N, C, *p.shape)`` of the model output ("jacobian").
"""

from dataclasses import dataclass
from typing import Callable, Dict

import torch
from torch import Tensor, nn


@dataclass
class Case:
    """One built workload: model, inputs ``x``, targets ``y``, and the summed loss."""

    model: nn.Module
    x: Tensor
    y: Tensor
    loss: nn.Module
    quantity: str  # "grad" or "jacobian"

    def slice(self, n: int) -> "Case":
        """The same model and loss on the first ``n`` samples."""
        return Case(self.model, self.x[:n], self.y[:n], self.loss, self.quantity)


@dataclass(frozen=True)
class Workload:
    """A named model/batch recipe; ``build(quick)`` makes a reproducible :class:`Case`."""

    name: str
    title: str
    quantity: str
    make: Callable[[bool], Case]

    def build(self, quick: bool = False, seed: int = 0) -> Case:
        torch.manual_seed(seed)
        return self.make(quick)


class SequenceMean(nn.Module):
    """Mean over the sequence dimension: (N, T, D) -> (N, D)."""

    def forward(self, h: Tensor) -> Tensor:
        return h.mean(1)


def mlp(d_in: int, width: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
    )


def cnn(side: int, c1: int, c2: int, hidden: int, classes: int) -> nn.Sequential:
    pooled = (side - 4) // 2
    return nn.Sequential(
        nn.Conv2d(1, c1, 3),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * pooled * pooled, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )


def transformer(vocab: int, d: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Embedding(vocab, d),
        nn.LayerNorm(d),
        nn.Linear(d, hidden),
        nn.GELU(),
        nn.Linear(hidden, d),
        SequenceMean(),
        nn.Linear(d, classes),
    )


def _classification(model: nn.Module, x: Tensor, classes: int, quantity: str = "grad") -> Case:
    y = torch.randint(0, classes, (x.shape[0],))
    return Case(model, x, y, nn.CrossEntropyLoss(reduction="sum"), quantity)


def _mlp_grad(quick: bool) -> Case:
    d, w, b = (20, 16, 8) if quick else (784, 512, 256)
    return _classification(mlp(d, w, 10), torch.randn(b, d), 10)


def _cnn_grad(quick: bool) -> Case:
    side, c1, c2, h, b = (10, 4, 8, 16, 4) if quick else (28, 32, 64, 128, 128)
    return _classification(cnn(side, c1, c2, h, 10), torch.randn(b, 1, side, side), 10)


def _transformer_grad(quick: bool) -> Case:
    vocab, d, h, b, t = (50, 8, 16, 4, 5) if quick else (1000, 128, 512, 64, 64)
    return _classification(transformer(vocab, d, h, 10), torch.randint(0, vocab, (b, t)), 10)


def _mlp_jacobian(quick: bool) -> Case:
    d, w, b = (20, 16, 4) if quick else (784, 512, 32)
    return _classification(mlp(d, w, 10), torch.randn(b, d), 10, quantity="jacobian")


WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("mlp", "Per-sample gradients, MLP 784-512-512-10, B=256", "grad", _mlp_grad),
        Workload("cnn", "Per-sample gradients, CNN (2 conv, max-pool, 2 linear) on 28x28, B=128", "grad", _cnn_grad),
        Workload(
            "transformer",
            "Per-sample gradients, tiny transformer block (Embedding 1000x128, LayerNorm, MLP 128-512-128, mean, "
            "Linear 128-10), B=64, T=64",
            "grad",
            _transformer_grad,
        ),
        Workload("mlp-jacobian", "Per-sample Jacobians (C=10), MLP 784-512-512-10, B=32", "jacobian", _mlp_jacobian),
    ]
}
