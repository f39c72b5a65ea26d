"""HuggingFace transformers, timm and torchvision models as their libraries build them (tiny
configs, random weights, float64), extended as they are: per-sample gradients and norms
against a loop of plain autograd over samples, batch size equal to the sequence length."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jacext

from .common import assert_per_sample, check_causal_lm, per_sample_reference, run_extensions

transformers = pytest.importorskip("transformers")

N = T = 8
V = 40


def _check(model, forward, loss, jacext_loss=None):
    """``forward() -> (N, ...)`` and ``loss(out)`` for the loop; ``jacext_loss()`` (default
    ``loss(forward())``) is what the user backpropagates with the extensions on."""
    model.eval()  # dropout off: the loop and the extensions see the same function
    ref = per_sample_reference(model, forward, loss, N)
    jacext.extend(model)
    run_extensions(model, jacext_loss or (lambda: loss(forward())))
    assert_per_sample(model, ref)
    assert_per_sample(model, ref, "batch_l2")


def _hf(name, **config):
    cls_config, cls_model = name
    return cls_model(cls_config(**config))


SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=32, vocab_size=V)


def test_bert_model_output_and_labels():
    """Position ids (1, T) and token types expanded to (N, T) from buffers; ModelOutput; the
    loss computed inside the forward from ``labels=``."""
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3, **SMALL))
    x, y = torch.randint(0, V, (N, T)), torch.randint(0, 3, (N,))
    _check(model, lambda: model(input_ids=x).logits, lambda out: F.cross_entropy(out, y),
           lambda: model(input_ids=x, labels=y).loss)


@pytest.mark.parametrize("loss", ["labels", "outside"])
def test_gpt2_lm(loss):
    """Conv1D layers (jacext.rules.transformers_conv1d), wpe from (1, T) position ids, in train mode
    with dropout (seeded masks); ClipGrad too."""
    config = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).train()
    check_causal_lm(model, torch.randint(0, V, (N, T)), loss)


def test_t5_encoder_relative_bias():
    config = transformers.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5EncoderModel(config)
    x, y = torch.randint(0, V, (N, T)), torch.randn(N, T, 16)
    _check(model, lambda: model(input_ids=x).last_hidden_state, lambda out: F.mse_loss(out, y))


def test_roberta_masked_lm_shared_bias():
    """``lm_head.bias`` is ``lm_head.decoder.bias``; positions from the padding mask."""
    config = transformers.RobertaConfig(pad_token_id=1, **SMALL)
    model = transformers.RobertaForMaskedLM(config)
    x, y = torch.randint(2, V, (N, T)), torch.randint(0, V, (N, T))
    _check(model, lambda: model(input_ids=x).logits,
           lambda out: F.cross_entropy(out.reshape(-1, V), y.reshape(-1)))


def test_opt_folded_batch():
    """OPT runs fc1/fc2 on ``hidden.reshape(-1, D)``: N T rows."""
    config = transformers.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                    pad_token_id=1, bos_token_id=0, eos_token_id=0)
    model = transformers.OPTForCausalLM(config)
    x = torch.randint(2, V, (N, T))
    _check(model, lambda: model(input_ids=x, use_cache=False).logits,
           lambda out: F.cross_entropy(out.reshape(-1, V), x.reshape(-1)))


def test_timm_vit():
    """cls_token and pos_embed are the root's own parameters, differentiated where they meet the
    batch: ``cat`` with ``cls_token.expand(N, -1, -1)`` and ``x + pos_embed``."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16,
                              depth=2, num_heads=2, num_classes=3)
    x, y = torch.randn(N, 3, 16, 16), torch.randint(0, 3, (N,))
    _check(model, lambda: model(x), lambda out: F.cross_entropy(out, y))


def test_torchvision_resnet_groupnorm():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet18(num_classes=3, norm_layer=lambda c: nn.GroupNorm(2, c))
    x, y = torch.randn(N, 3, 16, 16), torch.randint(0, 3, (N,))
    _check(model, lambda: model(x), lambda out: F.cross_entropy(out, y))
