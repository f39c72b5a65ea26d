from typing import Any

import pytest
import torch
from reference import check_jacobian
from torch import nn

CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SIZE = {1: (5,), 2: (4, 3), 3: (3, 2, 3)}
CASES: dict[str, dict[str, Any]] = {
    "default": dict(),
    "stride": dict(stride=2),
    "padding": dict(padding=1),
    "output_padding": dict(stride=2, output_padding=1),
    "dilation": dict(dilation=2),
    "groups": dict(groups=2),
    "no_bias": dict(bias=False),
    "all": dict(stride=3, padding=2, output_padding=1, dilation=2, groups=2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("d", [1, 2, 3])
def test_conv_transpose(d, case, dtype):
    model = CONVT[d](4, 2, kernel_size=3, **CASES[case]).to(dtype)
    check_jacobian(model, torch.randn(2, 4, *SIZE[d], dtype=dtype))


class WithOutputSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 2, kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.up(x, output_size=[2 * x.shape[2], 2 * x.shape[3]])


def test_conv_transpose_output_size(dtype):
    check_jacobian(WithOutputSize().to(dtype), torch.randn(2, 3, 3, 4, dtype=dtype))
