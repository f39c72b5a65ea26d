"""HuggingFace BART, Llama and ViT as transformers builds them (tiny configs, random weights,
float64), in train mode (dropout masks drawn the same way for the loop and for jacext:
common.seeded): the loss computed inside the forward from ``labels=`` and outside from the
logits, Llama also with ``gradient_checkpointing_enable()``. BatchGrad, BatchL2Grad and ClipGrad
(and BatchJacobian of ViT's logits) against the loops, batch size equal to the sequence length."""

import pytest
import torch
import torch.nn.functional as F

from .common import check_causal_lm, check_extensions

transformers = pytest.importorskip("transformers")

N = T = 8
V = 40
SMALL = dict(vocab_size=V, max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2)


def _token_loss(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _bart():
    config = transformers.BartConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                     dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                                     decoder_start_token_id=2, **SMALL)
    return transformers.BartForConditionalGeneration(config).train()


@pytest.mark.parametrize("loss", ["labels", "outside"])
def test_bart_seq2seq(loss):
    """Learned positions from (1, T) ids in the encoder and the decoder, decoder inputs shifted from
    the labels, final_logits_bias (a buffer), shared embeddings tied to the head."""
    model = _bart()
    x, y = torch.randint(3, V, (N, T)), torch.randint(3, V, (N, T))
    decoder_ids = transformers.models.bart.modeling_bart.shift_tokens_right(y, 1, 2)

    def forward():
        return model(input_ids=x, decoder_input_ids=decoder_ids).logits

    user = (lambda: model(input_ids=x, labels=y).loss) if loss == "labels" else None
    check_extensions(model, forward, lambda out: _token_loss(out, y), N, user_loss=user)


def _llama(**config):
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.1,
                                      **SMALL, **config)
    return transformers.LlamaForCausalLM(config).train()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")  # its new name is v5's only
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("loss", ["labels", "outside"])
def test_llama_causal_lm(loss, checkpointing):
    """RoPE from (1, T) position ids, RMSNorm (in float32), grouped-query attention, SwiGLU,
    attention dropout."""
    model = _llama()
    if checkpointing:
        model.gradient_checkpointing_enable()
    check_causal_lm(model, torch.randint(3, V, (N, T)), loss)


@pytest.mark.parametrize("train", [
    pytest.param(True, id="train"),
    pytest.param(False, id="eval"),
])
@pytest.mark.parametrize("loss", ["labels", "outside"])
def test_vit_image_classification(loss, train):
    """Patch embeddings, cls_token and position embeddings (ViTEmbeddings' own parameters), dropout."""
    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=0.1,
                                    attention_probs_dropout_prob=0.1, num_labels=3)
    model = transformers.ViTForImageClassification(config).train(train)
    x, y = torch.randn(N, 3, 8, 8), torch.randint(0, 3, (N,))
    user = (lambda: model(pixel_values=x, labels=y).loss) if loss == "labels" else None
    check_extensions(model, lambda: model(pixel_values=x).logits, lambda out: F.cross_entropy(out, y), N,
                     user_loss=user, jacobian=True)
