"""``jacext.jacobian``: per-sample Jacobians without a backward pass of the user's own."""

from typing import Dict, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from jacext.engine.plan import PullBack
from jacext.extending import recorded
from jacext.extensions import BatchJacobian


def jacobian(model: nn.Module, x, *, flat: bool = False) -> Union[Dict[str, Tensor], Tensor]:
    """Per-sample Jacobians of ``model(x)`` with respect to its trainable parameters.

    One forward pass and one batched pull-back (the ``"pull-back"`` plan of
    ``jacext.BatchJacobian``), without a backward pass of the caller's: ``model`` need not be
    extended, and ``p.grad`` and the parameters' attributes are left untouched.

    Args:
        model: the network; its output has the batch as first dimension.
        x: the input batch: a tensor, or a tuple of the model's positional arguments.
        flat: return one matrix instead of a dictionary.

    Returns:
        ``{name: J}`` for the trainable parameters, ``J`` of shape
        ``(N, *out.shape[1:], *p.shape)``; with ``flat=True`` one tensor of shape
        ``(N, C, P)``, C = prod(out.shape[1:]), the parameters in ``model.parameters()`` order.

    Example:
        >>> import torch, jacext
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> J = jacext.jacobian(model, torch.randn(5, 3))
        >>> {name: tuple(j.shape) for name, j in J.items()}
        {'0.weight': (5, 2, 4, 3), '0.bias': (5, 2, 4), '2.weight': (5, 2, 2, 4), '2.bias': (5, 2, 2)}
        >>> jacext.jacobian(model, torch.randn(5, 3), flat=True).shape
        torch.Size([5, 2, 26])
    """
    args = x if isinstance(x, tuple) else (x,)
    with recorded(model, BatchJacobian(), args) as (out, tape):
        per_param = PullBack(tape, out.shape, out.detach()).results(get_gradient_edge(out))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if flat:
        n, c = out.shape[0], out.shape[1:].numel()
        return torch.cat([per_param[p][0].reshape(n, c, p.numel()) for _, p in named], dim=2)
    return {name: per_param[p][0] for name, p in named}
