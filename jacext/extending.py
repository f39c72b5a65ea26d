"""``jacext.extend`` / ``jacext.unextend``: the forward hooks that feed the engine.

Only forward hooks are installed (no module backward hooks), so in-place operations, modules
called several times and arbitrary code between modules keep working. ``backpack=True``
additionally applies ``backpack.extend`` for BackPACK's own extensions, with BackPACK's
restrictions. What jacext keeps on a module is one attribute (jacext.state), and a
``__prepare_scriptable__`` that makes ``torch.jit.script`` refuse it with a clear error.
"""

from contextlib import contextmanager
from typing import Iterator, Sequence, Tuple

import backpack as bp
import torch
from backpack import backpack as backpack_context
from torch import Tensor, nn

from jacext.engine import hooks
from jacext.engine.record import Tape
from jacext.errors import JacextError
from jacext.extensions import JacextExtension
from jacext.rules.batchnorm import CHOICES
from jacext.state import ATTRIBUTE, ensure_state, state_of


def extend(module: nn.Module, *, backpack: bool = False, batchnorm: str = "error") -> nn.Module:
    """Make ``module`` ready for jacext's extensions and return it.

    Installs forward hooks only (jacext.engine.hooks): on ``module`` itself, which opens and
    closes a tape per forward pass inside a ``backpack(...)`` block with a jacext extension,
    and on every submodule that owns parameters, which records its calls. Called again on
    the same module, it adds no second set of jacext hooks; the ``batchnorm`` given last applies.

    Args:
        module: the model; its output, of shape ``(N, ...)``, is what ``BatchJacobian``
            differentiates.
        backpack: also apply ``backpack.extend`` so that BackPACK's own extensions (DiagGGN,
            KFAC, ...) work in the same ``backpack`` context.
        batchnorm: what BatchNorm layers that normalise with batch statistics (train mode)
            do, since they make every output depend on the whole batch: ``"error"`` (raise),
            ``"eval"`` (use the running statistics in the forward passes jacext records; they
            are then not updated), ``"exact"`` (differentiate each sample's output through the
            batch statistics; N times the cost). It applies to subclasses of BatchNorm, to layers
            added after ``extend``, and to any forward calling ``F.batch_norm(..., training=True)``
            (there ``"eval"``, which has no layer to switch, raises).

    A module without parameters (a loss) needs nothing and is returned as it is, so that
    BackPACK's ``lossfunc = extend(lossfunc)`` works here too.

    Returns:
        ``module`` itself, with jacext's hooks.

    Raises:
        ValueError: ``batchnorm`` is none of the choices above.

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> model = jacext.extend(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)))
        >>> with backpack(jacext.BatchGrad()):
        ...     model(torch.randn(8, 4)).sum().backward()
        >>> model[0].weight.grad_batch.shape
        torch.Size([8, 3, 4])
    """
    if batchnorm not in CHOICES:
        raise ValueError(f"batchnorm must be one of {CHOICES}, got {batchnorm!r}")
    if next(module.parameters(), None) is None:
        return bp.extend(module) if backpack else module
    hooks.refuse_scripted(module)
    root = ensure_state(module)
    if backpack:
        bp.extend(module)
        root.backpack = True
    for name, m in module.named_modules():
        hooks.adopt(m, name or "<root>", {"batchnorm": batchnorm})
    if not root.root:
        root.root = True
        pre = module.register_forward_pre_hook(hooks.open_tape, with_kwargs=True)
        hooks.hook_recorders(module)
        post = module.register_forward_hook(hooks.close_tape, always_call=True)
        root.handles["root"] = (pre, post)
    return module


def unextend(module: nn.Module) -> nn.Module:
    """Remove every hook and attribute ``extend`` added (BackPACK's own hooks excepted).

    The results already stored on the parameters (``p.grad_batch``, ...) stay.

    Args:
        module: a module given to ``jacext.extend``.

    Returns:
        ``module`` itself, as it was before ``jacext.extend``.

    Example:
        >>> import torch, jacext
        >>> from jacext.extending import is_extended
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> is_extended(jacext.unextend(model))
        False
    """
    for m in module.modules():
        state = state_of(m)
        if state is not None:
            state.remove_hooks()
            del vars(m)[ATTRIBUTE]
            vars(m).pop(hooks.SCRIPTING, None)
    return module


def is_extended(module: nn.Module) -> bool:
    """Whether ``jacext.extend(module)`` was called (and not undone by ``jacext.unextend``).

    Args:
        module: any module.

    Returns:
        True for a module given to ``jacext.extend`` itself; False for other modules,
        including submodules of an extended one.

    Example:
        >>> import torch, jacext
        >>> from jacext.extending import is_extended
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
        >>> is_extended(model)
        False
        >>> is_extended(jacext.extend(model)), is_extended(model[0])
        (True, False)
    """
    return hooks.is_extended(module)


def backward_plan(module: nn.Module):
    """The plan the last backward pass of the extended ``module`` took (jacext.engine.plan).

    Which plan a backward takes follows from the active extensions and the model
    (``jacext.engine.plan.choose_plan``); every plan gives the same results, so this is for
    tests, benchmarks and curiosity.

    Args:
        module: a module given to ``jacext.extend``.

    Returns:
        ``"pull-back"``, ``"chunked pull-back"``, ``"inline"``, ``"inline, fused"`` or
        ``"inline, clipping"``; None before any backward pass with a jacext extension, and
        for a module that was not extended.

    Example:
        >>> import torch, jacext
        >>> from backpack import backpack
        >>> model = jacext.extend(torch.nn.Linear(3, 2))
        >>> with backpack(jacext.BatchJacobian()):
        ...     model(torch.randn(4, 3)).sum().backward()
        >>> jacext.backward_plan(model)
        'pull-back'
        >>> with backpack(jacext.BatchGrad()):
        ...     model(torch.randn(4, 3)).sum().backward()
        >>> jacext.backward_plan(model)
        'inline'
    """
    state = state_of(module)
    return state.plan if state is not None else None


@contextmanager
def temporarily_extended(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` extended for the duration, then exactly as before (modules the user extended
    stay extended, with their own paths). Internal: what ``jacext.jacobian`` and ``jacext.ntk``
    use on models that need not be extended.

    Args:
        module: any module.

    Yields:
        ``module``, extended inside the block.

    Example:
        >>> import torch
        >>> from jacext.extending import is_extended, temporarily_extended
        >>> model = torch.nn.Linear(3, 2)
        >>> with temporarily_extended(model):
        ...     print(is_extended(model))
        True
        >>> is_extended(model)
        False
    """
    if is_extended(module):
        yield module
        return
    before = {m: (state.copy() if (state := state_of(m)) is not None else None) for m in module.modules()}
    extend(module)
    try:
        yield module
    finally:
        for m in module.modules():
            state, old = state_of(m), before.get(m)
            if state is not None:
                state.remove_hooks(keep=tuple(old.handles) if old is not None else ())
            if old is None:
                vars(m).pop(ATTRIBUTE, None)
                vars(m).pop(hooks.SCRIPTING, None)
            else:
                vars(m)[ATTRIBUTE] = old


@contextmanager
def recorded(model: nn.Module, extension: JacextExtension, args: Sequence) -> Iterator[Tuple[Tensor, Tape]]:
    """One forward pass of ``model(*args)`` recorded for ``extension``, without a backward of the
    user's: ``(output, tape)``, for callers that compute the results themselves (jacext.jacobian,
    jacext.ntk). ``model`` need not be extended."""
    with temporarily_extended(model), torch.enable_grad(), backpack_context(extension), hooks.capturing() as tapes:
        out = model(*args)
        if not tapes or not isinstance(out, Tensor) or not out.requires_grad:
            raise JacextError("the model's output does not depend on any trainable parameter")
        yield out, tapes[-1]
