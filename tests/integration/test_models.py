"""Models written the way their libraries write them, tiny configs, random weights, float64:
per-sample gradients and norms against a loop of plain autograd over samples, with the batch
size equal to the sequence length (where a confused batch dimension hides)."""

import torch
import torch.nn.functional as F
from torch import nn

import jacext

from .common import assert_per_sample, per_sample_reference, run_extensions

N = T = 8
V = 40
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads = 2

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    """nanoGPT's way: positions from torch.arange, dropout on the embeddings, tied head."""

    def __init__(self, d=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList([Block(d), Block(d)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def token_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _check(model, forward, loss):
    ref = per_sample_reference(model, forward, loss, N)
    jacext.extend(model)
    run_extensions(model, lambda: loss(forward()))
    assert_per_sample(model, ref)
    assert_per_sample(model, ref, "batch_l2")
    for p in model.parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, rtol=1e-10, atol=1e-12)


def test_nanogpt():
    model = NanoGPT()
    idx, targets = torch.randint(0, V, (N, T)), torch.randint(0, V, (N, T))
    _check(model, lambda: model(idx), lambda out: token_loss(out, targets))


def test_folded_batch_linear():
    """``fc(x.flatten(0, 1)).view(N, T, -1)``: the rows are samples times positions."""

    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(5, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.fc(x.flatten(0, 1))).view(x.shape[0], x.shape[1], -1)
            return self.out(h).mean(1)

    model, x, y = Folded(), torch.randn(N, T, 5), torch.randint(0, 3, (N,))
    _check(model, lambda: model(x), lambda out: F.cross_entropy(out, y))


def test_seq_first_layer_in_batch_first_model():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1).mean(1))

    model, x, y = SeqFirst(), torch.randn(N, T, 8), torch.randint(0, 3, (N,))
    _check(model, lambda: model(x), lambda out: F.cross_entropy(out, y))


def test_parameter_under_two_names():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.decoder = nn.Linear(4, 4), nn.Linear(4, 3)
            self.bias = self.decoder.bias  # as RoBERTa's lm_head.bias

        def forward(self, x):
            return self.decoder(torch.tanh(self.dense(x)))

    model, x, y = nn.Sequential(nn.Linear(5, 4), Head()), torch.randn(N, 5), torch.randint(0, 3, (N,))
    _check(model, lambda: model(x), lambda out: F.cross_entropy(out, y))
