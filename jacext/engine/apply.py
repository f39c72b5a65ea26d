"""A record's rule on its cotangents: in the module's forward-time mode and autocast, on the
samples where its placement says they are (shared by the results and the meets)."""

from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch import Tensor, nn

from jacext.engine.memory import ResultSlot
from jacext.errors import JacextError
from jacext.rules.generic import batch_dims, generic
from jacext.rules.util import running_rule, writing_into
from jacext.state import module_label

if TYPE_CHECKING:
    from jacext.engine.record import Record


def apply_rule(rec: "Record", grads, rule=None, into: Optional[Dict[str, ResultSlot]] = None) -> Dict[str, Tensor]:
    """``rule`` (default: the module's hand-written rule, or the generic one), run in the
    module's forward-time mode, without autocast (rules that run the layer's forward again do it
    under its forward-time autocast: jacext.rules.util.replaying), with ``into`` the memory it
    may write its results into, on the samples where the record's placement says they are
    (jacext.engine.batch); results in the dtype of their parameter (a rule computes in the dtype
    its layer ran in); a failing generic rule raises an error that names the module."""
    rule = rule or rec.layer.rule or generic
    placement = rec.placement
    if placement is not None and placement.move:
        grads = [None if g is None else g.movedim(1 + d, 1) for g, d in zip(grads, placement.out_dims, strict=True)]
    training, rec.module.training = rec.module.training, rec.training
    try:  # results are not differentiable (as BackPACK's), also in a create_graph backward
        with torch.no_grad(), writing_into(into or {}), _dims_for(rule, placement), _attributes_kept(rule, rec.module):
            with running_rule(rec.device_type, rec.autocast):
                results = rule(rec.module, rec.args, rec.kwargs, grads)
        results = {k: v.to(rec.named[k].dtype) for k, v in results.items() if k in rec.named}  # (loose ones: meets)
    except JacextError:
        raise
    except Exception as error:
        if rule is not generic:
            raise
        raise JacextError(
            f"module {module_label(rec.module)} has no hand-written jacext rule, and the generic rule "
            f"(torch.func vjp of its forward, vmapped over samples) failed on it: {error}. Register a "
            "rule for its class with jacext.rules.register, freeze its parameters, or replace it."
        ) from error
    finally:
        rec.module.training = training
    if placement is None or placement.rows is None:
        return results
    rows, n = placement.rows, int(placement.rows.max()) + 1
    return {
        k: v.new_zeros(n, *v.shape[1:]).index_add_(0, rows.to(v.device), v) if v.shape[0] == rows.numel() else v
        for k, v in results.items()
    }


@contextmanager
def _attributes_kept(rule, module: nn.Module):
    """The generic rule runs the module's forward again: what that forward writes on its modules
    (``self.attn_map = ...``, a call counter) is put back as the forward pass left it. Side
    effects outside the modules (a print, a global list) happen again."""
    if rule is not generic:
        yield
        return
    saved = [(vars(m), dict(vars(m))) for m in module.modules()]
    try:
        yield
    finally:
        for attributes, before in saved:
            for name in [k for k in attributes if k not in before]:
                del attributes[name]
            attributes.update(before)


def _dims_for(rule, placement):
    """The generic rule's batch dimensions, from the placement."""
    if rule is not generic or placement is None:
        return nullcontext()
    return batch_dims(placement.in_dims, placement.out_dims)
