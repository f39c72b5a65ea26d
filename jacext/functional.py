"""``jacext.jacobian``: per-sample Jacobians without a backward pass of the user's own."""

from typing import Dict, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from jacext.engine.plan import PullBack
from jacext.extend import recorded
from jacext.extensions import BatchJacobian


def jacobian(model: nn.Module, x, *, flat: bool = False) -> Union[Dict[str, Tensor], Tensor]:
    """Per-sample Jacobians of ``model(x)`` with respect to its trainable parameters.

    Returns ``{name: J}`` with ``J`` of shape ``(N, *out.shape[1:], *p.shape)``, or with
    ``flat=True`` one matrix of shape ``(N, C, P)``, C = prod(out.shape[1:]), the
    parameters in ``model.parameters()`` order. ``model`` need not be extended; ``p.grad``
    is left untouched. ``x`` may be a tensor or a tuple of positional arguments.
    """
    args = x if isinstance(x, tuple) else (x,)
    with recorded(model, BatchJacobian(), args) as (out, tape):
        per_param = PullBack(tape, out.shape, out.detach()).results(get_gradient_edge(out))
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if flat:
        n, c = out.shape[0], out.shape[1:].numel()
        return torch.cat([per_param[p][0].reshape(n, c, p.numel()) for _, p in named], dim=2)
    return {name: per_param[p][0] for name, p in named}
