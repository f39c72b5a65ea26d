import pytest
import torch
from reference import check_grad_batch, check_jacobian
from torch import nn


def randomized(module, dtype):
    module = module.to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.LayerNorm(4), (3, 4)),
        (lambda: nn.LayerNorm(4), (2, 3, 4)),
        (lambda: nn.LayerNorm([3, 4], eps=1e-2), (2, 5, 3, 4)),
        (lambda: nn.LayerNorm(4, bias=False), (3, 2, 4)),
        (lambda: nn.RMSNorm(4), (3, 2, 4)),
        (lambda: nn.RMSNorm([2, 4], eps=1e-3), (3, 2, 4)),
        (lambda: nn.GroupNorm(2, 4), (3, 4)),
        (lambda: nn.GroupNorm(2, 4), (3, 4, 5)),
        (lambda: nn.GroupNorm(1, 4, eps=1e-2), (2, 4, 3, 3)),
        (lambda: nn.GroupNorm(4, 4), (2, 4, 2, 2, 2)),
        (lambda: nn.InstanceNorm1d(3, affine=True), (3, 3, 5)),
        (lambda: nn.InstanceNorm2d(3, affine=True), (2, 3, 3, 4)),
        (lambda: nn.InstanceNorm3d(2, affine=True), (2, 2, 2, 3, 2)),
        (lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (2, 3, 3, 4)),
    ],
    ids=lambda v: repr(v()) if callable(v) else str(v),
)
def test_normalisation(make, shape, dtype):
    check_jacobian(randomized(make(), dtype), torch.randn(*shape, dtype=dtype))


def test_instance_norm_with_running_stats_in_eval(dtype):
    norm = randomized(nn.InstanceNorm2d(3, affine=True, track_running_stats=True), dtype)
    norm(torch.randn(4, 3, 3, 3, dtype=dtype))  # update the running statistics
    check_jacobian(norm.eval(), torch.randn(2, 3, 3, 4, dtype=dtype))


def test_normalisations_in_a_cnn(dtype):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.PReLU(4), nn.Conv2d(4, 4, 1), nn.InstanceNorm2d(4, affine=True),
        nn.Flatten(), nn.LayerNorm(36), nn.Linear(36, 3),
    )
    x = torch.randn(3, 2, 5, 5, dtype=dtype)
    check_grad_batch(randomized(model, dtype), nn.CrossEntropyLoss(), torch.randint(0, 3, (3,)), x)
