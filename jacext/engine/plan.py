"""Plans: how one backward pass turns the records of a tape into results.

When the backward reaches the root output, :func:`choose_plan` picks one plan from what the
extensions demand (jacext.engine.demand), what the records are, and what this backward will
run; the plan then owns the rest of that backward:

* :class:`PullBack`: there and then, one batched pull-back of every seed to every record
  (jacext.engine.pullback), the rules, the results; the ordinary backward continues (with the
  cotangent rescaled per sample, for ClipGrad).
* :class:`ChunkedPullBack`: the same, ``chunk_size`` seeds at a time (BatchJacobian), each chunk's
  seeds made when it runs.
* :class:`Inline`: one seed, the backward's own cotangent, unchanged (BatchGrad, BatchL2Grad):
  hooks on the records' nodes catch G as the ordinary backward passes; the rules run in a
  callback at its end.
* :class:`InlineFused`: inline, with fused calls (jacext.engine.fused) whose nodes run the
  rule on the G they receive and give the parameter gradients from its results.
* :class:`InlineClipping`: ClipGrad where every call is fused and every meet held: the nodes
  hold the parameter gradients back, the :class:`jacext.engine.fused.HeldFree` nodes the meets'
  summed cotangents, and the :class:`jacext.engine.fused.ClipGate`, which autograd runs after
  all of them, computes the norms, the weights and the clipped sums in one backward pass.

The plan of the last backward of an extended model is ``jacext.backward_plan(model)``.
"""

from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from jacext.engine import backpack_ctx
from jacext.engine.apply import apply_rule
from jacext.engine.fused import FusedMode, call_of
from jacext.engine.penalty import keep_pulled, penalty_blocks
from jacext.engine.pullback import PerRecord, Spans, cotangents, seed_spans, seeds
from jacext.engine.record import Record, Tape
from jacext.engine.results import Results, assign, dropped_if_half_written
from jacext.extensions import Seeds

ONE_SEED: Spans = {Seeds.COTANGENT: (0, 1)}
# bytes of per-sample results ClipGrad's inline plan may materialise where that beats a layer's
# norm rule (the clipped sum then costs N |p| multiply-adds instead of the layer's gradient again)
BLOCKS_BUDGET = 256 * 2**20


class Plan:
    """One backward's way from the root output's cotangent to the results.

    ``name`` (public): which plan it is, as ``jacext.backward_plan`` reports it."""

    name = "?"
    takes_penalties = False  # adds a gradient penalty's terms (jacext.engine.penalty) to its results

    def __init__(self, tape: Tape, out_shape: torch.Size, grad_out: Tensor):
        self.tape, self.out_shape, self.grad_out = tape, out_shape, grad_out

    def at_root(self, out_edge: GradientEdge) -> Optional[Tensor]:
        """As the backward reaches the root output: the cotangent it continues with (None: unchanged)."""
        raise NotImplementedError

    def fused_mode(self, g: Tensor) -> FusedMode:
        """What a fused node returns for its cotangent ``g``."""
        return FusedMode.ORDINARY

    def contract_now(self, rec: Record, g: Tensor) -> Dict[str, Tensor]:
        """A fused node's rule on its cotangent (plans whose :meth:`fused_mode` says CONTRACT)."""
        raise NotImplementedError

    def gate(self, grads: Tuple) -> Tuple:
        """The parameter gradients the ClipGate hands on."""
        return grads

    def holds(self) -> bool:
        """Whether a :class:`jacext.engine.fused.HeldFree` node stops its cotangent."""
        return False


class PullBack(Plan):
    name = "pull-back"

    def cotangents(self, out_edge: GradientEdge) -> Tuple[Spans, PerRecord]:
        """Every extension's seeds pulled back to the records: the seed ranges per kind and, per
        record, its leaves' cotangents ``(V, *leaf)`` (N V seeds with coupled samples)."""
        spans, stacked = seeds(self.tape, self.out_shape, self.grad_out)
        with backpack_ctx.paused():
            return spans, cotangents(self.tape, out_edge, stacked, self.grad_out)

    def results(self, out_edge: GradientEdge) -> Dict[nn.Parameter, list]:
        """Per parameter, one result per extension (in the tape's order)."""
        spans, stacked = seeds(self.tape, self.out_shape, self.grad_out)
        with backpack_ctx.paused():
            per_record = cotangents(self.tape, out_edge, stacked, self.grad_out)
            results = Results(self.tape, spans, self.out_shape)
            keep = self.tape.tapping and torch.is_grad_enabled()  # create_graph=True: a penalty may follow
            with results.written_safely():
                for rec, leaf_grads in per_record:
                    if keep and isinstance(rec, Record):
                        keep_pulled(rec, leaf_grads)
                    results.add(rec, leaf_grads)
            return results.finished()

    def at_root(self, out_edge: GradientEdge) -> Optional[Tensor]:
        tape = self.tape
        try:
            results = self.results(out_edge)  # raising here, it leaves p.grad as it was, and no result
        except BaseException:
            tape.drop_results()
            raise
        finally:
            tape.plan = None  # the rest of the backward is the ordinary one
        assign(tape, results)
        rescaler = tape.demand.rescaler
        if rescaler is None:
            return None
        i = tape.extensions.index(rescaler)
        n = self.grad_out.shape[0]
        tape.input_weights = rescaler.weights(n, [values[i] for values in results.values()], self.grad_out)
        return self.grad_out * tape.input_weights.view(n, *[1] * (self.grad_out.dim() - 1)).to(self.grad_out.dtype)


class ChunkedPullBack(PullBack):
    """:class:`PullBack`, ``chunk_size`` seeds at a time: the cotangents held at once are those of
    ``chunk`` seeds; the results are written into place chunk by chunk."""

    name = "chunked pull-back"

    def results(self, out_edge: GradientEdge) -> Dict[nn.Parameter, list]:
        tape, chunk = self.tape, self.tape.demand.chunk_size
        assert chunk is not None
        spans = seed_spans(tape, self.out_shape)
        total = max(e for _, e in spans.values())
        with backpack_ctx.paused():
            whole = Results(tape, spans, self.out_shape)
            with whole.written_safely():
                for a in range(0, total, chunk):
                    b = min(a + chunk, total)
                    part = {k: (max(s, a) - a, min(e, b) - a) for k, (s, e) in spans.items() if max(s, a) < min(e, b)}
                    results = Results(tape, part, self.out_shape, slots={})
                    stacked = seeds(tape, self.out_shape, self.grad_out, a, b)[1]  # this chunk's seeds only
                    for rec, leaf_grads in cotangents(tape, out_edge, stacked, self.grad_out):
                        results.add(rec, leaf_grads)
                    self._write(whole, results, a)
            return whole.finished()

    def _write(self, whole: Results, part: Results, a: int) -> None:
        """A chunk's results (seeds from ``a`` on) into their place in ``whole`` (allocated in
        the slots where there is one)."""
        n = self.out_shape[0]
        for store, into, is_block in ((part.blocks, whole.blocks, True), (part.norms, whole.norms, False)):
            for p, per_kind in store.items():
                for kind, value in per_kind.items():
                    start, end = whole.spans[kind]
                    if kind not in into.get(p, {}):
                        owner = self.tape.demand.owner(kind) if is_block else None
                        slot = whole.slots.get((p, owner)) if owner is not None else None
                        shape = (n, end - start, *value.shape[2:])
                        into.setdefault(p, {})[kind] = slot.take(shape) if slot else value.new_empty(shape)
                    offset = max(start, a) - start
                    into[p][kind][:, offset : offset + value.shape[1]] = value


class Inline(Plan):
    name = "inline"
    blocks_budget = 0  # see Results
    takes_penalties = True

    def __init__(self, tape: Tape, out_shape: torch.Size, grad_out: Tensor):
        super().__init__(tape, out_shape, grad_out)
        self.results: Optional[Results] = None  # made when the backward starts, where rules run during it
        self.finished: Optional[Dict[nn.Parameter, list]] = None  # results computed inside the backward
        self.blocks: Dict[nn.Parameter, Tensor] = {}  # the materialised results (N, 1, *p), from from_caught

    def at_root(self, out_edge: GradientEdge) -> Optional[Tensor]:
        self.start()
        return None

    def start(self) -> None:
        """Arm the records' and meets' hooks and queue :meth:`at_end` (also where a gradient
        penalty's backward does not pass through the root output: jacext.engine.hooks)."""
        for rec in self.tape.records:
            rec.check_unmodified()
            rec.caught = [None] * len(rec.edges)
        for meet in self.tape.meets:
            meet.caught = {}  # armed: the meet's hook computes its contributions as the backward passes
        self.prepare()
        torch.autograd.Variable._execution_engine.queue_callback(self.at_end)  # type: ignore[attr-defined]

    def prepare(self) -> None:
        """Before the ordinary backward goes on."""

    def at_end(self) -> None:
        """At the end of the ordinary backward: the results from the caught G (or those computed
        inside the backward already), as the parameters' attributes."""
        with self.cleared_on_error():
            results = self.finished if self.finished is not None else self.from_caught()[0]
        assign(self.tape, results)

    @contextmanager
    def cleared_on_error(self):
        """If the block raises (after the model's backward has filled p.grad, or in the middle of
        it), no parameter keeps a result of an earlier batch for these extensions."""
        try:
            yield
        except BaseException:
            self.tape.drop_results()
            raise
        finally:
            self.tape.plan = None

    def from_caught(self) -> Tuple[Dict[nn.Parameter, list], Dict[Record, List[Tensor]]]:
        """The results from the caught G, and the caught G per record (zeros where none came);
        the materialised ones, per parameter, are kept in ``self.blocks`` (N, 1, *p)."""
        tape, grad_out = self.tape, self.grad_out
        caught: Dict[Record, List[Tensor]] = {}
        for rec in tape.records:
            got, rec.caught = rec.caught or [], None
            caught[rec] = [
                c if c is not None else grad_out.new_zeros(s, dtype=d)
                for c, s, d in zip(got, rec.out_shapes, rec.out_dtypes, strict=True)
            ]
        with backpack_ctx.paused():
            results = self.results or Results(tape, ONE_SEED, self.out_shape, blocks_budget=self.blocks_budget)
            with results.written_safely():
                for rec in tape.records if self.out_shape[0] > 0 else []:
                    leaf_grads: List[Optional[Tensor]] = [None] * rec.n_leaves
                    for leaf, g in zip(rec.grad_leaves, caught[rec], strict=True):
                        leaf_grads[leaf] = g.unsqueeze(0)
                    results.add(rec, leaf_grads)
                for meet in tape.meets:
                    blocks, meet.caught = meet.caught or {}, None
                    results.add_blocks(blocks)
                if self.takes_penalties:
                    results.add_blocks(penalty_blocks(tape, torch._C._current_graph_task_id()))
            self.blocks = {p: kinds[Seeds.COTANGENT] for p, kinds in results.blocks.items() if Seeds.COTANGENT in kinds}
            return results.finished(), caught


class InlineFused(Inline):
    """The result slots are made (and refused if they cannot fit) as the backward starts, and the
    previous results leave the parameters until it has ended: a backward that fails half-way
    leaves no half-overwritten result."""

    name = "inline, fused"

    def prepare(self) -> None:
        self.results = Results(self.tape, ONE_SEED, self.out_shape)
        self.tape.drop_results()

    def fused_mode(self, g: Tensor) -> FusedMode:
        if torch.is_grad_enabled() or g.shape[0] == 0:
            return FusedMode.ORDINARY
        return FusedMode.CONTRACT

    def contract_now(self, rec: Record, g: Tensor) -> Dict[str, Tensor]:
        results = self.results
        assert results is not None
        with dropped_if_half_written(results.slots):
            rec.contracted = apply_rule(rec, [g.unsqueeze(0)], into=results.destinations(rec, [Seeds.COTANGENT]))
        return rec.contracted


class InlineClipping(Inline):
    """ClipGrad where every call is fused and every meet held: the parameter gradients come from
    the gate."""

    name = "inline, clipping"
    blocks_budget = BLOCKS_BUDGET
    takes_penalties = False

    def holds(self) -> bool:
        return not torch.is_grad_enabled()

    def fused_mode(self, g: Tensor) -> FusedMode:
        if torch.is_grad_enabled() or g.shape[0] == 0:
            return FusedMode.ORDINARY
        return FusedMode.INPUT_ONLY

    def gate(self, grads: Tuple) -> Tuple:
        """Once every fused node has run: the results (kept for :meth:`at_end`) and, per gated
        parameter, the sum over calls of its gradient for the cotangent with sample n scaled by w_n."""
        if torch.is_grad_enabled():
            return grads
        tape = self.tape
        try:
            self.finished, caught = self.from_caught()
            clipped = self.clipped_sums(caught, self.finished)
        except BaseException:
            tape.drop_results()
            raise
        return tuple(clipped.get(p) for p in tape.parameters if p.requires_grad)

    def clipped_sums(self, caught, results) -> Dict[nn.Parameter, Tensor]:
        """Per parameter, the sum over its calls of the gradient for w_n G[n] or, where its
        per-sample contributions J are materialised (its meets', the calls of layers whose norm
        rule would not be cheaper, parameters several calls share), sum_n w_n J[n]. A rescaler with
        ``parameter_weights`` (per-layer clipping, jacext.dp.PerLayerClipGrad) gives each parameter
        its own w_n: a call's parameters with different weights get their gradients from separately
        scaled cotangents."""
        tape, grad_out = self.tape, self.grad_out
        rescaler = tape.demand.rescaler
        assert rescaler is not None
        i, n = tape.extensions.index(rescaler), grad_out.shape[0]
        per_parameter = getattr(rescaler, "parameter_weights", None)
        if per_parameter is not None:
            ws = per_parameter(n, {p: values[i] for p, values in results.items()}, grad_out)
            weight_of = {p: w.to(grad_out.dtype) for p, w in ws.items()}
        else:
            w = rescaler.weights(n, [values[i] for values in results.values()], grad_out).to(grad_out.dtype)
            weight_of = {p: w for p in results}
        grads: Dict[nn.Parameter, Tensor] = {}
        blocks = {p: b for p, b in self.blocks.items() if not _sparse(tape, p)}
        for rec in tape.records:
            call = call_of(rec.edges[0].node)  # every record is fused when the tape clips inline
            if all(p in blocks for p in call.params):
                continue  # clipped from its materialised results, below
            g = caught[rec][0]
            groups: Dict[int, Tuple[Tensor, List[nn.Parameter]]] = {}
            for p in call.params:
                groups.setdefault(id(weight_of[p]), (weight_of[p], []))[1].append(p)
            for w, members in groups.values():
                ds = call.clipped_grads(g, w)
                for p, d in zip(call.params, ds, strict=True):
                    if any(p is m for m in members) and p not in blocks:
                        grads[p] = d if p not in grads else (d + grads[p] if grads[p].is_sparse else grads[p] + d)
        for p, block in blocks.items():  # every call's and meet's contribution to p, per sample
            grads[p] = torch.tensordot(weight_of[p].to(block.dtype), block[:, 0], dims=1)
        if n == 0:  # no sample: zeros, as the ordinary backward gives through the meets
            for meet in tape.meets:
                for p in meet.parameters:
                    if p.requires_grad and p not in grads:
                        grads[p] = torch.zeros_like(p)
        return grads


def _sparse(tape: Tape, p: nn.Parameter) -> bool:
    """Whether a call of ``p`` gives it a sparse gradient (an Embedding with ``sparse=True``),
    which its clipped sum keeps."""
    return any(getattr(r.module, "sparse", False) and id(p) in r.parameters for r in tape.records)


def choose_plan(
    tape: Tape, out_shape: torch.Size, will_run: Callable[..., bool] = torch._C._will_engine_execute_node
) -> Type[Plan]:
    """The plan for a backward of ``tape`` that reached the root output (of ``out_shape``).

    Inline plans need independent samples, every record's and meet's node to run in this
    backward (``will_run``; not where ``backward(inputs=...)`` prunes one, or an output does not
    reach the loss), meets with one output (each computes its contributions as the backward
    reaches it), and a hand-written rule for every record (the generic rule's errors must come
    before the model's own backward); ClipGrad's inline plan, fused calls and held meets. Under
    ``create_graph=True``, ClipGrad pulls back first and rescales the cotangent the
    differentiable backward continues with (the weights as constants)."""
    demand, records = tape.demand, tape.records
    catchable = (
        not tape.coupled
        and all(len(m.edges) == 1 for m in tape.meets)  # (caught whole, as the backward passes)
        and all(will_run(e.node) for r in records for e in r.edges)
        and all(will_run(e.node) for m in tape.meets for e in m.edges)
        and all(r.layer.rule is not None for r in records)
    )
    if catchable and demand.one_cotangent:
        return InlineFused if tape.fused and out_shape[0] > 0 else Inline
    fused = all(r.fused for r in records) and all(m.held for m in tape.meets)
    if catchable and demand.clipping and fused and not torch.is_grad_enabled():
        return InlineClipping  # (create_graph=True: the gate's clipped sums would not be differentiable)
    n_seeds = sum(1 if kind is Seeds.COTANGENT else out_shape[1:].numel() for kind in demand.seed_kinds())
    if demand.chunk_size is not None and demand.chunk_size < n_seeds:  # coupled: N x chunk_size seeds at a time
        return ChunkedPullBack
    return PullBack
