"""Parameter-free modules between parameterised ones: autograd carries the cotangents through them."""

import pytest
import torch
from reference import assert_close, check_jacobian, loop_jacobian
from torch import nn

import jacext

ACTIVATIONS = [
    nn.ReLU(), nn.ReLU(inplace=True), nn.LeakyReLU(0.1), nn.ELU(), nn.SELU(), nn.CELU(), nn.GELU(),
    nn.GELU(approximate="tanh"), nn.SiLU(), nn.Mish(), nn.Sigmoid(), nn.Tanh(), nn.Softplus(), nn.Softsign(),
    nn.Hardtanh(), nn.Hardswish(), nn.Hardsigmoid(), nn.ReLU6(), nn.LogSigmoid(), nn.Tanhshrink(),
    nn.Softmax(dim=-1), nn.LogSoftmax(dim=-1), nn.Dropout(0.3).eval(), nn.AlphaDropout(0.3).eval(), nn.Identity(),
]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: repr(m))
def test_activation_between_linears(act, dtype):
    model = nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3)).to(dtype)
    check_jacobian(model, torch.randn(3, 4, dtype=dtype))


def test_dropout_in_train_mode_uses_the_same_mask(dtype):
    """A train-mode Dropout is a fixed mask per forward pass: the Jacobian of that function."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 2)).to(dtype).train()
    torch.manual_seed(3)
    expected = loop_jacobian(model, torch.ones(3, 4, dtype=dtype))
    torch.manual_seed(3)
    got = jacext.jacobian(model, torch.ones(3, 4, dtype=dtype))
    for name in expected:
        assert_close(got[name], expected[name], dtype, name)


POOLS = {
    1: [nn.MaxPool1d(2), nn.MaxPool1d(3, stride=1, padding=1), nn.AvgPool1d(2),
        nn.AvgPool1d(3, padding=1, count_include_pad=False), nn.AdaptiveMaxPool1d(3), nn.AdaptiveAvgPool1d(2),
        nn.LPPool1d(2, 2)],
    2: [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True), nn.AvgPool2d(2),
        nn.AdaptiveMaxPool2d((2, 3)), nn.AdaptiveAvgPool2d(1), nn.LPPool2d(2, 2), nn.ZeroPad2d((1, 0, 2, 1)),
        nn.ReflectionPad2d(1), nn.ReplicationPad2d(1), nn.ConstantPad2d(1, 0.5), nn.CircularPad2d(1)],
    3: [nn.MaxPool3d(2), nn.AvgPool3d(2), nn.AdaptiveMaxPool3d(1), nn.AdaptiveAvgPool3d((1, 2, 1)),
        nn.ReflectionPad3d(1), nn.ReplicationPad3d(1), nn.ConstantPad3d(1, 0.0)],
}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: (8,), 2: (6, 6), 3: (4, 4, 4)}


@pytest.mark.parametrize("d,pool", [(d, p) for d in POOLS for p in POOLS[d]], ids=lambda v: repr(v))
def test_pooling_and_padding_between_conv_and_linear(d, pool, dtype):
    x = torch.randn(2, 2, *SIZE[d], dtype=dtype)
    body = nn.Sequential(CONV[d](2, 3, 3, padding=1), nn.Tanh(), pool, nn.Flatten())
    width = body.to(dtype)(x).shape[1]
    check_jacobian(nn.Sequential(body, nn.Linear(width, 2)).to(dtype), x)


def test_upsample_and_pixel_shuffle(dtype):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.PixelShuffle(2), nn.Upsample(scale_factor=2, mode="bilinear"),
        nn.Conv2d(1, 1, 3), nn.Flatten(), nn.Unflatten(1, (2, -1)),
    ).to(dtype)
    check_jacobian(model, torch.randn(2, 1, 3, 3, dtype=dtype))
