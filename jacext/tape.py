"""The tape: what jacext records in the forward pass and computes in the backward pass.

Forward: while a jacext extension is active, the extended root module opens a
tape; every call of a module that owns trainable parameters appends a record
(the module, its detached inputs, and the autograd edges of its outputs).
Edges are taken at call time, so later in-place operations on the outputs, a
module called several times, or any code between modules do not disturb them.

Backward: a hook on the root output receives the loss's cotangent. From there,
one batched ``torch.autograd.grad`` pulls back every active extension's seeds
at once (V seeds: C one-hot seeds for the Jacobian, the cotangent itself for
gradients) to the recorded output edges, giving G of shape (V, N, *out) per
record. Each record's rule contracts G with its inputs; contributions to a
shared parameter are summed. The ordinary backward then runs unchanged.

Extensions that need only the backward's own cotangent (BatchGrad, BatchL2Grad,
and ClipGrad where every call is fused) skip that extra pull-back where they can:
hooks on the recorded edges' nodes catch G as the ordinary backward passes through
them, and the rules run in a callback at the end of that backward
(:meth:`Tape.arm_inline`). Calls whose outputs hang from a FusedGrads node
(jacext.fused) have their parameter gradients formed by the tape: BatchGrad's from
the per-sample results, ClipGrad's from the clipped cotangents.
"""

import weakref
from contextlib import contextmanager
from functools import partial
from typing import Dict, List, Optional, Set, Tuple

import torch
from backpack import disable
from backpack.context import CTX
from backpack.utils.hooks import no_op
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_leaves, tree_map

from jacext.errors import JacextError
from jacext.fused import ClipGate, bind, call_of, fusable, fused_output
from jacext.memory import ResultSlot, require_fits, reusable
from jacext.rules import MIN_DIMS, norm_rule_for, rule_for
from jacext.rules.batchnorm import couples_samples
from jacext.rules.generic import generic
from jacext.rules.util import require_batch_dim, writing_into
from jacext.uses import ParameterUses


def module_label(module: nn.Module) -> str:
    """``'path' (Class)`` for error messages."""
    return f"'{getattr(module, '_jacext_path', '?')}' ({type(module).__name__})"


def _detached(a):
    return a.detach() if isinstance(a, Tensor) else a


class Record:
    """One call of a parameterised module."""

    def __init__(
        self, module: nn.Module, args, kwargs, output, trainable: List[Tuple[str, nn.Parameter]], ids: Set[int]
    ):
        self.module = module
        self.training = module.training  # rules run with the module in its forward-time mode
        self.coupled = couples_samples(module)
        if not kwargs and all(isinstance(a, Tensor) for a in args):  # the common call, without pytree's cost
            self.args, self.kwargs = tuple(a.detach() for a in args), {}
            self.inputs = list(self.args)
        else:
            self.args, self.kwargs = tree_map(_detached, (tuple(args), dict(kwargs)))
            self.inputs = [a for a in tree_leaves((self.args, self.kwargs)) if isinstance(a, Tensor)]
        _require_batch_dim(module, self.inputs)
        self.versions = self._versions()
        self.named = dict(trainable)  # the trainable parameters the call covers, by name
        self.parameters = ids
        leaves = [output] if isinstance(output, Tensor) else [o for o in tree_leaves(output) if isinstance(o, Tensor)]
        self.grad_leaves = [i for i, o in enumerate(leaves) if o.requires_grad]
        self.n_leaves = len(leaves)
        if len(self.grad_leaves) > 1:
            # One output may be computed from another inside the module (LSTMCell's h' from c'):
            # the edge of c' itself would also collect what flows back through h'. Hand out
            # aliases, whose edges see only what comes from outside the module.
            output = tree_map(lambda o: o.view_as(o) if isinstance(o, Tensor) and o.requires_grad else o, output)
            leaves = [o for o in tree_leaves(output) if isinstance(o, Tensor)]
        # An output that is a view and is later changed in place gets a new grad_fn: the edge
        # taken here would fall off the path from the root output. Watch those to refuse it.
        self.views = [leaves[i] for i in self.grad_leaves if leaves[i]._is_view()]
        self.output = output  # handed on by the forward hook, then dropped (see Tape.record)
        self.view_versions = self._view_versions()
        self.edges = [get_gradient_edge(leaves[i]) for i in self.grad_leaves]
        self.out_shapes = [leaves[i].shape for i in self.grad_leaves]
        self.caught: Optional[List[Optional[Tensor]]] = None  # G per edge, caught in the backward (inline)
        self.contracted: Optional[Dict[str, Tensor]] = None  # the rule's results, by a fused node (jacext.fused)
        self.fused = False  # its output hangs from a FusedGrads node

    def catch_inline(self) -> None:
        """Hook the edges' nodes to catch their cotangents during the ordinary backward. The
        hooks hold the record weakly: node -> hook -> record -> edge -> node would be a cycle."""
        me = weakref.ref(self)
        for j, edge in enumerate(self.edges):
            edge.node.register_prehook(partial(_catch, me, j, edge.output_nr))

    def _versions(self) -> List[int]:
        return [a._version for a in self.inputs]

    def _view_versions(self) -> List[int]:
        return [a._version for a in self.views]

    def check_unmodified(self) -> None:
        if self._view_versions() != self.view_versions:
            raise JacextError(
                f"An output of module {module_label(self.module)} that is a view (of another output, "
                "or of an internal tensor) was modified in place; that moves it off the autograd path "
                "jacext recorded. Use an out-of-place operation on it (x = x.relu(), not x.relu_())."
            )
        if self._versions() != self.versions:
            raise JacextError(
                f"An input of module {module_label(self.module)} was modified in place after the "
                "module used it; jacext needs the values the module saw. Use an out-of-place "
                "operation (for example x = x.relu() instead of x.relu_()) on that tensor."
            )


def _require_batch_dim(module: nn.Module, inputs: List[Tensor]) -> None:
    """The rule's ``min_dim`` check on the first input, at forward time."""
    min_dim = MIN_DIMS.get(type(module))
    if min_dim is not None and inputs:
        require_batch_dim(module, inputs[0], min_dim(module))


def _catch(record: "weakref.ref[Record]", j: int, output_nr: int, grad_outputs) -> None:
    rec = record()
    if rec is not None and rec.caught is not None:
        rec.caught[j] = grad_outputs[output_nr]


class Tape:
    """Records of one forward pass of an extended root module, for a set of extensions."""

    def __init__(self, root: nn.Module, extensions):
        self.root = root
        self.parameters = list(root.parameters())  # looked up once: every result is per parameter
        self.extensions = list(extensions)
        self.records: List[Record] = []
        self.coupled = False  # samples depend on each other: seed each one separately
        self.uses = ParameterUses(root)
        self.busy = False
        # one seed, the backward's own cotangent, left unchanged: catch G in the ordinary backward
        self.inline = all(e.kind == "loss" and not hasattr(e, "rescale") for e in self.extensions)
        # kinds whose extensions all want norms only: layers with a norm rule never materialise them
        self.only_norms = {e.kind for e in self.extensions if not e.needs_block} - {
            e.kind for e in self.extensions if e.needs_block
        }
        # calls whose parameter gradients the tape takes over (jacext.fused): BatchGrad's sums of
        # the per-sample gradients it materialises, ClipGrad's clipped sums
        hooked = getattr(root, "_jacext_backpack", False)
        rescaling = [e for e in self.extensions if hasattr(e, "rescale")]
        self.clipping = len(rescaling) == 1 and all(e.kind == "loss" for e in self.extensions) and not hooked
        self.fuses = self.clipping or (self.inline and "loss" not in self.only_norms and not hooked)
        self.fused = False  # a record's output goes through FusedGrads
        self.gate: Optional[Dict[int, Tensor]] = None  # ClipGrad: the parameters out of a ClipGate, by id
        self.finished: Optional[Dict[nn.Parameter, list]] = None  # results computed inside the backward
        self.armed_with: tuple = ()  # the root output's shape and cotangent, while armed
        self.armed = False  # this backward catches G inline (arm_inline)
        self.slots: Optional[Dict[tuple, ResultSlot]] = None  # made when armed, for fused records
        self.shared: Set[int] = set()

    def record(self, module: nn.Module, args, kwargs, output, own_output: bool = True):
        """Record a call of a module with trainable parameters (others are not recorded); returns
        the output to hand on (aliased where the record needs it, or hanging from a FusedGrads
        node). ``own_output``: the module's output as its forward returned it (no forward hook
        ran before)."""
        trainable, ids = self.uses.covered(module)
        if not trainable:
            return output
        fuse = self.fuses and fusable(module, args, kwargs, output, self.clipping, own_output)
        if fuse:
            if self.clipping and self.gate is None:
                params = [p for p in self.parameters if p.requires_grad]
                self.gate = dict(zip(map(id, params), ClipGate.apply(self, *params)))
            output = fused_output(module, args[0], kwargs, output, trainable, self.gate)
        rec = Record(module, args, kwargs, output, trainable, ids)
        output, rec.output = rec.output, None  # a record holding outputs would hold the graph in a cycle
        rec.fused = fuse
        if fuse:
            bind(output, rec, self)
            self.fused = True
        if rec.edges:
            self.records.append(rec)
            self.coupled = self.coupled or rec.coupled
            if self.inline or self.clipping:
                rec.catch_inline()
        return output

    def arm_inline(self, out_shape, grad_out: Tensor) -> bool:
        """Called as the backward reaches the root output: whether G can be caught at every
        record as the backward goes on (then arm the hooks) instead of a separate pull-back.
        Not where samples are coupled, where the engine will skip a record's node
        (``backward(inputs=...)`` pruning it, or an output that does not reach the loss), nor
        where a module has no hand-written rule (the generic rule's errors must come before the
        model's own backward). With fused records, whose rules run during the backward, their
        result slots are made (and refused if they cannot fit) now, and the previous results
        leave the parameters until the backward has ended: a backward that fails half-way
        leaves no half-overwritten result."""
        self.armed = self._can_arm()
        self.finished, self.armed_with = None, (out_shape, grad_out)
        if not self.armed:
            return False
        for rec in self.records:
            rec.check_unmodified()
            rec.caught = [None] * len(rec.edges)
        if self.fused and not self.clipping and out_shape[0] > 0:
            spans = {"loss": (0, 1)}
            self.slots = self._result_slots(spans, out_shape)
            self._require_result_memory(spans, out_shape, self.slots)
            self.shared = self.shared_parameters()
            self._drop_results()
        return True

    def _can_arm(self) -> bool:
        """Also with ClipGrad, where every record is fused: their nodes hold the parameter
        gradients back until the clipping weights are known (:meth:`clipped_grads`)."""
        will_run = torch._C._will_engine_execute_node
        if self.coupled or not all(will_run(e.node) for r in self.records for e in r.edges):
            return False
        if any(rule_for(r.module) is None for r in self.records):  # a generic rule may fail: fail first
            return False
        return self.inline or (self.clipping and all(r.fused for r in self.records))

    def contract_now(self, rec: Record, g: Tensor) -> Dict[str, Tensor]:
        """In an armed backward, a fused record's rule on the cotangent ``g`` its node received,
        written into the result slots; kept on the record for :meth:`compute_inline`."""
        with _dropped_if_half_written(self.slots or {}):
            into = self._destinations(rec, ["loss"], self.slots or {}, self.shared)
            rec.contracted = apply_rule(rec, [g.unsqueeze(0)], into=into)
        return rec.contracted

    def compute_inline(self, out_shape, grad_out: Tensor) -> Dict[nn.Parameter, list]:
        """After a backward armed by :meth:`arm_inline`: the results from the caught G (or
        those :meth:`clipped_grads` computed already)."""
        finished, self.finished = self.finished, None
        return finished if finished is not None else self._from_caught(out_shape, grad_out)[0]

    def clipped_grads(self) -> tuple:
        """ClipGrad in an armed backward, from the :class:`ClipGate` once every fused node has
        run: the results (kept for :meth:`compute_inline`) and, per gated parameter, the sum
        over calls of its gradient for the cotangent with sample n scaled by w_n."""
        with self.cleared_on_error():
            self.finished, caught = self._from_caught(*self.armed_with)
            grads = self._clipped(caught, self.finished, self.armed_with[1])
        return tuple(grads.get(p) for p in self.parameters if p.requires_grad)

    def _from_caught(self, out_shape, grad_out: Tensor):
        """The results from the caught G, and the caught G per record (zeros where none came)."""
        self.armed = False
        slots, self.slots = self.slots, None
        caught: Dict[Record, List[Tensor]] = {}
        for rec in self.records:
            got, rec.caught = rec.caught or [], None
            caught[rec] = [c if c is not None else grad_out.new_zeros(s) for c, s in zip(got, rec.out_shapes)]
        per_record = []
        for rec in self.records if out_shape[0] > 0 else []:
            leaf_grads: List[Optional[Tensor]] = [None] * rec.n_leaves
            for leaf, g in zip(rec.grad_leaves, caught[rec]):
                leaf_grads[leaf] = g.unsqueeze(0)
            per_record.append((rec, leaf_grads))
        with _backpack_paused():
            return self._contract({"loss": (0, 1)}, per_record, out_shape, slots), caught

    @contextmanager
    def cleared_on_error(self):
        """If the block raises (after the model's backward has filled p.grad, or in the middle of
        it), no parameter keeps a result of an earlier batch for these extensions."""
        try:
            yield
        except BaseException:
            self._drop_results()
            raise

    def _drop_results(self) -> None:
        """No parameter keeps a result for these extensions."""
        for p in self.parameters:
            for ext in self.extensions:
                vars(p).pop(ext.savefield, None)

    def _clipped(self, caught, results, grad_out: Tensor) -> Dict[nn.Parameter, Tensor]:
        i, ext = next((i, e) for i, e in enumerate(self.extensions) if hasattr(e, "rescale"))
        n = grad_out.shape[0]
        w = ext.weights(n, [values[i] for values in results.values()], grad_out).to(grad_out.dtype)
        grads: Dict[nn.Parameter, Tensor] = {}
        for rec in self.records:
            call = call_of(rec.edges[0].node)  # every record is fused when the tape clips inline
            for p, d in zip(call.params, self._parameter_grads(rec, call, caught[rec][0], w)):
                grads[p] = d if p not in grads else (d + grads[p] if grads[p].is_sparse else grads[p] + d)
        return grads

    @staticmethod
    def _parameter_grads(rec: Record, call, g: Tensor, w: Tensor) -> List[Tensor]:
        """A call's parameter gradients for its cotangent ``g`` with sample n scaled by w_n."""
        scaled = g * w.view(g.shape[0], *[1] * (g.dim() - 1))
        return call.grads(rec.args[0], scaled, False, True)[1]

    def compute(self, out_edge: GradientEdge, out_shape, grad_out: Tensor) -> Dict[nn.Parameter, list]:
        """Per parameter, one result per extension (in ``self.extensions`` order)."""
        with _backpack_paused():
            return self._compute(out_edge, out_shape, grad_out)

    def cotangents(self, out_edge: GradientEdge, out_shape, grad_out: Tensor):
        """Pull every active extension's seeds back to the records in one batched backward.

        Returns the seed ranges per kind and, per record, its output leaves' cotangents
        ``(V, *leaf)`` (zeros where a leaf did not reach the output; ``None`` where it does not
        require a gradient). With coupled samples, V is N times the seeds (one per sample)."""
        spans, seeds = self._seeds(out_shape, grad_out)
        return spans, self._pulled_back(out_edge, seeds, grad_out)

    def _seeds(self, out_shape, grad_out: Tensor):
        """The seed ranges per kind, and the seeds ``(V, *out_shape)`` of all kinds stacked."""
        kinds: Dict[str, Tensor] = {}  # seed kind -> seeds (V_k, *out_shape); extensions share them
        for ext in self.extensions:
            if ext.kind not in kinds:
                kinds[ext.kind] = ext.seeds(out_shape, grad_out)
        spans, start = {}, 0
        for kind, s in kinds.items():
            spans[kind] = (start, start + s.shape[0])
            start += s.shape[0]
        seeds = torch.cat(list(kinds.values()))  # (V, N, ...)
        n = out_shape[0]
        if self.coupled:  # seed (n, v) is seed v restricted to sample n: (N * V, N, ...)
            only = torch.eye(n, dtype=seeds.dtype, device=seeds.device).view(n, 1, n, *[1] * (len(out_shape) - 1))
            seeds = (seeds.unsqueeze(0) * only).flatten(0, 1)
        return spans, seeds

    def _pulled_back(self, out_edge: GradientEdge, seeds: Tensor, grad_out: Tensor):
        """Per record, its leaves' cotangents for ``seeds``, after refusing G that cannot fit."""
        records = self.records if seeds.shape[1] > 0 else []  # an empty batch: every result is empty
        per_seed = sum(shape.numel() for rec in records for shape in rec.out_shapes) * grad_out.element_size()
        require_fits(
            seeds.shape[0] * per_seed,
            grad_out.device,
            f"the cotangents of {seeds.shape[0]} seeds at every layer",
            "Pass chunk_size to BatchJacobian to pull the outputs back a few at a time, or use fewer outputs.",
        )
        grads = self._pull_back(out_edge, [e for rec in records for e in rec.edges], seeds)
        per_record, i = [], 0
        for rec in records:
            rec.check_unmodified()
            leaf_grads: List[Optional[Tensor]] = [None] * rec.n_leaves
            for leaf, g, shape in zip(rec.grad_leaves, grads[i : i + len(rec.edges)], rec.out_shapes):
                leaf_grads[leaf] = g if g is not None else grad_out.new_zeros(seeds.shape[0], *shape)
            i += len(rec.edges)
            per_record.append((rec, leaf_grads))
        return per_record

    def _compute(self, out_edge: GradientEdge, out_shape, grad_out: Tensor) -> Dict[nn.Parameter, list]:
        chunk = min((e.chunk_size for e in self.extensions if getattr(e, "chunk_size", None)), default=None)
        spans, seeds = self._seeds(out_shape, grad_out)
        if chunk is None or chunk >= seeds.shape[0] or self.coupled:
            return self._contract(spans, self._pulled_back(out_edge, seeds, grad_out), out_shape)
        return self._contract_in_chunks(out_edge, spans, seeds, grad_out, out_shape, chunk)

    def _contract_in_chunks(self, out_edge, spans, seeds, grad_out, out_shape, chunk: int):
        """:meth:`_contract`, pulling back ``chunk`` seeds at a time: the cotangents held at once
        are those of ``chunk`` seeds; the results are written into place chunk by chunk."""
        slots = self._result_slots(spans, out_shape)
        self._require_result_memory(spans, out_shape, slots)
        shared = self.shared_parameters()
        whole: Dict[tuple, Tensor] = {}  # (parameter, kind) -> (N, V_k, *p) or norms (N, V_k)
        with _dropped_if_half_written(slots):
            self._contract_chunks(out_edge, spans, seeds, grad_out, out_shape, chunk, slots, shared, whole)
        blocks: Dict[nn.Parameter, Dict[str, Tensor]] = {}
        norms: Dict[nn.Parameter, Dict[str, Tensor]] = {}
        for (p, kind, is_block), value in whole.items():
            (blocks if is_block else norms).setdefault(p, {})[kind] = value
        return self._results(blocks, norms, spans, out_shape, slots)

    def _contract_chunks(self, out_edge, spans, seeds, grad_out, out_shape, chunk, slots, shared, whole) -> None:
        """The chunks' results, written into ``whole`` (allocated in the slots where there is one)."""
        n = out_shape[0]
        for a in range(0, seeds.shape[0], chunk):
            b = min(a + chunk, seeds.shape[0])
            part = {k: (max(s, a) - a, min(e, b) - a) for k, (s, e) in spans.items() if max(s, a) < min(e, b)}
            blocks: Dict[nn.Parameter, Dict[str, Tensor]] = {}
            norms: Dict[nn.Parameter, Dict[str, Tensor]] = {}
            for rec, leaf_grads in self._pulled_back(out_edge, seeds[a:b], grad_out):
                self._apply_rules(rec, leaf_grads, part, {}, shared, blocks, norms, out_shape)
            for store, is_block in ((blocks, True), (norms, False)):
                for p, per_kind in store.items():
                    for kind, value in per_kind.items():
                        if (p, kind, is_block) not in whole:
                            owner = self._owner(kind) if is_block else None
                            width = spans[kind][1] - spans[kind][0]
                            shape = (n, width, *value.shape[2:])
                            slot = slots.get((p, owner)) if owner is not None else None
                            whole[(p, kind, is_block)] = slot.take(shape) if slot else value.new_empty(shape)
                        start = max(spans[kind][0], a) - spans[kind][0]
                        whole[(p, kind, is_block)][:, start : start + value.shape[1]] = value

    def _results(self, blocks, norms, spans, out_shape, slots) -> Dict[nn.Parameter, list]:
        """Per trainable parameter, every extension's finished result."""
        results = {}
        for p in self.parameters:
            if p.requires_grad:
                finish = partial(self._finish, p=p, blocks=blocks, norms=norms, spans=spans, out_shape=out_shape)
                results[p] = [finish(ext, slot=slots.get((p, ext))) for ext in self.extensions]
        return results

    def _require_batch_first(self, rec: Record, value: Tensor, out_shape) -> None:
        """The output's first dimension must be the batch the layers saw, where the extensions
        index the output by sample (BatchJacobian's seeds, ClipGrad's rescaling)."""
        if value.shape[0] == out_shape[0]:
            return
        if any(e.kind == "outputs" or hasattr(e, "rescale") for e in self.extensions):
            raise JacextError(
                f"the extended module's output has shape {tuple(out_shape)}, whose first dimension is not "
                f"the batch: module {module_label(rec.module)} saw {value.shape[0]} samples. Return the "
                "output per sample, as (N, ...) (no mean over, transposition or flattening of the batch "
                "dimension), and reduce it in the loss."
            )

    def _owner(self, kind: str):
        """The one extension that keeps the materialised result of ``kind``, or None."""
        owners = [e for e in self.extensions if e.needs_block and e.kind == kind]
        return owners[0] if len(owners) == 1 else None

    def _contract(self, spans, per_record, out_shape, slots=None) -> Dict[nn.Parameter, list]:
        """Every record's rule on its cotangents (or what a fused record contracted already),
        gathered per parameter and extension; ``slots``: those made when the backward was armed."""
        if slots is None:
            slots = self._result_slots(spans, out_shape)
            self._require_result_memory(spans, out_shape, slots)
        blocks: Dict[nn.Parameter, Dict[str, Tensor]] = {}  # (N, V_k, *p) per kind
        norms: Dict[nn.Parameter, Dict[str, Tensor]] = {}  # (N, V_k) per kind, where not materialised
        shared = self.shared_parameters()
        with _dropped_if_half_written(slots):
            for rec, leaf_grads in per_record:
                self._apply_rules(rec, leaf_grads, spans, slots, shared, blocks, norms, out_shape)
        return self._results(blocks, norms, spans, out_shape, slots)

    def _apply_rules(self, rec: Record, leaf_grads, spans, slots, shared, blocks, norms, out_shape) -> None:
        """One record: its norm rule for the kinds only norms are asked of (where it has one and
        the norms add up: independent samples, parameters no other record reaches), its rule for
        the rest; results accumulated into ``norms`` and ``blocks``."""
        kinds = list(spans)
        only_norms = [k for k in self.only_norms if k in spans]
        by_norms = [] if self.coupled or not norm_rule_for(rec.module) or shared & rec.parameters else only_norms
        for kind in by_norms:
            for name, sq in apply_rule(rec, _seed_slice(leaf_grads, [spans[kind]]), norm_rule_for(rec.module)).items():
                self._require_batch_first(rec, sq, out_shape)
                _accumulate(norms, rec.named[name], kind, sq)
        materialised = [k for k in kinds if k not in by_norms]
        if not materialised:
            return
        ranges = [spans[k] for k in materialised]
        selected = leaf_grads if len(materialised) == len(kinds) else _seed_slice(leaf_grads, ranges)
        contracted, rec.contracted = rec.contracted, None
        if contracted is None:
            contracted = apply_rule(rec, selected, into=self._destinations(rec, materialised, slots, shared))
        for name, block in contracted.items():
            if self.coupled:  # sum over the samples m the seed reached: (N, V, *p)
                block = block.sum(0).unflatten(0, (out_shape[0], -1))
            self._require_batch_first(rec, block, out_shape)
            parts = [block] if len(ranges) == 1 else block.split([b - a for a, b in ranges], dim=1)
            for kind, part in zip(materialised, parts):
                _accumulate(blocks, rec.named[name], kind, part)

    def _result_slots(self, spans, out_shape) -> Dict[tuple, ResultSlot]:
        """Where each materialised result goes, by (parameter, extension); see jacext.memory."""
        if self.coupled:
            return {}
        slots = {}
        for p in self.parameters:
            for ext in self.extensions:
                if p.requires_grad and ext.needs_block:
                    a, b = spans[ext.kind]
                    shape = ext.result_shape(p.shape, out_shape, b - a)
                    slots[(p, ext)] = ResultSlot(shape, p, reusable(p, ext.savefield, shape, p.dtype))
        return slots

    def _require_result_memory(self, spans, out_shape, slots) -> None:
        """Refuse, before allocating, results that cannot fit in the memory left."""
        nbytes = sum(
            out_shape[0] * (spans[e.kind][1] - spans[e.kind][0]) * p.numel() * p.element_size()
            for p in self.parameters
            for e in self.extensions
            if p.requires_grad and e.needs_block and (slots.get((p, e)) is None or slots[(p, e)].tensor is None)
        )
        if nbytes:
            names = ", ".join(sorted({type(e).__name__ for e in self.extensions if e.needs_block}))
            require_fits(
                nbytes,
                self.parameters[0].device,
                f"the per-sample results of {names}",
                "Use a smaller batch, fewer outputs (a slice of the model's output), or per-sample "
                "norms only (BatchL2Grad, jacext.dp.ClipGrad), which are not materialised.",
            )

    def _destinations(self, rec: Record, materialised, slots, shared) -> Dict[str, ResultSlot]:
        """The result slots the record's rule may write into: where it materialises one kind,
        kept whole by one extension, for parameters no other record contributes to."""
        owner = self._owner(materialised[0]) if len(materialised) == 1 else None
        if not slots or owner is None:
            return {}
        return {name: slots[(p, owner)] for name, p in rec.named.items() if (p, owner) in slots and id(p) not in shared}

    def factors(self, out_edge: GradientEdge, out_shape, grad_out: Tensor):
        """:meth:`cotangents` with BackPACK's hooks paused, for callers outside a backward pass."""
        with _backpack_paused():
            return self.cotangents(out_edge, out_shape, grad_out)

    def shared_parameters(self) -> Set[int]:
        """Parameters reached by more than one record: their norms need the summed contraction."""
        seen: Set[int] = set()
        shared: Set[int] = set()
        for rec in self.records:
            shared |= seen & rec.parameters
            seen |= rec.parameters
        return shared

    @staticmethod
    def _finish(ext, p, blocks, norms, spans, out_shape, slot: Optional[ResultSlot]) -> Tensor:
        n = out_shape[0]
        block = blocks.get(p, {}).get(ext.kind)
        if slot is not None and slot.tensor is not None and block is not None and slot.holds(block):
            return slot.tensor  # the rule wrote the whole result into the slot (see _destinations)
        if ext.needs_block:
            if block is None:  # not used in this forward pass: its derivative is zero
                a, b = spans[ext.kind]
                block = torch.zeros(n, b - a, *p.shape, dtype=p.dtype, device=p.device)
            return ext.finish(block, out_shape)
        sq = norms.get(p, {}).get(ext.kind)
        if sq is None:
            a, b = spans[ext.kind]
            sq = block.reshape(*block.shape[:2], -1).square().sum(-1) if block is not None else p.new_zeros(n, b - a)
        return ext.finish(sq, out_shape)

    def _pull_back(self, out_edge, edges, seeds: Tensor) -> List[Optional[Tensor]]:
        """Cotangents (V, N, *out) at every edge for the V seeds, in one batched backward."""
        if not edges:
            return []
        self.busy = True
        try:
            if seeds.shape[0] == 1:
                grads = torch.autograd.grad(out_edge, edges, seeds[0], retain_graph=True, allow_unused=True)
                return [None if g is None else g.unsqueeze(0) for g in grads]
            try:
                return list(
                    torch.autograd.grad(
                        out_edge, edges, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True
                    )
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
        finally:
            self.busy = False


@contextmanager
def _dropped_if_half_written(slots: Dict[tuple, ResultSlot]):
    """If the block raises, no reused result a rule already wrote into stays as an attribute."""
    try:
        yield
    except BaseException:
        for (p, ext), slot in slots.items():
            if slot.taken and vars(p).get(ext.savefield) is slot.tensor:
                del vars(p)[ext.savefield]
        raise


def _seed_slice(grads, ranges) -> List[Optional[Tensor]]:
    """The cotangents of the seeds in the index ranges ``[(a1, b1), (a2, b2), ...]``."""
    if len(ranges) == 1:
        return [None if g is None else g[ranges[0][0] : ranges[0][1]] for g in grads]
    return [None if g is None else torch.cat([g[a:b] for a, b in ranges]) for g in grads]


def _accumulate(store: Dict[nn.Parameter, Dict[str, Tensor]], p: nn.Parameter, kind: str, value: Tensor) -> None:
    per_kind = store.setdefault(p, {})
    per_kind[kind] = value if kind not in per_kind else per_kind[kind] + value


def apply_rule(rec: Record, grads, rule=None, into: Optional[Dict[str, ResultSlot]] = None) -> Dict[str, Tensor]:
    """``rule`` (default: the module's hand-written rule, or the generic one), run in the
    module's forward-time mode, with ``into`` the memory it may write its results into; a
    failing generic rule raises an error that names the module."""
    rule = rule or rule_for(rec.module) or generic
    training, rec.module.training = rec.module.training, rec.training
    try:  # results are not differentiable (as BackPACK's), also in a create_graph backward
        with torch.no_grad(), writing_into(into or {}):
            return rule(rec.module, rec.args, rec.kwargs, grads)
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


@contextmanager
def _backpack_paused():
    """BackPACK's module hooks (``extend(..., backpack=True)``) also fire in the tape's own
    backward and in forward passes that rules run: let them do nothing there and keep the
    inputs they stored for the real backward. With no extension active, no tape opens there."""
    saved = CTX.get_active_exts(), CTX.get_retain_graph(), CTX.get_extension_hook()
    CTX.set_active_exts(())
    CTX.set_retain_graph(True)
    CTX.set_extension_hook(no_op)
    try:
        with disable():
            yield
    finally:
        CTX.set_active_exts(saved[0])
        CTX.set_retain_graph(saved[1])
        CTX.set_extension_hook(saved[2])
