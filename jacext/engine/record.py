"""Recording: one :class:`Record` per call of a parameterised module, gathered on a :class:`Tape`.

While a jacext extension is active, the extended root module opens a tape (jacext.engine.hooks);
every call of a module that owns trainable parameters appends a record (the module, its
detached inputs, and the autograd edges of its outputs). Edges are taken at call time, so later
in-place operations on the outputs, a module called several times, or any code between modules
do not disturb them. What the backward does with the records is its plan's (jacext.engine.plan).
"""

import weakref
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING, AbstractSet, Dict, Iterable, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_map

from jacext.engine.batch import BatchTracker, Placement, place
from jacext.engine.demand import Demand
from jacext.engine.fused import ClipGate, FusedMode, HeldFree, bind, fusable, fused_output
from jacext.engine.meets import Meet
from jacext.engine.penalty import TapSlot, keep_g
from jacext.engine.trees import leaves
from jacext.engine.uses import ParameterUses
from jacext.errors import JacextError
from jacext.extensions import JacextExtension
from jacext.rules import Layer, layer_of
from jacext.rules.util import autocast_state, require_batch_dim
from jacext.state import module_label

if TYPE_CHECKING:
    from jacext.engine.plan import Plan


def _detached(a):
    return a.detach() if isinstance(a, Tensor) else a


class Alias(torch.autograd.Function):
    """The identity, as an autograd node of its own that is not a view: an in-place operation
    on its output builds on this node (a view's node would be replaced by the in-place op)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.detach()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g


class InputGate(torch.autograd.Function):
    """The identity on an input of the extended model that requires a gradient, under a
    rescaling extension (ClipGrad): where the backward rescales the root's cotangent per sample
    (the pull-back plan), it divides the cotangent leaving the model through this input by the
    same weights, so that inputs get their ordinary, unclipped gradient on every plan (the
    inline plans leave it so: they clip only the parameters' gradients)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(tape, where, x: Tensor) -> Tensor:
        return x.detach()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.tape, ctx.where = inputs[0], inputs[1]

    @staticmethod
    def backward(ctx, g: Tensor):
        tape = ctx.tape()
        w = tape.input_weights if tape is not None else None
        if w is None or ctx.where.dim is None:
            return None, None, g
        shape = [1] * g.dim()
        shape[ctx.where.dim] = -1
        return None, None, g / w.view(shape).to(g.dtype)


class InputPlace:
    """Where the batch of a gated input is (:class:`InputGate`), known when the forward ends."""

    dim: Optional[int] = None


class Record:
    """One call of a parameterised module."""

    def __init__(
        self,
        module: nn.Module,
        args,
        kwargs,
        output,
        trainable: List[Tuple[str, nn.Parameter]],
        ids: Set[int],
        layer: Layer,
    ):
        self.module = module
        self.layer = layer  # what jacext knows of this call (its class's entry, or the generic rule)
        self.training = module.training  # rules run with the module in its forward-time mode
        self.device_type = trainable[0][1].device.type
        self.autocast = autocast_state(self.device_type)  # and under its forward-time autocast
        policy = layer.policy
        self.coupled = policy is not None and policy.couples(module)
        if not kwargs and all(isinstance(a, Tensor) for a in args):  # the common call, without pytree's cost
            self.args, self.kwargs = tuple(a.detach() for a in args), {}
            self.inputs = list(self.args)
        else:
            self.args, self.kwargs = tree_map(_detached, (tuple(args), dict(kwargs)))
            self.inputs = [a for a in leaves((self.args, self.kwargs)) if isinstance(a, Tensor)]
        self.placement: Optional[Placement] = None  # where the rule finds the samples (Tape.record)
        self.versions = self._versions()
        self.named = dict(trainable)  # the trainable parameters the call covers, by name
        self.parameters = ids
        outs = [output] if isinstance(output, Tensor) else [o for o in leaves(output) if isinstance(o, Tensor)]
        self.grad_leaves = [i for i, o in enumerate(outs) if o.requires_grad]
        self.n_leaves = len(outs)
        several = len(self.grad_leaves) > 1
        if several or any(outs[i]._is_view() for i in self.grad_leaves):
            # Hand out aliases (nodes of their own, not views) where one output may be computed
            # from another inside the module (LSTMCell's h' from c': the edge of c' itself would
            # also collect what flows back through h'), and for outputs that are views: changed
            # in place later (Linear on (N, T, D), then ReLU(inplace=True)), a view gets a new
            # grad_fn and the edge taken here would fall off the path; an alias's node stays on it.
            aliased = lambda o: isinstance(o, Tensor) and o.requires_grad and (several or o._is_view())  # noqa: E731
            output = tree_map(lambda o: Alias.apply(o) if aliased(o) else o, output)
            outs = [o for o in leaves(output) if isinstance(o, Tensor)]
        self.output = output  # handed on by the forward hook, then dropped (see Tape.record)
        self.edges = [get_gradient_edge(outs[i]) for i in self.grad_leaves]
        self.out_shapes = [outs[i].shape for i in self.grad_leaves]
        self.out_dtypes = [outs[i].dtype for i in self.grad_leaves]  # of the zeros where no G comes
        self.caught: Optional[List[Optional[Tensor]]] = None  # G per edge, caught in the backward (inline)
        self.contracted: Optional[Dict[str, Tensor]] = None  # the rule's results, by a fused node
        self.fused = False  # its output hangs from a FusedGrads node
        self.tap: Optional[TapSlot] = None  # its first input passed an InputTap (jacext.engine.penalty)
        self.built = False  # a create_graph=True backward reached it: the graph it built holds its input gradient

    def catch_inline(self) -> None:
        """Hook the edges' nodes to catch their cotangents during the ordinary backward (kept
        where :attr:`caught` is a list, as inline plans make it). The hooks hold the record
        weakly: node -> hook -> record -> edge -> node would be a cycle."""
        me = weakref.ref(self)
        for j, edge in enumerate(self.edges):
            edge.node.register_prehook(partial(_catch, me, j, edge.output_nr))

    def _versions(self) -> List[int]:
        return [a._version for a in self.inputs]

    def check_unmodified(self) -> None:
        if self._versions() != self.versions:
            raise JacextError(
                f"An input of module {module_label(self.module)} was modified in place after the "
                "module used it; jacext needs the values the module saw. Use an out-of-place "
                "operation (for example x = x.relu() instead of x.relu_()) on that tensor."
            )


def _tensors(output) -> List[Tensor]:
    return [output] if isinstance(output, Tensor) else [o for o in leaves(output) if isinstance(o, Tensor)]


def _require_batch_dim(module: nn.Module, layer: Layer, inputs: List[Tensor], placement: "Placement") -> None:
    """The layer's ``min_dim`` check on the first input, at forward time."""
    min_dim = layer.min_dim
    if min_dim is not None and inputs and not placement.move:
        require_batch_dim(module, inputs[0], min_dim(module))


_GENERIC = Layer()  # a call that only the generic rule differentiates


def _layer_of_call(module: nn.Module, outputs: List[Tensor], params: List[Tensor], ids: Set[int], param_ops) -> Layer:
    """The registry's entry for the module's class where this call is what its hand-written rule
    assumes: one operation used all its trainable parameters and returned the module's output
    (or what the output views); else the generic rule, which differentiates whatever the call
    did. A forward patched on the instance (``2 * F.linear(...)``) or a parameter added to a
    registered layer (LoRA on an ``nn.Linear``) is then exact, not silently wrong. Complex
    parameters: see :func:`_for_complex`."""
    layer = layer_of(module)
    if layer.rule is None:
        return layer
    generic = replace(_GENERIC, subtree=layer.subtree, policy=layer.policy)
    if param_ops:  # none seen: the layer's own kernel, as registered
        (out, used), *more = param_ops
        fits = not more and used == ids
        if fits and isinstance(out, Tensor):
            fits = all(_base(o) is _base(out) for o in outputs)
        if not fits:
            return generic
    if any(p.is_complex() for p in params):
        return _for_complex(layer) if layer.holomorphic else generic
    return layer


def _for_complex(layer: Layer) -> Layer:
    """A holomorphic layer's rule for complex parameters, in autograd's convention (p = a + i b:
    d/da + i d/db of the real loss). With cotangents G = dL/d conj(y), autograd gives
    sum G conj(dy/dp) = conj(sum conj(G) dy/dp), and for y holomorphic in p, dy/dp is the
    rule's real formula (dy/dW = x for Linear): the rule on conj(G), conjugated. Without its
    norm rule, own backward and NTK factors, which are written for real numbers."""
    rule = layer.rule
    assert rule is not None

    def conjugated(module, args, kwargs, grads):
        results = rule(module, args, kwargs, [None if g is None else g.conj() for g in grads])
        return {k: v.conj() if v.is_conj() else v.conj_physical_() for k, v in results.items()}

    return replace(layer, rule=conjugated, norms=None, norms_cheaper=None, backward=None, ntk_factors=None)


def _base(t: Tensor) -> Tensor:
    return t if t._base is None else t._base


def _catch(record: "weakref.ref[Record]", j: int, output_nr: int, grad_outputs) -> None:
    rec = record()
    if rec is not None and rec.caught is not None:
        g = rec.caught[j] = grad_outputs[output_nr]
        if g is not None and torch.is_grad_enabled():  # create_graph=True: a penalty may follow
            keep_g(rec, j, g)


def _contract_meet(meet: "weakref.ref[Meet]", tape: "weakref.ref[Tape]", grad_outputs) -> None:
    """In an inline plan, as the ordinary backward reaches a meet's output: its per-sample
    contributions, now, while the graph of its batch-free inputs is still there (the ordinary
    backward runs it next and frees it). The hooks hold meet and tape weakly (no cycle through C++)."""
    m, t = meet(), tape()
    if m is None or t is None or m.caught is None:
        return
    g = grad_outputs[m.edges[0].output_nr]
    if g is None:
        return
    leaf_grads: List[Optional[Tensor]] = [None] * m.n_leaves
    leaf_grads[m.grad_leaves[0]] = g.unsqueeze(0)
    try:
        m.check_unmodified()
        with t.pulling_back(), torch.no_grad():
            m.caught = m.per_sample(leaf_grads, t.n)
    except BaseException:
        t.drop_results()
        t.plan = None
        raise


def _require_served(tape: "weakref.ref[Tape]", module: nn.Module, grad_outputs) -> None:
    """A backward that reaches a record without having passed through the root output would
    leave every result of the last batch in place: refuse it."""
    t = tape()
    if t is None or t.pulling or t.served == torch._C._current_graph_task_id():
        return
    t.drop_results()
    raise JacextError(
        f"a backward pass inside a context with jacext extensions reaches module {module_label(module)} "
        f"without passing through an output of the extended module ({type(t.root).__name__}) that holds "
        "the samples, so jacext computes nothing for it. Differentiate a loss computed from that output "
        "(return the logits, or a ModelOutput with them, and compute the loss from them)."
    )


def drop_results(parameters: Iterable[nn.Parameter], foreign_fields: AbstractSet[str]) -> None:
    """No parameter keeps a result of any jacext extension (but the fields BackPACK's own write)."""
    fields = JacextExtension.savefields() - foreign_fields
    for p in parameters:
        for field in fields:
            vars(p).pop(field, None)


class Tape:
    """The records of one forward pass of an extended root module, for a set of extensions.

    ``plan`` is the plan of the backward in progress (None before one reaches the root output
    and after it has finished); ``pulling`` is true while the engine's own pull-back runs."""

    def __init__(self, root: nn.Module, demand: Demand, n: int):
        self.root = root
        self.n = n  # the batch size: the extended module's first input's first dimension
        self.demand = demand
        self.extensions = demand.extensions
        self.parameters = list(root.parameters())  # looked up once: every result is per parameter
        self.records: List[Record] = []
        self.coupled = False  # samples depend on each other: seed each one separately
        self.batch = BatchTracker(n)
        self.batch.on_meet = self.meet
        self.meets: List[Meet] = []  # where tensors computed without the batch meet it
        self.free_calls: List[Record] = []  # calls without the batch whose rules serve meets (_keep_free_call)
        self.meets_at: Dict[int, int] = {}  # per module being called, len(meets) when its call began
        self.input_gates: List[Tuple[InputPlace, Tensor]] = []  # until the forward ends
        self.input_weights: Optional[Tensor] = None  # the per-sample weights of a rescaled root cotangent
        self.uses = ParameterUses(root, self.batch)
        if demand.clipping:
            self.uses.hold = self.hold  # ClipGrad: free tensors meet the batch through HeldFree
        self.fused = False  # a record's output goes through FusedGrads
        self.gate: Optional[Dict[int, Tensor]] = None  # ClipGrad: the parameters out of a ClipGate, by id
        self.plan: Optional["Plan"] = None
        self.pulling = False
        self.served: Optional[int] = None  # the graph task whose backward reached the root output
        self.served_leaves: Set[int] = set()  # through which of its leaves
        self.frame: Optional[FrameType] = None  # the root's call while it runs (jacext.engine.hooks)
        self.built_graph: Optional[int] = None  # the graph task of a create_graph=True backward it served
        self.no_grad_calls: Set[int] = set()  # ids of parameterised modules called without gradients
        self.foreign_fields: Set[str] = set()  # the attributes BackPACK's own active extensions write
        self._reached: Optional[Set[int]] = None  # see reaches
        self.taps: Dict[int, List[Optional[TapSlot]]] = {}  # per module being called, the slot of its tapped input
        self.tapping = False  # the root's input requires a gradient: affine layers' inputs are tapped
        self.built_graphs = 0  # create_graph=True backwards served (jacext.engine.penalty)
        self.built_parameter_grads = False  # one of them computed parameter gradients
        self.penalty_task: Optional[int] = None  # the backward served as a gradient penalty
        self.out_shape: Optional[torch.Size] = None  # of the root output holding the samples
        self.out_dtype: Optional[torch.dtype] = None

    def end_forward(self) -> None:
        """The root's forward has returned: leave the parameter-use mode and drop the callbacks
        that point from the tracker and the mode back to this tape. They are the tape's only
        reference cycles; without them the tape, and the inputs its records hold, are freed as
        soon as the graph is, not when the cyclic garbage collector next runs (a training loop
        would otherwise hold each step's activations into the next steps and allocate fresh
        memory for them)."""
        self.uses.close()
        self.batch.on_meet = self.batch.on_batch_statistics = None

    def record(self, module: nn.Module, args, kwargs, output, own_output: bool = True):
        """Record a call of a module with trainable parameters (others are not recorded); returns
        the output to hand on (aliased where the record needs it, or hanging from a FusedGrads
        node). ``own_output``: the module's output as its forward returned it (no forward hook
        ran before)."""
        met_inside = len(self.meets) > self.meets_at.pop(id(module), len(self.meets))  # a meet inside the call
        taps = self.taps.get(id(module))
        slot = taps.pop() if taps else None  # its input's InputTap, from enter
        trainable, ids = self.uses.covered(module)
        outs = _tensors(output)
        through = self.uses.owns_outputs(outs) & ids
        if not trainable:
            return output
        graded = [o for o in outs if o.requires_grad]
        ops = self.uses.take_param_ops(module)
        if layer_of(module).rule is None:
            # without a rule of its own, a module's uses of its parameters are loose: recorded at
            # the operations where they meet the batch (meets); what the generic rule still
            # differentiates is what reached the call only through an autograd.Function
            through |= set().union(*(used for _, used in ops))
            if not through:
                return output
            trainable, ids = [(name, p) for name, p in trainable if id(p) in through], through
        elif ops:
            # parameters of the module used before its call, outside it (a forward pre-hook
            # registered before jacext's: the old weight_norm's weight = g v / |v|), and not by
            # an operation inside it, are loose: their meets differentiate them, not this record
            inside = set().union(*(used for _, used in ops)) | through
            outside = {i for i in ids if i in self.batch.free_parameters and i not in inside}
            if outside:
                trainable, ids = [(name, p) for name, p in trainable if id(p) not in outside], ids - outside
                if not trainable:
                    return output
        layer = _layer_of_call(module, graded, [p for _, p in trainable], ids, ops)
        flat = leaves((args, kwargs))
        placement = place(self.batch, module, layer, module_label(module), args, flat, graded) if graded else None
        if placement is not None and placement.free:
            self.batch.mark_free(graded)
            self.batch.free_parameters.update((id(p), p) for _, p in trainable)
            self._keep_free_call(module, layer, args, kwargs, output, trainable, ids, flat)
            return output
        clipping = self.demand.clipping
        # not under saved-tensor hooks (non-reentrant checkpointing): a fused call saves other
        # tensors than the recomputation, which runs without a tape
        hooked = torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        # a call on the batch moved (a seq-first model) only for clipping, whose gate scales its G
        # along the moved dimension (a fused BatchGrad would share the rule's moved layout)
        moved = clipping and placement is not None and placement.move and placement.rows is None
        # not around a meet inside the call: a fused output would cut autograd's path to it
        fuse = (placement is None or placement.plain or moved) and self.demand.fuses and not hooked and not met_inside
        fuse = fuse and fusable(module, layer, args, kwargs, output, clipping=clipping, own_output=own_output)
        if fuse:
            gated = self.clip_gate() if clipping else None
            output = fused_output(module, layer, args, kwargs, output, trainable, gated)
        rec = Record(module, args, kwargs, output, trainable, ids, layer)
        rec.tap = slot
        if slot is not None:  # (leaves of (args, kwargs): the tapped input first)
            slot.record = weakref.ref(rec)
            slot.others = any(isinstance(t, Tensor) and t.requires_grad for t in flat[1:])
        output, rec.output = rec.output, None  # a record holding outputs would hold the graph in a cycle
        self.batch.retag(outs, _tensors(output))  # aliases and fused outputs carry the batch on
        self.uses.owns_outputs(_tensors(output))  # (a fused output comes from an autograd.Function)
        rec.fused = fuse
        if fuse:
            bind(output, rec, self)
            self.fused = True
        if rec.edges and placement is not None:
            rec.placement = placement
            _require_batch_dim(module, layer, rec.inputs, placement)
            if placement.move:
                rec.args = (rec.args[0].movedim(placement.in_dims[0] or 0, 0), *rec.args[1:])
            self.records.append(rec)
            rec.edges[0].node.register_prehook(partial(_require_served, weakref.ref(self), rec.module))
            self.coupled = self.coupled or rec.coupled
            if self.demand.catches:
                rec.catch_inline()
        return output

    def _keep_free_call(self, module, layer: Layer, args, kwargs, output, trainable, ids, flat) -> None:
        """A call without the batch whose rule may serve the meets it reaches (jacext.engine.meets:
        :meth:`Meet.per_sample`): a layer whose rule treats every leading dim alike, on inputs that
        need no gradient, of one output that is no view, all its trainable parameters used by its
        own operation, and no count over its whole input (``scale_grad_by_freq``, which an input
        expanded to the batch would change)."""
        if (
            layer.leading
            and layer.rule is not None
            and isinstance(output, Tensor)
            and output.requires_grad
            and not output._is_view()
            and all(isinstance(a, Tensor) for a in args)
            and not any(isinstance(t, Tensor) and t.requires_grad for t in flat)
            and not any(isinstance(t, Tensor) for t in leaves(kwargs))
            and not getattr(module, "scale_grad_by_freq", False)
        ):
            rec = Record(module, args, kwargs, output, trainable, ids, layer)
            rec.output = None
            self.free_calls.append(rec)

    def clip_gate(self) -> Dict[int, Tensor]:
        """The parameters out of the tape's :class:`ClipGate` (made at its first use), by id."""
        if self.gate is None:
            params = [p for p in self.parameters if p.requires_grad]
            self.gate = dict(zip(map(id, params), ClipGate.apply(self, *params), strict=True))
        return self.gate

    def hold(self, f: Tensor) -> Tensor:
        """``f``, a free tensor where it meets the batch, through a :class:`HeldFree` node."""
        gate = self.clip_gate()
        return HeldFree.apply(self, f, next(iter(gate.values()))) if gate else f

    def meet(self, func, flat, spec, free, outputs, dims, out_dims, rows, held: bool = False) -> None:
        """Record an operation where free tensors meet the batch (jacext.engine.batch);
        ``held``: it took them through :meth:`hold`."""
        params = list(self.batch.free_parameters.values())
        meet = Meet(func, flat, spec, free, dims, outputs, out_dims, rows, params, held, self.free_calls)
        self.meets.append(meet)
        if self.demand.catches and len(meet.edges) == 1:
            meet.edges[0].node.register_prehook(partial(_contract_meet, weakref.ref(meet), weakref.ref(self)))

    @contextmanager
    def pulling_back(self):
        """While the engine runs a backward of its own (the pull-back, a meet's second VJP)."""
        pulling, self.pulling = self.pulling, True
        try:
            yield
        finally:
            self.pulling = pulling

    def fused_mode(self, g: Tensor) -> FusedMode:
        """What a fused node returns for its cotangent ``g`` in the backward in progress."""
        if self.pulling:  # the engine's own pull-back wants input gradients only
            return FusedMode.INPUT_ONLY
        return self.plan.fused_mode(g) if self.plan is not None else FusedMode.ORDINARY

    def shared_parameters(self) -> Set[int]:
        """Parameters reached by more than one record: their norms need the summed contraction."""
        seen: Set[int] = set()
        shared: Set[int] = set(self.batch.free_parameters) if self.meets else set()
        for rec in self.records:
            if rec.built:  # a penalty's terms may add to its parameters' results
                shared |= rec.parameters
            shared |= seen & rec.parameters
            seen |= rec.parameters
        return shared

    def reaches(self, p: nn.Parameter) -> bool:
        """Whether a record or a meet of this tape differentiates ``p`` (looked up once the
        forward pass has ended: its records are complete)."""
        if self._reached is None or self.frame is not None:
            reached = set(self.batch.free_parameters) if self.meets else set()
            for rec in self.records:
                reached |= rec.parameters
            self._reached = reached
        return id(p) in self._reached

    def drop_results(self) -> None:
        """No parameter keeps a result of any jacext extension."""
        drop_results(self.parameters, self.foreign_fields)
