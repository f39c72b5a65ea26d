"""Real models, built by their libraries from config objects with random weights (nothing downloaded).

BERT, GPT-2 and Llama (transformers), a ViT (timm) and ResNet-18 with GroupNorm (torchvision), in
float32 and train mode, called as their users call them: the transformers models directly on
``input_ids`` (their default position ids, no attention mask) and their ``ModelOutput`` handed to
the loss, which takes ``.logits``. Dropout is set to 0 in the configs so that every method
differentiates the same function. Each model has two workloads: per-sample gradients
(``"grad"``) and the DP step (``"dp-step"``), named ``<model>`` and ``<model>-dp-step``
(``resnet18``'s gradients are :mod:`~benchmarks.workloads`' own). The libraries are imported when
a workload is built. Importing this module adds its workloads (``ADDED``) to ``WORKLOADS``;
``REAL_MODELS`` lists the real models' workloads (``python -m benchmarks --workloads real-models``).
"""

from dataclasses import replace
from typing import Any, Callable, List

import torch
from torch import Tensor, nn

from benchmarks.workloads import WORKLOADS, Case, TokenCrossEntropy, Workload


class _OfLogits:
    """The loss of a transformers ``ModelOutput``'s ``.logits`` (``reduction`` as the base loss's)."""

    def forward(self, output: Any, target: Tensor) -> Tensor:
        return super().forward(output.logits, target)  # type: ignore[misc]


class SequenceClassificationLoss(_OfLogits, nn.CrossEntropyLoss):
    """Cross-entropy of the logits (N, C) of a ``...ForSequenceClassification`` model."""


class CausalLMLoss(_OfLogits, TokenCrossEntropy):
    """Next-token cross-entropy of the logits (N, T, V) of a ``...ForCausalLM`` model, summed per sample."""


VOCAB, VOCAB_QUICK = 1000, 50


def _text(hidden: int, heads: int, layers: int) -> dict:
    """Sizes of a transformers text model: width, heads, layers, MLP width (4 x width)."""
    return {"hidden": hidden, "heads": heads, "layers": layers, "mlp": 4 * hidden}


TEXT, TEXT_QUICK = _text(128, 4, 2), _text(16, 2, 1)


def _bert(quick: bool) -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    s, vocab, b, t = (TEXT_QUICK, VOCAB_QUICK, 3, 5) if quick else (TEXT, VOCAB, 16, 64)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["mlp"],
        max_position_embeddings=t,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config.num_labels = 10
    x, y = torch.randint(0, vocab, (b, t)), torch.randint(0, 10, (b,))
    return Case(BertForSequenceClassification(config), x, y, SequenceClassificationLoss(reduction="sum"), "grad")


def _next_tokens(model: nn.Module, vocab: int, b: int, t: int) -> Case:
    tokens = torch.randint(0, vocab, (b, t + 1))  # inputs and next-token targets
    return Case(model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), CausalLMLoss(), "grad")


def _gpt2(quick: bool) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    s, vocab, b, t = (TEXT_QUICK, VOCAB_QUICK, 3, 5) if quick else (TEXT, VOCAB, 16, 32)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=s["hidden"],
        n_layer=s["layers"],
        n_head=s["heads"],
        n_positions=t,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    return _next_tokens(GPT2LMHeadModel(config), vocab, b, t)  # the head is tied to the token embedding


def _llama(quick: bool) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    s, vocab, b, t = (TEXT_QUICK, VOCAB_QUICK, 3, 5) if quick else (TEXT, VOCAB, 16, 32)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=s["hidden"],
        intermediate_size=s["mlp"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"] // 2,  # grouped-query attention
        max_position_embeddings=t,
    )
    return _next_tokens(LlamaForCausalLM(config), vocab, b, t)


def _vit(quick: bool) -> Case:
    import timm

    side, width, depth, heads, b = (16, 16, 1, 2, 3) if quick else (32, 192, 4, 3, 16)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=side,
        patch_size=8,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_classes=10,
    )
    x, y = torch.randn(b, 3, side, side), torch.randint(0, 10, (b,))
    return Case(model, x, y, nn.CrossEntropyLoss(reduction="sum"), "grad")


def _dp_step(make: Callable[[bool], Case]) -> Callable[[bool], Case]:
    return lambda quick: replace(make(quick), quantity="dp-step")


BERT = "transformers BertForSequenceClassification (2 layers, hidden 128, 4 heads, vocab 1000, 10 classes), B=16, T=64"
GPT2 = "transformers GPT2LMHeadModel (2 layers, n_embd 128, 4 heads, vocab 1000, tied head), B=16, T=32"
LLAMA = (
    "transformers LlamaForCausalLM (2 layers, hidden 128, 4 heads, 2 key-value heads, MLP 512, vocab 1000), B=16, T=32"
)
VIT = "timm vit_tiny_patch16_224 at 32x32, patch 8, depth 4 (width 192, 3 heads, 10 classes), B=16"
RESNET = "torchvision ResNet-18 with GroupNorm on 32x32, B=16"
_MODELS = [("bert", BERT, _bert), ("gpt2", GPT2, _gpt2), ("llama", LLAMA, _llama), ("vit", VIT, _vit)]

ADDED: List[Workload] = [
    *[Workload(name, f"Per-sample gradients, {title}", "grad", make) for name, title, make in _MODELS],
    *[
        Workload(f"{name}-dp-step", f"DP step, {title}", "dp-step", _dp_step(make))
        for name, title, make in [*_MODELS, ("resnet18", RESNET, WORKLOADS["resnet18"].make)]
    ],
]
REAL_MODELS = [*[name for name, _, _ in _MODELS], "resnet18", *[w.name for w in ADDED if w.quantity == "dp-step"]]
WORKLOADS.update({w.name: w for w in ADDED})
