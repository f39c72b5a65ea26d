import pytest
import torch
from backpack import backpack
from reference import assert_close, check_jacobian, loop_jacobian, overall_scale
from torch import nn

import jacext

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


class Transposed(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


class Written(nn.Module):
    """BatchNorm3d in eval mode written out elementwise, on ``bn``'s parameters: the reference
    where torch's own backward is wrong (below)."""

    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        bn, shape = self.bn, (1, -1, 1, 1, 1)
        xhat = (x - bn.running_mean.view(shape)) / (bn.running_var.view(shape) + bn.eps).sqrt()
        return xhat * bn.weight.view(shape) + bn.bias.view(shape)


def test_batchnorm_eval_on_channels_last_compatible_strides(dtype):
    """The fuzzer's Conv3d -> transpose(1, 2) -> BatchNorm3d with H = W = 1: the transposed input
    (1, 2, 2, 1, 1) has strides (4, 1, 2, 1, 1), which also pass for channels_last_3d. torch
    2.14's CPU batch_norm backward then reads a contiguous cotangent as if it were channels last
    and returns a wrong weight gradient (so the autograd loop over BatchNorm3d is wrong, not
    jacext); jacext's rule is compared with the elementwise formula on the same parameters."""
    bn = evaluated(nn.BatchNorm3d(2), dtype)
    head = nn.Linear(4, 3).to(dtype)

    def model(norm):
        return nn.Sequential(Transposed(), norm, nn.Flatten(), head)

    x = torch.randn(1, 2, 2, 1, 1, dtype=dtype)
    expected = loop_jacobian(model(Written(bn)), x)
    net = jacext.extend(model(bn))
    with backpack(jacext.BatchJacobian()):
        net(x).sum().backward()
    scale = overall_scale(expected)
    for name, p in net.named_parameters():
        assert_close(p.jacobian, expected[name.replace("1.", "1.bn.", 1)], dtype, name, scale)

