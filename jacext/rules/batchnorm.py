"""BatchNorm1d/2d/3d: y = xhat * w + b, xhat = (x - mean) / sqrt(var + eps) per channel.

    J_w[n, v, c] = sum_s G[v, n, c, s] xhat[n, c, s],   J_b[n, v, c] = sum_s G[v, n, c, s]

In eval mode mean and var are the running statistics and samples are independent. In
train mode (or without running statistics) they are the batch's, so each output depends on
every sample and per-sample quantities need an explicit choice, ``jacext.extend(model,
batchnorm=...)``: ``"eval"`` runs BatchNorm on its running statistics in the forward passes
that jacext records (they are then not updated), ``"exact"`` differentiates each sample's
output through the batch statistics: the tape then seeds every sample separately (N times
the cost) and this rule's xhat uses the batch statistics. Without a choice jacext raises.

The choice applies by behaviour: to subclasses (this rule too where they keep BatchNorm's
forward), to layers added after ``extend``, and to any forward that calls
``F.batch_norm(..., training=True)`` on the batch (:func:`at_batch_statistics`).
"""

import sys
from types import FrameType
from typing import Optional

import torch.nn.functional as F
from torch import nn

from jacext.errors import JacextError
from jacext.rules import layer_of, register, register_policy
from jacext.rules.util import affine_jacobians, as_run, running_stats_xhat
from jacext.state import module_label, option

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CHOICES = ("error", "eval", "exact")


def uses_batch_statistics(module: nn.Module) -> bool:
    return module.training or module.running_mean is None


def _synchronised(module: nn.Module) -> bool:
    """A SyncBatchNorm whose statistics span processes: samples of other ranks are not in reach."""
    import torch.distributed as dist

    synchronising = isinstance(module, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()
    return synchronising and dist.get_world_size() > 1


def couples_samples(module: nn.Module) -> bool:
    """Whether this call of ``module`` makes samples depend on each other (and "exact" was chosen)."""
    return uses_batch_statistics(module) and option(module, "batchnorm") == "exact"


def require_choice(module: nn.Module) -> None:
    """Raise (as the forward records it, before any backward) if this call of a BatchNorm uses
    batch statistics and no usable choice was made ("eval" switches it to running statistics
    for the call)."""
    if not uses_batch_statistics(module):
        return
    choice = option(module, "batchnorm", "error")
    if choice == "eval" and module.running_mean is None:
        raise JacextError(
            f"BatchNorm {module_label(module)} has no running statistics "
            "(track_running_stats=False), so batchnorm='eval' cannot apply to it: it always normalises "
            "with the batch's statistics. Use jacext.extend(model, batchnorm='exact') for the Jacobian "
            "through them, or build the layer with track_running_stats=True."
        )
    if choice == "error" or (choice == "exact" and _synchronised(module)):
        raise JacextError(
            f"BatchNorm {module_label(module)} normalises with batch "
            "statistics (train mode or track_running_stats=False), so each sample's output depends on "
            "the whole batch. Choose: jacext.extend(model, batchnorm='eval') to run BatchNorm on its "
            "running statistics while jacext records, batchnorm='exact' for the Jacobian of each "
            "sample's output through the batch statistics (N times the cost; not for a SyncBatchNorm "
            "synchronised across processes), or module.eval()."
        )


def at_batch_statistics(tape, args, kwargs) -> None:
    """While ``tape`` records, an operation on the batch that normalises with its statistics
    (``F.batch_norm(..., training=True)``). Inside a layer with this policy (BatchNorm, its
    subclasses, timm's BatchNormAct2d) the policy has checked the choice before the call.
    Elsewhere (a forward that calls ``F.batch_norm`` itself) the choice of the module running it
    applies: "error" raises, "eval" has no layer to switch to running statistics and raises,
    "exact" couples the samples. With "exact", a running module that the generic rule will
    differentiate is refused: that rule runs its forward one sample at a time, on that sample's
    statistics alone."""
    training = kwargs.get("training", args[5] if len(args) > 5 else False)
    if not training:
        return
    module = _running_module()
    where = f"the forward of {module_label(module)}" if module is not None else "the extended model's forward"
    policed = module is not None and layer_of(module).policy is not None
    choice = option(module, "batchnorm") if module is not None else None
    choice = choice or option(tape.root, "batchnorm", "error")
    if not policed and choice != "exact":
        raise JacextError(
            f"F.batch_norm in {where} normalises with batch statistics (training=True), so each sample's "
            "output depends on the whole batch"
            + (
                "; batchnorm='eval' switches BatchNorm layers to their running statistics, but this call is "
                "no BatchNorm layer. "
                if choice == "eval"
                else ". "
            )
            + "Choose jacext.extend(model, batchnorm='exact') for the Jacobian of each sample's output through "
            "the batch statistics (N times the cost), or normalise with running statistics there "
            "(training=False, or an nn.BatchNorm layer with batchnorm='eval')."
        )
    generic = next((m for m in tape.uses.stack if layer_of(m).rule is None), None)
    if generic is not None:
        inside = "" if generic is module else f" inside module {module_label(generic)}"
        own = isinstance(generic, nn.modules.batchnorm._BatchNorm)
        raise JacextError(
            f"F.batch_norm in {where} normalises with batch statistics (batchnorm='exact'){inside}, and that "
            "module has no hand-written jacext rule: the generic rule differentiates it one sample at a time, "
            "on that sample's statistics alone, which is not exact. Use batchnorm='eval' (running statistics), "
            + ("keep BatchNorm's own forward (do not override it), " if own else "")
            + "or register a rule for its class with jacext.rules.register."
        )
    tape.coupled = True


def _running_module() -> Optional[nn.Module]:
    """The module whose forward (or a function it calls) is running: the innermost frame of a
    method of an ``nn.Module``."""
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        if "self" in frame.f_code.co_varnames:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module):
                return owner
        frame = frame.f_back
    return None


def recording_mode(module: nn.Module):
    """batchnorm="eval": normalise with the running statistics while a tape records."""
    return False if option(module, "batchnorm") == "eval" else None


register_policy(*BATCHNORMS, check=require_choice, couples=couples_samples, mode=recording_mode)


@register(*BATCHNORMS, min_dim=lambda m: 2, forward_ad=True)
def batchnorm(module, args, kwargs, grads):
    (g,) = grads
    x = as_run(args[0], g)
    require_choice(module)
    if uses_batch_statistics(module):  # batchnorm="exact"
        xhat = F.batch_norm(x, None, None, training=True, eps=module.eps)
    else:
        xhat = running_stats_xhat(module, x)
    return affine_jacobians(module, g, xhat, channel_dim=True)
