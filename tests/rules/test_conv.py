from typing import Any

import pytest
import torch
from reference import check_jacobian
from torch import nn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: (9,), 2: (6, 7), 3: (5, 6, 5)}
CASES: dict[str, dict[str, Any]] = {
    "default": dict(),
    "stride": dict(stride=2),
    "padding": dict(padding=1),
    "same": dict(padding="same"),
    "same_even_kernel": dict(padding="same", kernel_size=4),
    "same_dilated": dict(padding="same", dilation=2),
    "valid": dict(padding="valid"),
    "reflect": dict(padding=2, padding_mode="reflect"),
    "replicate": dict(padding=1, padding_mode="replicate"),
    "circular": dict(padding=2, padding_mode="circular"),
    "same_reflect": dict(padding="same", kernel_size=4, padding_mode="reflect"),
    "dilation_stride": dict(dilation=2, stride=2),
    "groups": dict(groups=2),
    "depthwise": dict(groups=4, padding=1),
    "no_bias": dict(bias=False),
    "all": dict(stride=2, padding=1, dilation=2, groups=2, bias=False, padding_mode="replicate"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_conv(d, case, dtype):
    options = {"kernel_size": 3, **CASES[case]}
    model = CONV[d](4, 4, **options).to(dtype)
    n = 2 if d == 3 else 3
    check_jacobian(model, torch.randn(n, 4, *SIZE[d], dtype=dtype))


def test_conv_rectangular_kernel(dtype):
    model = nn.Conv2d(2, 3, kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0)).to(dtype)
    check_jacobian(model, torch.randn(1, 2, 7, 8, dtype=dtype))


@pytest.mark.parametrize("case", ["default", "all", "groups", "circular"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_conv_with_many_positions(d, case, dtype):
    """More than 256 output positions: J_W by the grouped convolution's weight gradient instead
    of unfolding (jacext.rules.conv), with every option."""
    from jacext.rules import conv as rule

    size = {1: (600,), 2: (40, 42), 3: (20, 20, 20)}[d]
    options = {"kernel_size": 3, **CASES[case]}
    conv = CONV[d](4, 4, **options)
    x = torch.randn(2, 4, *size, dtype=dtype)
    positions = conv(x.float())[0, 0].numel()
    assert positions > 256
    # a random linear head: every position gets its own cotangent, with few outputs for the loop
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * positions, 2)).to(dtype)
    calls = []
    original = rule._weight_jacobian_grouped
    rule._weight_jacobian_grouped = lambda *a: calls.append(1) or original(*a)
    try:
        check_jacobian(model, x)
    finally:
        rule._weight_jacobian_grouped = original
    assert calls
