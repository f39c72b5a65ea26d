"""Conv1d/2d/3d under BatchGrad: fused from 16 output positions per sample on (any stride,
dilation, groups, padding and padding_mode), loop-exact, also on an empty batch.
"""

import pytest
import torch
from backpack import backpack

import jacext

from .fused_nets import CONVS, EXTS, FUSED, ConvNet, assert_matches, ce_loss, expected, twins, watch


@pytest.mark.parametrize("exts", EXTS)
@pytest.mark.parametrize("conv", CONVS)
def test_conv_under_batch_grad_is_fused_from_16_positions(conv, exts, dtype, contractions):
    torch.manual_seed(0)
    make, shape = CONVS[conv]
    model, plain = twins(ConvNet(make(), shape), dtype)
    fused = model.positions >= 16
    assert fused == (conv != "conv1d_15")
    x, y = torch.randn(4, *shape, dtype=dtype), torch.randint(0, 3, (4,))
    per_sample, grads = expected(plain, ce_loss, y, x)
    seen = watch(model, "conv", "tail", "head")
    with backpack(*EXTS[exts]()):
        ce_loss(model(x), y).backward()
    conv_node = FUSED if fused else "ConvolutionBackward0"
    assert seen == {"conv": [conv_node], "tail": ["ConvolutionBackward0"], "head": ["AddmmBackward0"]}
    assert contractions == (["conv"] if fused else [])
    assert_matches(model, per_sample, grads, dtype, l2="L2" in exts)


def test_fused_conv_on_an_empty_batch():
    torch.manual_seed(0)
    make, shape = CONVS["conv2d"]
    model, _ = twins(ConvNet(make(), shape), torch.float64)
    x, y = torch.randn(0, *shape, dtype=torch.float64), torch.randint(0, 3, (0,))
    with backpack(jacext.BatchGrad()):
        ce_loss(model(x), y).backward()
    for p in model.parameters():
        assert p.grad_batch.shape == (0, *p.shape) and torch.equal(p.grad, torch.zeros_like(p))
