"""The engine's own backward: every seed pulled back from the root output to every record at once.

For V seeds (the extensions' seeds stacked, :func:`seeds`), one batched
``torch.autograd.grad`` (``is_grads_batched``: vmap over the model's backward) gives the
cotangents G (V, N, *out) at every recorded output edge (:func:`cotangents`). With coupled
samples (BatchNorm on batch statistics, ``batchnorm="exact"``) every seed is restricted to one
sample at a time: N V seeds. A chunked plan makes and pulls back a range of seeds at a time;
the memory estimate counts the seeds with their cotangents.
"""

from contextlib import contextmanager
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


def seed_spans(tape: Tape, out_shape) -> Spans:
    """Each kind's range of seeds, in the order of the extensions that need them (none allocated)."""
    spans, start = {}, 0
    for kind in tape.demand.seed_kinds():
        spans[kind] = (start, start + kind.count(out_shape))
        start = spans[kind][1]
    return spans


def seeds(tape: Tape, out_shape, grad_out: Tensor, a: int = 0, b: Optional[int] = None) -> Tuple[Spans, Tensor]:
    """The seed ranges per kind, and seeds a to b (default: all) of all kinds stacked,
    ``(b - a, *out_shape)`` (with coupled samples ``(N (b - a), *out_shape)``), after refusing
    seeds and cotangents that cannot fit. Only these seeds are allocated: a chunk's seeds are
    made when it is pulled back."""
    spans = seed_spans(tape, out_shape)
    b = max(end for _, end in spans.values()) if b is None else b
    n = out_shape[0]
    _require_fits(tape, out_shape, grad_out, (b - a) * (n if tape.coupled else 1))
    parts = [
        kind.make(out_shape, grad_out, max(s, a) - s, min(e, b) - s)
        for kind, (s, e) in spans.items()
        if max(s, a) < min(e, b)
    ]
    stacked = torch.cat(parts) if len(parts) > 1 else parts[0]  # (V, N, ...)
    if tape.coupled:  # seed (n, v) is seed v restricted to sample n: (N * V, N, ...)
        only = torch.eye(n, dtype=stacked.dtype, device=stacked.device).view(n, 1, n, *[1] * (len(out_shape) - 1))
        stacked = (stacked.unsqueeze(0) * only).flatten(0, 1)
    return spans, stacked


def _require_fits(tape: Tape, out_shape, grad_out: Tensor, v: int) -> None:
    """Refuse ``v`` seeds whose seeds and cotangents at every layer cannot fit, before making them."""
    records = tape.records + tape.meets if out_shape[0] > 0 else []  # an empty batch: every result is empty
    per_seed = out_shape.numel() + sum(shape.numel() for rec in records for shape in rec.out_shapes)
    chunk = tape.demand.chunk_size
    if tape.coupled:
        advice = (
            f"The samples are coupled (batchnorm='exact'): each seed is pulled back once per sample, "
            f"{out_shape[0]} x {'chunk_size' if chunk else 'the outputs'} at a time. Pass a smaller chunk_size to "
            "BatchJacobian, use fewer outputs or a smaller batch, or extend with batchnorm='eval'."
        )
    elif chunk is not None:
        advice = f"Pass a smaller chunk_size to BatchJacobian (now {chunk}), or use fewer outputs."
    else:
        advice = "Pass chunk_size to BatchJacobian to pull the outputs back a few at a time, or use fewer outputs."
    require_fits(
        v * per_seed * grad_out.element_size(),
        grad_out.device,
        f"the seeds and cotangents of {v} seeds at every layer",
        advice,
    )


def cotangents(tape: Tape, out_edge: GradientEdge, seeds: Tensor, grad_out: Tensor) -> PerRecord:
    """Per record, its leaves' cotangents ``(V, *leaf)`` for ``seeds`` (made by :func:`seeds`, which
    refused those that cannot fit): zeros where a leaf did not reach the output, None where it
    does not require a gradient."""
    records = tape.records + tape.meets if seeds.shape[1] > 0 else []  # an empty batch: every result is empty
    grads = _pull_back(tape, out_edge, [e for rec in records for e in rec.edges], seeds)
    per_record, i = [], 0
    for rec in records:
        rec.check_unmodified()
        leaf_grads: List[Optional[Tensor]] = [None] * rec.n_leaves
        got = grads[i : i + len(rec.edges)]
        for leaf, g, shape, dtype in zip(rec.grad_leaves, got, rec.out_shapes, rec.out_dtypes, strict=True):
            leaf_grads[leaf] = g if g is not None else grad_out.new_zeros(seeds.shape[0], *shape, dtype=dtype)
        i += len(rec.edges)
        per_record.append((rec, leaf_grads))
    return per_record


def _pull_back(tape: Tape, out_edge, edges, seeds: Tensor) -> List[Optional[Tensor]]:
    """Cotangents (V, N, *out) at every edge for the V seeds: in one batched backward (vmap over
    the seeds), or one backward per seed through graphs that torch.compile made (their compiled
    kernels take no batched tensors)."""
    if not edges:
        return []
    with tape.pulling_back(), _explained(seeds.shape[0]):
        if seeds.shape[0] == 1 or _compiled(out_edge.node):
            per_seed = [torch.autograd.grad(out_edge, edges, s, retain_graph=True, allow_unused=True) for s in seeds]
            return [None if gs[0] is None else torch.stack(gs) for gs in zip(*per_seed, strict=True)]
        return list(
            torch.autograd.grad(out_edge, edges, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True)
        )


@contextmanager
def _explained(v: int):
    """The pull-back's failures that have a remedy, as a JacextError that names it."""
    try:
        yield
    except RuntimeError as error:
        if "donated buffers" in str(error):
            raise JacextError(
                "the model's backward was compiled by torch.compile with donated buffers, which lets it run "
                "only once; jacext's pull-back runs it before the ordinary backward (retain_graph=True). Set "
                "torch._functorch.config.donated_buffer = False before the model is compiled."
            ) from error
        if "atching rule" in str(error):
            raise JacextError(
                f"the batched pull-back of {v} seeds (vmap over the model's backward) met an operation without "
                f"a batching rule ({error}). Pass chunk_size=1 to BatchJacobian: it pulls the outputs back one "
                "at a time, without vmap."
            ) from error
        raise


def _compiled(root) -> bool:
    """Whether the backward graph below ``root`` holds a node of a graph compiled by torch.compile
    (AOTAutograd's ``CompiledFunctionBackward``); walked once per graph (the answer is kept in
    the root node's metadata)."""
    known = root.metadata.get("jacext_compiled")
    if known is not None:
        return known
    seen, todo, found = set(), [root], False
    while todo and not found:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found = node.name().startswith("CompiledFunction")
        todo += [n for n, _ in node.next_functions]
    root.metadata["jacext_compiled"] = found
    return found
