import pytest
import torch
from reference import check_jacobian
from torch import nn

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIZES: dict[int, list[tuple[int, ...]]] = {1: [(), (5,)], 2: [(3, 4)], 3: [(2, 3, 2)]}


def evaluated(bn, dtype):
    bn = bn.to(dtype).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


@pytest.mark.parametrize("d,size", [(d, s) for d in BN for s in SIZES[d]])
def test_batchnorm_eval(d, size, dtype):
    check_jacobian(evaluated(BN[d](3), dtype), torch.randn(4, 3, *size, dtype=dtype))


def test_batchnorm_eval_after_conv(dtype):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), evaluated(nn.BatchNorm2d(3, eps=1e-3), dtype), nn.ReLU()).to(dtype)
    check_jacobian(model, torch.randn(3, 2, 5, 5, dtype=dtype))
