"""jacext's BackPACK extensions.

Each extension says which cotangent seeds it needs at the root output and how to
turn the per-layer rule's result ``(N, V, *param.shape)`` into its attribute.
The work itself happens in :mod:`jacext.tape`, once for all active extensions.
BackPACK's own module hooks, where installed, find nothing to do for them.
"""

from typing import List

import torch
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor


class JacextExtension(BackpropExtension):
    """Base class: a BackPACK extension computed by jacext's tape, not by module hooks."""

    savefield: str

    def __init__(self):
        super().__init__(savefield=self.savefield, module_exts={})

    def __call__(self, module, g_inp, g_out) -> None:
        """BackPACK's per-module hook: nothing to do, the tape computes everything."""

    def expects_backpropagation_quantities(self) -> bool:
        return False

    def seeds(self, out_shape: torch.Size, grad_out: Tensor) -> Tensor:
        """Cotangents ``(V, *out_shape)`` to pull back from the root output."""
        raise NotImplementedError

    def finish(self, block: Tensor, out_shape: torch.Size) -> Tensor:
        """Turn the rule result ``(N, V, *p.shape)`` into the stored attribute."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"jacext.{type(self).__name__}()"


class BatchJacobian(JacextExtension):
    """Per-sample Jacobian of the root module's output: ``p.jacobian``.

    Shape ``(N, *out.shape[1:], *p.shape)``; entry ``[n, c, ...]`` is
    ``d out[n, c] / d p``. For an output of shape ``(N,)`` it is ``(N, *p.shape)``.
    Needs every sample to be processed independently (the batch dimension is
    never mixed), which holds for every layer jacext supports.
    """

    savefield = "jacobian"

    def seeds(self, out_shape: torch.Size, grad_out: Tensor) -> Tensor:
        n, c = out_shape[0], out_shape[1:].numel()
        eye = torch.eye(c, dtype=grad_out.dtype, device=grad_out.device)
        return eye.unsqueeze(1).expand(c, n, c).reshape(c, *out_shape)

    def finish(self, block: Tensor, out_shape: torch.Size) -> Tensor:
        return block.reshape(*out_shape, *block.shape[2:])


class BatchGrad(JacextExtension):
    """Per-sample gradients of the loss: ``p.grad_batch``, shape ``(N, *p.shape)``.

    Same semantics as BackPACK's BatchGrad: ``grad_batch[n]`` is the gradient of
    sample n's contribution to the loss, so for ``reduction="mean"`` it carries
    the factor 1/N and ``grad_batch.sum(0)`` equals ``p.grad`` for this backward.
    """

    savefield = "grad_batch"

    def seeds(self, out_shape: torch.Size, grad_out: Tensor) -> Tensor:
        return grad_out.unsqueeze(0)

    def finish(self, block: Tensor, out_shape: torch.Size) -> Tensor:
        return block.squeeze(1)


def active(exts) -> List[JacextExtension]:
    """The jacext extensions among BackPACK's active extensions."""
    return [e for e in exts if isinstance(e, JacextExtension)]
