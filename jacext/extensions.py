"""jacext's BackPACK extensions, and the contract every one of them declares.

An extension says, as class attributes, what the engine must do for it:

* ``seeds``: which cotangents to pull back from the root output (:class:`Seeds`):
  ``COTANGENT``, the backward's own cotangent (one seed: gradients of the loss), or
  ``OUTPUTS``, one one-hot seed per output coordinate (Jacobians). Extensions with the same
  seeds share them.
* ``materialises``: whether it needs each parameter's per-sample contraction
  ``(N, V, *p.shape)``, or only its squared norms ``(N, V)`` (which norm rules compute
  without materialising).
* ``rescales``: whether it changes the cotangent the model's own backward continues with
  (:class:`RescalingExtension`: ClipGrad), from the results.
* ``chunk_size``: how many seeds to pull back at a time (None: all at once).

and how to turn the per-layer result into its attribute (:meth:`JacextExtension.finish`).
The work itself happens in :mod:`jacext.engine`, once for all active extensions. BackPACK's
own module hooks, where installed, find nothing to do for them.

Example, a new extension (one class, nothing else to change):

    >>> import torch
    >>> from jacext.extensions import JacextExtension, Seeds
    >>> class BatchGradNorm(JacextExtension):
    ...     '''Per-sample gradient norms ||g_n|| per parameter: ``p.grad_norm``, shape (N,).'''
    ...     savefield, seeds, materialises = "grad_norm", Seeds.COTANGENT, False
    ...     def finish(self, value, out_shape):
    ...         return value.squeeze(1).sqrt()
"""

import enum
from typing import Callable, Optional, Sequence, Set, Union

import torch
from backpack.extensions.backprop_extension import BackpropExtension
from torch import Tensor

from jacext.errors import JacextError


class Seeds(enum.Enum):
    """The cotangents an extension pulls back from the root output."""

    COTANGENT = "cotangent"  # the backward's own cotangent: one seed
    OUTPUTS = "outputs"  # one one-hot seed per output coordinate: C seeds

    def count(self, out_shape: torch.Size) -> int:
        """How many seeds V: 1, or C = ``prod(out_shape[1:])``."""
        return 1 if self is Seeds.COTANGENT else out_shape[1:].numel()

    def make(self, out_shape: torch.Size, grad_out: Tensor, a: int = 0, b: Optional[int] = None) -> Tensor:
        """Seeds a to b (default: all V) of this kind, ``(b - a, *out_shape)``; only these are
        allocated (seed v of OUTPUTS is one at coordinate v of every sample)."""
        b = self.count(out_shape) if b is None else b
        if self is Seeds.COTANGENT:
            return grad_out.unsqueeze(0)[a:b]
        n, c = out_shape[0], out_shape[1:].numel()
        one_hot = grad_out.new_zeros(b - a, n, c)
        one_hot.diagonal(offset=a, dim1=0, dim2=2).fill_(1)  # one_hot[v, :, a + v] = 1
        return one_hot.view(b - a, *out_shape)


class JacextExtension(BackpropExtension):
    """Base class: a BackPACK extension computed by jacext's engine, not by module hooks."""

    savefield: str
    seeds: Seeds
    materialises: bool = True
    rescales: bool = False
    chunk_size: Optional[int] = None

    def __init__(self):
        super().__init__(savefield=self.savefield, module_exts={})

    def __call__(self, module, g_inp, g_out) -> None:
        """BackPACK's per-module hook: nothing to do, the engine computes everything."""

    def expects_backpropagation_quantities(self) -> bool:
        return False

    @staticmethod
    def savefields() -> Set[str]:
        """The attributes of every jacext extension class defined so far."""
        found, todo = set(), list(JacextExtension.__subclasses__())
        while todo:
            cls = todo.pop()
            todo += cls.__subclasses__()
            if isinstance(vars(cls).get("savefield"), str):
                found.add(cls.savefield)
        return found

    def finish(self, value: Tensor, out_shape: torch.Size) -> Tensor:
        """Turn ``(N, V, *p.shape)`` (or ``(N, V)`` norms) into the stored attribute."""
        raise NotImplementedError

    def result_shape(self, p_shape: torch.Size, out_shape: torch.Size, v: int) -> torch.Size:
        """The stored attribute's shape, for a materialised result of ``v`` seeds."""
        return self.finish(torch.empty(out_shape[0], v, *p_shape, device="meta"), out_shape).shape

    def __repr__(self) -> str:
        return f"jacext.{type(self).__name__}()"


class RescalingExtension(JacextExtension):
    """An extension that rescales each sample's cotangent by a weight computed from its results
    (the squared norms of every parameter): the model's own backward then continues with
    ``w_n G[n]`` (or, inside the backward, each layer's parameter gradients are formed from it)."""

    seeds = Seeds.COTANGENT
    materialises = False
    rescales = True

    def weights(self, n: int, stored: Sequence[Tensor], like: Tensor) -> Tensor:
        """Per sample, the weight ``(N,)`` of its cotangent, from the finished results ``stored``."""
        raise NotImplementedError


class BatchJacobian(JacextExtension):
    """Per-sample Jacobian of the root module's output: ``p.jacobian``.

    Shape ``(N, *out.shape[1:], *p.shape)``; entry ``[n, c, ...]`` is ``d out[n, c] / d p``.
    For an output of shape ``(N,)`` it is ``(N, *p.shape)``.

    Args:
        chunk_size: pull the outputs back this many at a time (default: all C at once).
            Bounds the seeds and cotangents held during the backward (k N C seed entries and
            k x the model's activations for chunks of k; N times that where BatchNorm couples
            the samples, ``batchnorm="exact"``); the result itself is as large either way.
        output: which tensor of a structured output (tuple, dict, ``ModelOutput``) to
            differentiate: a key or an index (``output="logits"``), or a function of the output
            that returns one of its tensors. Default: its only tensor of shape (N, ...) with a
            gradient (an error lists them where there are several).

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> with backpack(jacext.BatchJacobian()):
        ...     model(torch.randn(5, 3)).sum().backward()
        >>> model.weight.jacobian.shape
        torch.Size([5, 2, 2, 3])
    """

    savefield = "jacobian"
    seeds = Seeds.OUTPUTS

    def __init__(self, chunk_size: Optional[int] = None, output: Union[str, int, Callable, None] = None):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if output is not None and not isinstance(output, (str, int)) and not callable(output):
            raise ValueError(f"output must be a key, an index or a function of the output, got {output!r}")
        self.chunk_size, self.output = chunk_size, output
        super().__init__()

    def select(self, output) -> Optional[Tensor]:
        """The tensor of a structured ``output`` that ``output=`` names (None: not named)."""
        if self.output is None:
            return None
        chosen = self.output(output) if callable(self.output) else output[self.output]
        if not isinstance(chosen, Tensor):
            raise JacextError(f"BatchJacobian(output={self.output!r}) selects a {type(chosen).__name__}, not a tensor")
        return chosen

    def finish(self, block: Tensor, out_shape: torch.Size) -> Tensor:
        return block.reshape(*out_shape, *block.shape[2:])


class BatchGrad(JacextExtension):
    """Per-sample gradients of the loss: ``p.grad_batch``, shape ``(N, *p.shape)``.

    Same semantics as BackPACK's BatchGrad: ``grad_batch[n]`` is the gradient of sample n's
    contribution to the loss, so for ``reduction="mean"`` it carries the factor 1/N and
    ``grad_batch.sum(0)`` equals ``p.grad`` for this backward.

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> with backpack(jacext.BatchGrad()):
        ...     model(torch.randn(5, 3)).square().mean().backward()
        >>> torch.allclose(model.weight.grad_batch.sum(0), model.weight.grad)
        True
    """

    savefield = "grad_batch"
    seeds = Seeds.COTANGENT

    def finish(self, block: Tensor, out_shape: torch.Size) -> Tensor:
        return block.squeeze(1)


class BatchL2Grad(JacextExtension):
    """Squared norms of the per-sample gradients: ``p.batch_l2``, shape ``(N,)``.

    BackPACK's semantics (``batch_l2[n] == grad_batch[n].square().sum()``). Where the layer has
    a norm rule (Linear, Conv, Embedding), computed from Gram matrices over positions without
    materialising per-sample gradients; otherwise from the layer's materialised result, one
    layer at a time.

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> with backpack(jacext.BatchL2Grad()):
        ...     model(torch.randn(5, 3)).square().sum().backward()
        >>> model.weight.batch_l2.shape
        torch.Size([5])
    """

    savefield = "batch_l2"
    seeds = Seeds.COTANGENT
    materialises = False

    def finish(self, value: Tensor, out_shape: torch.Size) -> Tensor:
        return value.squeeze(1)
