"""jacext.jacobian (jacext.functional): the flat layout, a model left as it was, a wrapper
around an extended model.
"""

import torch
from torch import nn

import jacext
from jacext.state import state_of


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_flat_jacobian_orders_parameters_like_model_parameters():
    model = mlp()
    x = torch.randn(4, 4)
    parts = jacext.jacobian(model, x)
    flat = jacext.jacobian(model, x, flat=True)
    assert flat.shape == (4, 3, sum(p.numel() for p in model.parameters()))
    assert torch.equal(flat, torch.cat([parts[n].reshape(4, 3, -1) for n, _ in model.named_parameters()], dim=2))


def test_jacobian_leaves_model_and_grads_untouched():
    model = mlp()
    jacext.jacobian(model, torch.randn(2, 4))
    assert all(p.grad is None and not hasattr(p, "jacobian") for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_jacobian_of_a_wrapper_keeps_the_inner_extension():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    inner = jacext.extend(mlp())
    hooks = [dict(m._forward_hooks) for m in inner.modules()]
    jacext.jacobian(Wrapper(inner), torch.randn(2, 4))
    assert [dict(m._forward_hooks) for m in inner.modules()] == hooks
    assert state_of(inner[0]).path == "0"
