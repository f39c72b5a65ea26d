"""The benchmark's workloads: a model, a batch and a loss, at full or quick size.

Every workload asks for one quantity, which every method returns in a common layout
(its "standard" result, compared across methods):

- ``"grad"``: per-sample gradients of a ``CrossEntropyLoss(reduction="sum")``, a list in
  ``model.parameters()`` order of ``(N, *p.shape)`` tensors;
- ``"jacobian"``: per-sample Jacobians of the model output, ``(N, C, *p.shape)`` per parameter;
- ``"norms"``: per-sample total gradient norms of the summed loss (what DP-SGD clips by),
  ``[norms]`` with ``norms[n] = sqrt(sum_p ||d loss_n / d p||^2)`` of shape ``(N,)``;
- ``"ntk-full"``: the empirical NTK of the model output, ``[K]`` with ``K`` of shape
  ``(N, N, C, C)``, ``K[a, b, c, d] = sum_p J(x_a)[c, p] J(x_b)[d, p]``;
- ``"ntk-trace"``: its trace over the outputs, ``[sum_c K[:, :, c, c]]`` of shape ``(N, N)``;
- ``"dp-step"``: the gradient of a DP-SGD step without noise, the sum over the samples of their
  gradients clipped to norm ``CLIP_NORM`` (:mod:`~benchmarks.methods`), a list of ``p.shape`` tensors.

``Workload.build(device=...)`` builds the model and the batch on that device (CPU or CUDA).
"""

from dataclasses import dataclass, replace
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANTITIES = ("grad", "jacobian", "norms", "ntk-full", "ntk-trace", "dp-step")


@dataclass
class Case:
    """One built workload: model, inputs ``x``, targets ``y``, and the summed loss."""

    model: nn.Module
    x: Tensor
    y: Tensor
    loss: nn.Module
    quantity: str  # one of QUANTITIES

    def slice(self, n: int) -> "Case":
        """The same model and loss on the first ``n`` samples."""
        return Case(self.model, self.x[:n], self.y[:n], self.loss, self.quantity)


@dataclass(frozen=True)
class Workload:
    """A named model/batch recipe; ``build(quick, device=...)`` makes a reproducible :class:`Case`.
    ``on_cpu``: part of ``python -m benchmarks``'s default set (False: run by :mod:`benchmarks.gpu_check`)."""

    name: str
    title: str
    quantity: str
    make: Callable[[bool], Case]
    on_cpu: bool = True

    def build(self, quick: bool = False, seed: int = 0, device: str = "cpu") -> Case:
        torch.manual_seed(seed)
        with torch.device(device):
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


class EncoderClassifier(nn.Module):
    """Embedding, a batch-first ``nn.TransformerEncoder`` (MultiheadAttention, LayerNorm, ReLU MLP;
    no dropout: DP needs the attention's off), mean over the positions, Linear."""

    def __init__(self, vocab: int, d: int, heads: int, hidden: int, layers: int, classes: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embedding(tokens)).mean(1))


def _encoder_dp(quick: bool) -> Case:
    vocab, d, heads, hidden, b, t = (50, 8, 2, 16, 4, 5) if quick else (1000, 128, 4, 512, 64, 64)
    model = EncoderClassifier(vocab, d, heads, hidden, 2, 10)
    return _classification(model, torch.randint(0, vocab, (b, t)), 10, quantity="dp-step")


def _mlp_jacobian(quick: bool) -> Case:
    d, w, b = (20, 16, 4) if quick else (784, 512, 32)
    return _classification(mlp(d, w, 10), torch.randn(b, d), 10, quantity="jacobian")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm in place of BatchNorm, as DP training does (BatchNorm mixes the samples)."""
    return nn.GroupNorm(min(32, channels), channels)


def resnet18(classes: int) -> nn.Module:
    """torchvision's ResNet-18 with GroupNorm, random initialisation (nothing downloaded)."""
    from torchvision.models import resnet18 as tv_resnet18

    return tv_resnet18(weights=None, num_classes=classes, norm_layer=group_norm)


def tiny_resnet(classes: int, c1: int = 8, c2: int = 16) -> nn.Sequential:
    """A stem and two of torchvision's BasicBlocks (the second downsampling), GroupNorm, avg-pool, Linear."""
    from torchvision.models.resnet import BasicBlock

    down = nn.Sequential(nn.Conv2d(c1, c2, 1, stride=2, bias=False), group_norm(c2))
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1, bias=False),
        group_norm(c1),
        nn.ReLU(inplace=True),
        BasicBlock(c1, c1, norm_layer=group_norm),
        BasicBlock(c1, c2, stride=2, downsample=down, norm_layer=group_norm),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, classes),
    )


class LastStep(nn.Module):
    """The last hidden state ``h_n[-1]`` from a recurrent layer's ``(output, (h_n, c_n))``."""

    def forward(self, recurrent: Tuple[Tensor, Tuple[Tensor, Tensor]]) -> Tensor:
        return recurrent[1][0][-1]


def lstm(vocab: int, d: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Embedding(vocab, d), nn.LSTM(d, hidden, batch_first=True), LastStep(), nn.Linear(hidden, classes)
    )


def _resnet18_grad(quick: bool) -> Case:
    if quick:
        return _classification(tiny_resnet(10), torch.randn(3, 3, 8, 8), 10)
    return _classification(resnet18(10), torch.randn(16, 3, 32, 32), 10)


def _lstm_grad(quick: bool) -> Case:
    vocab, d, h, b, t = (50, 8, 8, 4, 5) if quick else (1000, 64, 128, 32, 32)
    return _classification(lstm(vocab, d, h, 10), torch.randint(0, vocab, (b, t)), 10)


class CausalSelfAttention(nn.Module):
    """GPT-2's attention: q, k, v from one Linear, causal ``scaled_dot_product_attention`` per head,
    an output Linear."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, h: Tensor) -> Tensor:
        n, t, d = h.shape
        q, k, v = self.qkv(h).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(n, t, d))


class DecoderBlock(nn.Module):
    """GPT-2's pre-LayerNorm block: ``h + attention(LN(h))``, then ``h + MLP(LN(h))`` (d -> 4d -> d, GELU)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(d), CausalSelfAttention(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attention(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class Decoder(nn.Module):
    """A GPT-2-style decoder: token and position Embeddings, ``layers`` blocks, a final LayerNorm
    and a Linear head to next-token logits (N, T, vocab), not tied to the token Embedding.

    The position ids (0 .. T-1 in every row) are computed from the token ids, so that they are
    per sample, as Opacus and jacext need them (jacext refuses ``arange(T).expand(N, -1)``).
    """

    def __init__(self, vocab: int, d: int, heads: int, layers: int, context: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*[DecoderBlock(d, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.ones_like(tokens).cumsum(1) - 1
        h = self.blocks(self.tokens(tokens) + self.positions(positions))
        return self.head(self.norm(h))


class TokenCrossEntropy(nn.Module):
    """Cross-entropy of logits (N, T, V) against tokens (N, T), summed over each sample's tokens:
    the total (``reduction="sum"``) or per sample (``"none"``, (N,), as Opacus's ghost clipping asks)."""

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        per_sample = per_token.view(target.shape).sum(1)
        return per_sample if self.reduction == "none" else per_sample.sum()


GPT2 = {"vocab": 50257, "d": 768, "heads": 12, "layers": 12, "context": 1024}  # GPT-2 small's sizes
GPT2_QUICK = {"vocab": 50, "d": 16, "heads": 2, "layers": 2, "context": 8}


def _gpt2_dp(quick: bool) -> Case:
    sizes, b, t = (GPT2_QUICK, 3, 6) if quick else (GPT2, 16, 256)
    tokens = torch.randint(0, sizes["vocab"], (b, t + 1))  # inputs and next-token targets
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return Case(Decoder(**sizes), x, y, TokenCrossEntropy(), "dp-step")


def _ntk(n: int, quantity: str) -> Callable[[bool], Case]:
    """The MLP 784-512-512-10 on ``n`` samples (quick: 20-16-16-10 on 6 or 16)."""

    def make(quick: bool) -> Case:
        d, w, b = (20, 16, max(6, n // 64)) if quick else (784, 512, n)
        return _classification(mlp(d, w, 10), torch.randn(b, d), 10, quantity=quantity)

    return make


def _as(quantity: str, make: Callable[[bool], Case]) -> Callable[[bool], Case]:
    """Another quantity of the same model and batch."""
    return lambda quick: replace(make(quick), quantity=quantity)


MLP = "MLP 784-512-512-10"
CNN = "CNN (2 conv, max-pool, 2 linear) on 28x28"
TRANSFORMER = "tiny transformer block (Embedding 1000x128, LayerNorm, MLP 128-512-128, mean, Linear 128-10)"

ENCODER = (
    "2-layer nn.TransformerEncoder classifier (Embedding 1000x128, d=128, 4 heads, MLP 512, "
    "no dropout, mean, Linear 128-10)"
)
DP_STEP = "DP step (clipped per-sample gradients summed, no noise)"

WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("mlp", f"Per-sample gradients, {MLP}, B=256", "grad", _mlp_grad),
        Workload("cnn", f"Per-sample gradients, {CNN}, B=128", "grad", _cnn_grad),
        Workload("transformer", f"Per-sample gradients, {TRANSFORMER}, B=64, T=64", "grad", _transformer_grad),
        Workload("mlp-jacobian", f"Per-sample Jacobians (C=10), {MLP}, B=32", "jacobian", _mlp_jacobian),
        Workload("mlp-norms", f"Per-sample gradient norms, {MLP}, B=256", "norms", _as("norms", _mlp_grad)),
        Workload("cnn-norms", f"Per-sample gradient norms, {CNN}, B=128", "norms", _as("norms", _cnn_grad)),
        Workload(
            "transformer-norms",
            f"Per-sample gradient norms, {TRANSFORMER}, B=64, T=64",
            "norms",
            _as("norms", _transformer_grad),
        ),
        Workload("mlp-dp", f"{DP_STEP}, {MLP}, B=256", "dp-step", _as("dp-step", _mlp_grad)),
        Workload("cnn-dp", f"{DP_STEP}, {CNN}, B=128", "dp-step", _as("dp-step", _cnn_grad)),
        Workload("encoder-dp", f"{DP_STEP}, {ENCODER}, B=64, T=64", "dp-step", _encoder_dp),
        Workload(
            "resnet18",
            "Per-sample gradients, ResNet-18 with GroupNorm (11.2 M parameters) on 32x32, B=16",
            "grad",
            _resnet18_grad,
        ),
        Workload(
            "lstm",
            "Per-sample gradients, Embedding 1000x64, LSTM 64-128, last hidden state, Linear 128-10, B=32, T=32",
            "grad",
            _lstm_grad,
        ),
        Workload("ntk-trace", f"NTK trace (N x N), {MLP}, N=128", "ntk-trace", _ntk(128, "ntk-trace")),
        Workload("ntk-full", f"Full NTK (N x N x C x C, C=10), {MLP}, N=128", "ntk-full", _ntk(128, "ntk-full")),
        Workload("ntk-trace-1024", f"NTK trace (N x N), {MLP}, N=1024", "ntk-trace", _ntk(1024, "ntk-trace")),
        Workload("ntk-full-1024", f"Full NTK (N x N x C x C, C=10), {MLP}, N=1024", "ntk-full", _ntk(1024, "ntk-full")),
        Workload(
            "gpt2-dp",
            "DP step (clipped per-sample gradients summed, no noise), GPT-2-small-sized decoder "
            "(12 layers, d=768, 12 heads, vocab 50257, untied head, 163 M parameters), B=16, T=256",
            "dp-step",
            _gpt2_dp,
            on_cpu=False,
        ),
    ]
}

import benchmarks.real_models  # noqa: E402, F401 (adds the real models to WORKLOADS; it builds on the above)
