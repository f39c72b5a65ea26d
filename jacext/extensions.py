"""jacext's BackPACK extensions.

Each extension says which cotangent seeds it needs at the root output (its ``kind``:
extensions of one kind share seeds), and how to turn the per-layer result into its
attribute: the materialised contraction ``(N, V, *param.shape)``, or only its squared
norms ``(N, V)`` (``needs_block = False``), which norm rules compute without materialising.
The work itself happens in :mod:`jacext.tape`, once for all active extensions.
BackPACK's own module hooks, where installed, find nothing to do for them.
"""

from typing import Optional

import torch
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor


class JacextExtension(BackpropExtension):
    """Base class: a BackPACK extension computed by jacext's tape, not by module hooks."""

    savefield: str
    kind: str  # "outputs": one seed per output coordinate; "loss": the backward's cotangent
    needs_block = True

    def __init__(self):
        super().__init__(savefield=self.savefield, module_exts={})
        from jacext.extend import install_guard  # extend imports this module

        install_guard()

    def __call__(self, module, g_inp, g_out) -> None:
        """BackPACK's per-module hook: nothing to do, the tape computes everything."""

    def expects_backpropagation_quantities(self) -> bool:
        return False

    def seeds(self, out_shape: torch.Size, grad_out: Tensor) -> Tensor:
        """Cotangents ``(V, *out_shape)`` to pull back from the root output."""
        if self.kind == "loss":
            return grad_out.unsqueeze(0)
        n, c = out_shape[0], out_shape[1:].numel()
        eye = torch.eye(c, dtype=grad_out.dtype, device=grad_out.device)
        return eye.unsqueeze(1).expand(c, n, c).reshape(c, *out_shape)

    def finish(self, value: Tensor, out_shape: torch.Size) -> Tensor:
        """Turn ``(N, V, *p.shape)`` (or ``(N, V)`` norms) into the stored attribute."""
        raise NotImplementedError

    def result_shape(self, p_shape: torch.Size, out_shape: torch.Size, v: int) -> torch.Size:
        """The stored attribute's shape, for a materialised result (``needs_block``) of ``v`` seeds."""
        return self.finish(torch.empty(out_shape[0], v, *p_shape, device="meta"), out_shape).shape

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
    kind = "outputs"

    def __init__(self, chunk_size: Optional[int] = None):
        """``chunk_size``: pull the outputs back this many at a time (default: all C at once).
        Bounds the cotangents held during the backward (C x the model's activations without it);
        the result itself is as large either way."""
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size
        super().__init__()

    def finish(self, block: Tensor, out_shape: torch.Size) -> Tensor:
        return block.reshape(*out_shape, *block.shape[2:])


class BatchGrad(JacextExtension):
    """Per-sample gradients of the loss: ``p.grad_batch``, shape ``(N, *p.shape)``.

    Same semantics as BackPACK's BatchGrad: ``grad_batch[n]`` is the gradient of
    sample n's contribution to the loss, so for ``reduction="mean"`` it carries
    the factor 1/N and ``grad_batch.sum(0)`` equals ``p.grad`` for this backward.
    """

    savefield = "grad_batch"
    kind = "loss"

    def finish(self, block: Tensor, out_shape: torch.Size) -> Tensor:
        return block.squeeze(1)


class BatchL2Grad(JacextExtension):
    """Squared norms of the per-sample gradients: ``p.batch_l2``, shape ``(N,)``.

    BackPACK's semantics (``batch_l2[n] == grad_batch[n].square().sum()``). Where the layer has
    a norm rule (Linear, Conv, Embedding), computed from Gram matrices over positions without
    materialising per-sample gradients; otherwise from the layer's materialised result, one
    layer at a time.
    """

    savefield = "batch_l2"
    kind = "loss"
    needs_block = False

    def finish(self, value: Tensor, out_shape: torch.Size) -> Tensor:
        return value.squeeze(1)
