"""Models, data and the float64 oracle of the jacext.dp tests (imported by the test modules).

The oracle (``reference_steps``) is DP-SGD written out over per-sample gradients from autograd
loops (``reference.loop_grad_batch``, no jacext): clipping (flat, per layer, adaptive), noise
drawn in the optimizer's parameter order from a seeded generator, scaling, SGD.
"""

import copy
import math

import torch
from reference import loop_grad_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

F64 = torch.float64
N = 6  # samples per batch

# every test module builds a PrivacyEngine (Opacus's warning when secure_mode is off) and uses
# fixed batches (jacext's warning that the accounting assumes Poisson sampling)
FILTERS = [
    "ignore:Secure RNG turned off:UserWarning",
    "ignore:poisson_sampling=False with a data loader:UserWarning",
]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """Conv2d, GroupNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x):
        return self.net(x)


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        _, (h, _) = self.rnn(x)
        return self.head(h[-1])


class Transformer(nn.Module):
    """nn.TransformerEncoder (MultiheadAttention inside), mean over positions, Linear."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class Tied(nn.Module):
    """An embedding whose weight is also the output layer's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.out = nn.Linear(6, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens).mean(1)))


class Positions(nn.Module):
    """nanoGPT-style, with parameters meeting the batch outside their modules' calls: positions
    ``wpe(arange(T))`` (batch-free), a learnt class token concatenated, a loose gain computed
    from a parameter (``gain.exp()``), and a head tied functionally to the token embedding."""

    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(7, 6), nn.Embedding(N, 6)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.gain = nn.Parameter(torch.randn(6) / 2)
        self.fc = nn.Linear(6, 6)

    def forward(self, tokens):
        n, t = tokens.shape
        h = self.wte(tokens) + self.wpe(torch.arange(t, device=tokens.device))
        h = torch.cat([self.cls.expand(n, -1, -1), h], 1)
        h = torch.tanh(self.fc(h)) * self.gain.exp()
        return nn.functional.linear(h.mean(1), self.wte.weight)


MODELS = {"mlp": MLP, "cnn_groupnorm": CNN, "lstm": LSTMNet, "transformer": Transformer, "tied": Tied,
          "positions": Positions}
N_CLASSES = {"mlp": 3, "cnn_groupnorm": 3, "lstm": 3, "transformer": 3, "tied": 7, "positions": 7}


def inputs(name: str, n: int, g: torch.Generator):
    if name == "mlp":
        return torch.randn(n, 5, dtype=F64, generator=g) * 3
    if name == "cnn_groupnorm":
        return torch.randn(n, 1, 6, 6, dtype=F64, generator=g) * 3
    if name == "lstm":
        return torch.randn(n, 4, 4, dtype=F64, generator=g) * 3
    if name == "transformer":
        return torch.randn(n, 3, 8, dtype=F64, generator=g) * 3
    return torch.randint(0, 7, (n, N if name == "positions" else 4), generator=g)  # (positions: T = N)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(F64)


def dataset(name: str, n_batches: int = 2, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = inputs(name, N * n_batches, g)
    y = torch.randint(0, N_CLASSES[name], (N * n_batches,), generator=g)
    return TensorDataset(x, y)


def fixed_loader(data: TensorDataset, batch: int = N) -> DataLoader:
    """The batches in order (no sampling): what the oracle sees."""
    return DataLoader(data, batch_size=batch, shuffle=False)


def trainable(model):
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def per_sample_gradients(model, x, y, reduction):
    """{name: (N, *p)}: the gradients of the individual losses."""
    loss = nn.CrossEntropyLoss(reduction=reduction)
    grads = loop_grad_batch(model, loss, y, x)
    return {k: g * (x.shape[0] if reduction == "mean" else 1) for k, g in grads.items()}


def clip_factors(grads: dict, clipping: str, bound):
    """Per parameter, the per-sample factors min(1, C / (||g|| + 1e-6))."""
    if clipping == "per_layer":
        return {k: (bound[k] / (g.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0) for k, g in grads.items()}
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    w = (bound / (norms + 1e-6)).clamp(max=1.0)
    return {k: w for k in grads}


def median_bounds(model, x, y, clipping):
    """Bounds that clip about half the samples: the median per-sample norm (per parameter for
    per-layer clipping), so that the tests see clipped and unclipped samples."""
    grads = per_sample_gradients(model, x, y, "sum")
    if clipping == "per_layer":
        return {k: float(g.flatten(1).norm(dim=1).median()) for k, g in grads.items()}
    norms = torch.stack([g.flatten(1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    return float(norms.median())


ADAPTIVE = dict(
    target_unclipped_quantile=0.5, clipbound_learning_rate=0.5, max_clipbound=100.0, min_clipbound=1e-3,
    unclipped_num_std=1.0
)


def reference_steps(model, batches, *, clipping, bound, reduction, sigma, lr, seed, expected):
    """The oracle: parameters after one DP-SGD step per batch, and each step's clipped sums."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    params = trainable(model)
    sums, c = [], bound
    for x, y in batches:
        grads = per_sample_gradients(model, x, y, reduction)
        w = clip_factors(grads, clipping, c)
        clipped = {k: torch.einsum("n,n...->...", w[k], g) for k, g in grads.items()}
        sums.append(clipped)
        if clipping == "per_layer":
            c_noise = math.sqrt(sum(v * v for v in c.values()))
        else:
            c_noise = c
        s = sigma
        if clipping == "adaptive" and sigma > 0:
            s = (sigma**-2 - (2 * ADAPTIVE["unclipped_num_std"]) ** -2) ** -0.5
        new = {}
        for k, p in params:
            noise = torch.normal(mean=0, std=s * c_noise, size=p.shape, generator=gen, dtype=F64) if s * c_noise else 0
            g = clipped[k] + noise
            new[k] = g / expected if reduction == "mean" else g
        if clipping == "adaptive":
            first = next(iter(w.values()))
            count = (first >= 1).sum().to(F64)
            noisy = count + torch.normal(mean=0, std=ADAPTIVE["unclipped_num_std"], size=(), generator=gen, dtype=F64)
            frac = float(noisy) / expected
            c = c * math.exp(-ADAPTIVE["clipbound_learning_rate"] * (frac - ADAPTIVE["target_unclipped_quantile"]))
            c = min(max(c, ADAPTIVE["min_clipbound"]), ADAPTIVE["max_clipbound"])
        with torch.no_grad():
            for k, p in params:
                p -= lr * new[k]
    return {k: p.detach().clone() for k, p in params}, sums, c
