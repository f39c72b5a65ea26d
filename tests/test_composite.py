"""Small whole networks: CNNs, residual and concatenating graphs, nesting, shared and tied weights."""

import pytest
import torch
from reference import check_grad_batch, check_jacobian
from torch import nn


def small_cnn(dtype):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding="same", groups=2), nn.BatchNorm2d(6).eval(), nn.GELU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2).eval(), nn.Linear(24, 10),
    ).to(dtype)


@pytest.mark.parametrize("n", [1, 3])
def test_small_cnn(n, dtype):
    x = torch.randn(n, 1, 8, 8, dtype=dtype)
    check_jacobian(small_cnn(dtype), x)
    check_grad_batch(small_cnn(dtype), nn.CrossEntropyLoss(), torch.randint(0, 10, (n,)), x)


class Residual(nn.Module):
    """Residual additions, concatenation, views, indexing and in-place ops between modules."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(2, 3)})

    def forward(self, x):
        h = x
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        h.mul_(0.5)
        z = torch.cat([h, x.flip(1)], dim=1)
        return self.heads["a"](z) + self.heads["b"](z.view(z.shape[0], 4, 2)[:, 1])


def test_residual_graph(dtype):
    x = torch.randn(3, 4, dtype=dtype)
    check_jacobian(Residual().to(dtype), x)
    check_grad_batch(Residual().to(dtype), nn.MSELoss(), torch.randn(3, 3, dtype=dtype), x)


class Shared(nn.Module):
    """One module called twice, and an input embedding tied to the output layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h = self.emb(x)
        h = self.mix(torch.relu(self.mix(h)))
        return self.out(h)  # (N, T, vocab)


def test_shared_and_tied_weights(dtype):
    x = torch.randint(0, 6, (2, 3))
    check_jacobian(Shared().to(dtype), x)
    loss = lambda out, y: nn.functional.cross_entropy(out.transpose(1, 2), y)  # noqa: E731
    check_grad_batch(Shared().to(dtype), loss, torch.randint(0, 6, (2, 3)), x)


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Sequential(nn.Conv1d(2, 3, 3), nn.ELU()), nn.Flatten())
        self.head = nn.Linear(3 * 5, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def test_nested_containers_and_varying_batch_shapes(dtype):
    model = Deep().to(dtype)
    check_jacobian(model, torch.randn(2, 2, 7, dtype=dtype))
    check_jacobian(model, torch.randn(4, 2, 7, dtype=dtype))


class ResidualCNN(nn.Module):
    """Two residual blocks (convolutions, normalisations, in-place activations), a pooled head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1))
            for _ in range(2)
        )
        self.norm = nn.BatchNorm2d(4).eval()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(self.norm(h).mean((2, 3)))


def test_residual_cnn(dtype):
    x = torch.randn(3, 1, 6, 6, dtype=dtype)
    check_grad_batch(ResidualCNN().to(dtype), nn.CrossEntropyLoss(), torch.randint(0, 3, (3,)), x)


class LSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM -> projection tied to the embedding: logits (N, T, vocab)."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, width, num_layers=2, batch_first=True)
        self.out = nn.Linear(width, vocab)
        self.out.weight = self.emb.weight

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.out(h)


def test_lstm_language_model_with_tied_weights(dtype):
    x = torch.randint(0, 7, (2, 4))
    loss = lambda logits, y: nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())  # noqa: E731
    check_grad_batch(LSTMLanguageModel().to(dtype), loss, torch.randint(0, 7, (2, 4)), x)
