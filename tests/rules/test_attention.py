from typing import Any

import pytest
import torch
from common_models import Attend
from reference import check_grad_batch, check_jacobian
from torch import nn

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain": (dict(), dict()),
    "seq_first": (dict(batch_first=False), dict()),
    "kdim_vdim": (dict(kdim=2, vdim=2), dict(need_weights=False)),
    "bias_kv_zero_attn": (dict(add_bias_kv=True, add_zero_attn=True), dict()),
    "no_bias": (dict(bias=False), dict(average_attn_weights=False)),
    "key_padding_mask": (dict(), dict(key_padding_mask=torch.tensor([[False, False, True], [False, True, True]]))),
    "causal_mask": (dict(), dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(3), need_weights=False)),
    "per_sample_mask": (dict(num_heads=2), dict(attn_mask=torch.randn(2 * 2, 3, 3))),
}


@pytest.mark.parametrize("case", CASES)
def test_multihead_attention(case, dtype):
    options, call = CASES[case]
    options = {"embed_dim": 4, "num_heads": 1, "batch_first": True, **options}
    call = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in call.items()}
    model = Attend(nn.MultiheadAttention(**options), cross=case == "kdim_vdim", **call).to(dtype)
    check_jacobian(model, torch.randn(2, 3, 4, dtype=dtype))


def test_transformer_encoder_and_decoder(dtype):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True), 2)
            self.dec = nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0, batch_first=True, norm_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            memory = self.enc(self.emb(x))
            return self.head(self.dec(self.emb(x.flip(1)), memory).mean(1))

    x = torch.randint(0, 7, (3, 4))
    check_grad_batch(Tiny().to(dtype), nn.CrossEntropyLoss(), torch.randint(0, 3, (3,)), x)


def test_transformer(dtype):
    model = nn.Transformer(4, 2, 1, 1, 6, dropout=0.0, batch_first=True).to(dtype)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = model

        def forward(self, x):
            return self.t(x, x[:, :2]).flatten(1)

    check_jacobian(Wrap(), torch.randn(2, 3, 4, dtype=dtype))
