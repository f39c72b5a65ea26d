"""The engine's own backward: every seed pulled back from the root output to every record at once.

For V seeds (the extensions' seeds stacked, :func:`seeds`), one batched
``torch.autograd.grad`` (``is_grads_batched``: vmap over the model's backward) gives the
cotangents G (V, N, *out) at every recorded output edge (:func:`cotangents`). With coupled
samples (BatchNorm on batch statistics, ``batchnorm="exact"``) every seed is restricted to one
sample at a time: N V seeds.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from jacext.engine.meets import Meet
from jacext.engine.memory import require_fits
from jacext.engine.record import Record, Tape
from jacext.errors import JacextError
from jacext.extensions import Seeds

Spans = Dict[Seeds, Tuple[int, int]]
PerRecord = List[Tuple[Union[Record, Meet], List[Optional[Tensor]]]]


def seeds(tape: Tape, out_shape, grad_out: Tensor) -> Tuple[Spans, Tensor]:
    """The seed ranges per kind, and the seeds ``(V, *out_shape)`` of all kinds stacked."""
    made = {kind: kind.make(out_shape, grad_out) for kind in tape.demand.seed_kinds()}
    spans, start = {}, 0
    for kind, s in made.items():
        spans[kind] = (start, start + s.shape[0])
        start += s.shape[0]
    stacked = torch.cat(list(made.values()))  # (V, N, ...)
    n = out_shape[0]
    if tape.coupled:  # seed (n, v) is seed v restricted to sample n: (N * V, N, ...)
        only = torch.eye(n, dtype=stacked.dtype, device=stacked.device).view(n, 1, n, *[1] * (len(out_shape) - 1))
        stacked = (stacked.unsqueeze(0) * only).flatten(0, 1)
    return spans, stacked


def cotangents(tape: Tape, out_edge: GradientEdge, seeds: Tensor, grad_out: Tensor) -> PerRecord:
    """Per record, its leaves' cotangents ``(V, *leaf)`` for ``seeds`` (zeros where a leaf did not
    reach the output; None where it does not require a gradient), after refusing G that cannot fit."""
    records = tape.records + tape.meets if seeds.shape[1] > 0 else []  # an empty batch: every result is empty
    per_seed = sum(shape.numel() for rec in records for shape in rec.out_shapes) * grad_out.element_size()
    require_fits(
        seeds.shape[0] * per_seed,
        grad_out.device,
        f"the cotangents of {seeds.shape[0]} seeds at every layer",
        "Pass chunk_size to BatchJacobian to pull the outputs back a few at a time, or use fewer outputs.",
    )
    grads = _pull_back(tape, out_edge, [e for rec in records for e in rec.edges], seeds)
    per_record, i = [], 0
    for rec in records:
        rec.check_unmodified()
        leaf_grads: List[Optional[Tensor]] = [None] * rec.n_leaves
        for leaf, g, shape in zip(rec.grad_leaves, grads[i : i + len(rec.edges)], rec.out_shapes, strict=True):
            leaf_grads[leaf] = g if g is not None else grad_out.new_zeros(seeds.shape[0], *shape)
        i += len(rec.edges)
        per_record.append((rec, leaf_grads))
    return per_record


def _pull_back(tape: Tape, out_edge, edges, seeds: Tensor) -> List[Optional[Tensor]]:
    """Cotangents (V, N, *out) at every edge for the V seeds, in one batched backward."""
    if not edges:
        return []
    with tape.pulling_back():
        if seeds.shape[0] == 1:
            grads = torch.autograd.grad(out_edge, edges, seeds[0], retain_graph=True, allow_unused=True)
            return [None if g is None else g.unsqueeze(0) for g in grads]
        try:
            return list(
                torch.autograd.grad(out_edge, edges, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True)
            )
        except RuntimeError as error:
            if "atching rule" not in str(error):
                raise
            raise JacextError(
                f"the batched pull-back of {seeds.shape[0]} seeds (vmap over the model's backward) met an "
                f"operation without a batching rule ({error}). This happens in backward graphs made by "
                "torch.compile: compute BatchJacobian on the uncompiled model (BatchGrad, BatchL2Grad "
                "and ClipGrad need one seed and work with compiled modules)."
            ) from error
