"""Results: every record's rule on its cotangents, gathered per parameter and extension.

A :class:`Results` accumulator takes one record at a time (:meth:`Results.add`): the layer's
norm rule for the seeds only norms are asked of (where it has one and the norms add up:
independent samples, parameters no other record reaches), its rule for the rest. Materialised
results go straight into their :class:`jacext.engine.memory.ResultSlot` where one extension
keeps them whole; :meth:`Results.finished` turns them into each extension's attribute.
"""

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from jacext.engine.apply import apply_rule
from jacext.engine.meets import Meet
from jacext.engine.memory import ResultSlot, require_fits, reusable
from jacext.engine.record import Record, Tape
from jacext.errors import JacextError
from jacext.extensions import JacextExtension, Seeds
from jacext.rules.util import sq_sums
from jacext.state import module_label

Spans = Dict[Seeds, Tuple[int, int]]  # each kind's range of seeds
PerParameter = Dict[nn.Parameter, Dict[Seeds, Tensor]]


class Results:
    """The per-parameter results of one backward, for seeds in ``spans``."""

    def __init__(
        self,
        tape: Tape,
        spans: Spans,
        out_shape,
        slots: Optional[Dict[tuple, ResultSlot]] = None,
        blocks_budget: int = 0,
    ):
        self.tape, self.spans, self.out_shape = tape, spans, out_shape
        # bytes of results that records may materialise instead of norms, where their layers' norm
        # rules are not cheaper (ClipGrad's inline plan clips them by their blocks: see plan.py)
        self.blocks_budget = blocks_budget
        if slots is None:
            slots = result_slots(tape, spans, out_shape)
            require_result_memory(tape, spans, out_shape, slots)
        self.slots = slots
        self.shared = tape.shared_parameters()
        self.blocks: PerParameter = {}  # (N, V_k, *p) per kind
        self.norms: PerParameter = {}  # (N, V_k) per kind, where not materialised

    def add(self, rec: Union[Record, Meet], leaf_grads: List[Optional[Tensor]]) -> None:
        """One record's contributions, for its leaves' cotangents ``(V, *leaf)``."""
        tape, spans = self.tape, self.spans
        if isinstance(rec, Meet):  # its parameters are shared: every kind is materialised, from every kind's seeds
            self.add_blocks(rec.per_sample(leaf_grads, self.out_shape[0]))
            return
        norm_rule = rec.layer.norms
        only_norms = [k for k in tape.demand.only_norms if k in spans]
        plain = rec.placement is None or rec.placement.plain
        by_norms = [] if tape.coupled or norm_rule is None or self.shared & rec.parameters or not plain else only_norms
        if by_norms and self.blocks_budget and self._materialises_instead(rec, leaf_grads):
            by_norms = []
        for kind in by_norms:
            for name, sq in apply_rule(rec, seed_slice(leaf_grads, [spans[kind]]), norm_rule).items():
                self._require_batch_first(rec, sq)
                _accumulate(self.norms, rec.named[name], kind, sq)
        materialised = [k for k in spans if k not in by_norms]
        if not materialised:
            return
        ranges = [spans[k] for k in materialised]
        selected = leaf_grads if len(materialised) == len(spans) else seed_slice(leaf_grads, ranges)
        contracted, rec.contracted = rec.contracted, None
        if contracted is None:
            contracted = apply_rule(rec, selected, into=self.destinations(rec, materialised))
        for name, block in contracted.items():
            if tape.coupled:  # sum over the samples m the seed reached: (N, V, *p)
                block = block.sum(0).unflatten(0, (self.out_shape[0], -1))
            self._require_batch_first(rec, block)
            parts = [block] if len(ranges) == 1 else block.split([b - a for a, b in ranges], dim=1)
            for kind, part in zip(materialised, parts, strict=True):
                _accumulate(self.blocks, rec.named[name], kind, part)

    def _materialises_instead(self, rec: Record, leaf_grads) -> bool:
        """Whether ``rec`` materialises its results instead of running its layer's norm rule:
        where the layer says that rule is not cheaper, within :attr:`blocks_budget`."""
        cheaper = rec.layer.norms_cheaper
        if cheaper is None or getattr(rec.module, "sparse", False) or cheaper(rec.module, rec.args, leaf_grads):
            return False
        v = sum(b - a for a, b in self.spans.values())
        nbytes = self.out_shape[0] * v * sum(p.numel() * p.element_size() for p in rec.named.values())
        if nbytes > self.blocks_budget:
            return False
        self.blocks_budget -= nbytes
        return True

    def add_blocks(self, blocks: Dict[nn.Parameter, Tensor]) -> None:
        """Per-sample contributions (N, V, *p) for all seeds, to be materialised."""
        kinds = list(self.spans)
        ranges = [self.spans[k] for k in kinds]
        for p, block in blocks.items():
            if self.tape.coupled:  # sum over the samples m the seed reached: (N, V, *p)
                block = block.sum(0).unflatten(0, (self.out_shape[0], -1))
            parts = [block] if len(ranges) == 1 else block.split([b - a for a, b in ranges], dim=1)
            for kind, part in zip(kinds, parts, strict=True):
                _accumulate(self.blocks, p, kind, part)

    def destinations(self, rec: Record, materialised: Sequence[Seeds]) -> Dict[str, ResultSlot]:
        """The result slots the record's rule may write into: where it materialises one kind,
        kept whole by one extension, for parameters no other record contributes to."""
        owner = self.tape.demand.owner(materialised[0]) if len(materialised) == 1 else None
        if not self.slots or owner is None or not (rec.placement is None or rec.placement.plain):
            return {}
        slots = self.slots
        return {n: slots[(p, owner)] for n, p in rec.named.items() if (p, owner) in slots and id(p) not in self.shared}

    def finished(self) -> Dict[nn.Parameter, list]:
        """Per trainable parameter, every extension's finished result (in the tape's order)."""
        return {
            p: [self._finish(ext, p) for ext in self.tape.extensions]
            for p in self.tape.parameters
            if p.requires_grad
        }

    def _finish(self, ext, p: nn.Parameter) -> Tensor:
        n, (a, b) = self.out_shape[0], self.spans[ext.seeds]
        block = self.blocks.get(p, {}).get(ext.seeds)
        slot = self.slots.get((p, ext))
        if slot is not None and slot.tensor is not None and block is not None and slot.holds(block):
            return slot.tensor  # the rule wrote the whole result into the slot (see destinations)
        if ext.materialises:
            if block is None:  # not used in this forward pass: its derivative is zero
                block = torch.zeros(n, b - a, *p.shape, dtype=p.dtype, device=p.device)
            return ext.finish(block, self.out_shape)
        sq = self.norms.get(p, {}).get(ext.seeds)
        if sq is None:
            if block is None:
                sq = p.new_zeros(n, b - a, dtype=p.real.dtype)
            else:  # clipping needs no BackPACK bit-for-bit semantics
                sq = squared_norms(block, bitwise=not ext.rescales)
        return ext.finish(sq, self.out_shape)

    def _require_batch_first(self, rec: Record, value: Tensor) -> None:
        """The output's first dimension must be the batch the layers saw, where the extensions
        index the output by sample (BatchJacobian's seeds, ClipGrad's rescaling)."""
        out_shape = self.out_shape
        if value.shape[0] == out_shape[0]:
            return
        if any(e.seeds is Seeds.OUTPUTS or e.rescales for e in self.tape.extensions):
            raise JacextError(
                f"the extended module's output has shape {tuple(out_shape)}, whose first dimension is not "
                f"the batch: module {module_label(rec.module)} saw {value.shape[0]} samples. Return the "
                "output per sample, as (N, ...) (no mean over, transposition or flattening of the batch "
                "dimension), and reduce it in the loss."
            )

    @contextmanager
    def written_safely(self):
        """If the block raises, no reused result a rule already wrote into stays as an attribute."""
        with dropped_if_half_written(self.slots):
            yield


def result_slots(tape: Tape, spans: Spans, out_shape) -> Dict[tuple, ResultSlot]:
    """Where each materialised result goes, by (parameter, extension); see jacext.engine.memory."""
    if tape.coupled:
        return {}
    slots = {}
    for p in tape.parameters:
        for ext in tape.extensions:
            if p.requires_grad and ext.materialises:
                a, b = spans[ext.seeds]
                shape = ext.result_shape(p.shape, out_shape, b - a)
                slots[(p, ext)] = ResultSlot(shape, p, reusable(p, ext.savefield, shape, p.dtype))
    return slots


def require_result_memory(tape: Tape, spans: Spans, out_shape, slots: Dict[tuple, ResultSlot]) -> None:
    """Refuse, before allocating, results that cannot fit in the memory left."""
    nbytes = sum(
        out_shape[0] * (spans[e.seeds][1] - spans[e.seeds][0]) * p.numel() * p.element_size()
        for p in tape.parameters
        for e in tape.extensions
        if p.requires_grad and e.materialises and (slots.get((p, e)) is None or slots[(p, e)].tensor is None)
    )
    if nbytes:
        names = ", ".join(sorted({type(e).__name__ for e in tape.extensions if e.materialises}))
        require_fits(
            nbytes,
            tape.parameters[0].device,
            f"the per-sample results of {names}",
            "Use a smaller batch, fewer outputs (a slice of the model's output), or per-sample "
            "norms only (BatchL2Grad, jacext.dp.ClipGrad), which are not materialised.",
        )


@contextmanager
def dropped_if_half_written(slots: Dict[tuple, ResultSlot]):
    """If the block raises, no reused result a rule already wrote into stays as an attribute."""
    try:
        yield
    except BaseException:
        for (p, ext), slot in slots.items():
            if slot.taken and vars(p).get(ext.savefield) is slot.tensor:
                del vars(p)[ext.savefield]
        raise


def assign(tape: Tape, results: Dict[nn.Parameter, list]) -> None:
    """Every parameter's results as its attributes; neither a frozen parameter nor another jacext
    extension's attribute keeps anything of an earlier batch."""
    others = JacextExtension.savefields() - {ext.savefield for ext in tape.extensions} - tape.foreign_fields
    for p in tape.parameters:
        for field in others:
            vars(p).pop(field, None)
        if p in results:
            for ext, value in zip(tape.extensions, results[p], strict=True):
                setattr(p, ext.savefield, value)
        else:
            for ext in tape.extensions:
                vars(p).pop(ext.savefield, None)


def seed_slice(grads, ranges) -> List[Optional[Tensor]]:
    """The cotangents of the seeds in the index ranges ``[(a1, b1), (a2, b2), ...]``."""
    if len(ranges) == 1:
        return [None if g is None else g[ranges[0][0] : ranges[0][1]] for g in grads]
    return [None if g is None else torch.cat([g[a:b] for a, b in ranges]) for g in grads]


def _accumulate(store: PerParameter, p: nn.Parameter, kind: Seeds, value: Tensor) -> None:
    per_kind = store.setdefault(p, {})
    per_kind[kind] = value if kind not in per_kind else per_kind[kind] + value


def squared_norms(block: Tensor, bitwise: bool = True) -> Tensor:
    """(N, V, *p.shape) -> (N, V): each block's sum of squared moduli (of the real and the
    imaginary parts of a complex parameter's): ``bitwise``, as ``grad_batch[n].square().sum()``
    gives it for a real one, bit for bit (BackPACK's semantics); else in one pass (:func:`sq_sums`)."""
    flat = block.reshape(*block.shape[:2], -1)
    if not bitwise:
        return sq_sums(flat, -1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).flatten(2)
    return flat.square().sum(-1)
