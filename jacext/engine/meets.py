"""Meets: where a tensor computed from parameters without the batch meets batched data.

A layer called on tensors that do not depend on the batch (nanoGPT's ``wpe(arange(T))``,
HuggingFace's position ids of shape (1, T), T5's relative-position bias) computes one value
``f`` for all samples; the operation that combines ``f`` with batched data (``tok + pos``,
``scores + bias``) is where the samples' contributions separate, and autograd sums them
over the batch as it passes back through it. So jacext does not record such a call; it
records the operation instead, as a :class:`Meet`, and in the backward computes, for the
cotangent G of the operation's output,

    G_f[v, n] = vjp(f -> op(f, x[n]), G[v, n])            (vmap over samples, then seeds)
    J_W[n, v] = vjp(W -> f(W), G_f[v, n])                  (is_grads_batched over v and n)

the second through the autograd graph of ``f`` itself, so anything between the layer and the
meeting operation (dropout, slicing, a second layer) is differentiated as the forward ran it.
Where the operation has a rule of its own, that rule gives G_f instead of the VJP: a layer
function (jacext.rules.functional: ``F.linear``, ``x @ W``, the norms, ``F.embedding``, the
convolutions, attention's additive mask) whose weight or bias is ``f`` and whose other inputs
hold the batch; ``x + f``, ``x - f``, ``x * f``; ``torch.cat`` with ``f`` expanded to the
batch. Where ``f`` is a parameter itself, J_W = G_f. Where ``f`` comes from calls of layers
whose rules treat every leading dim alike, on inputs u without gradients (``wpe(arange(T))``),
those rules give J_W from the calls' cotangents, with u expanded to the batch (:meth:`_by_calls`,
:meth:`_by_rows`), instead of the second VJP. Under ClipGrad, ``f`` enters the
operation through a :class:`jacext.engine.fused.HeldFree` node, so that the parameters get
sum_n w_n J_W[n] from the gate instead of autograd's unclipped sum.
"""

import copy
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from jacext.engine.apply import apply_rule
from jacext.errors import JacextError
from jacext.rules.functional import ELEMENTWISE, FUNCTIONS, bind, elementwise
from jacext.rules.util import autocast_as, autocast_state


def op_name(func) -> str:
    """The name of a torch function, as the batch tracker and the meets know operations."""
    return getattr(func, "__name__", str(func))


def broadcast_shape(shapes) -> Optional[Tuple[int, ...]]:
    """The shape ``shapes`` broadcast to (None: they do not broadcast); ``torch.broadcast_shapes``
    for concrete sizes, without its cost per call."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        at = ndim - len(s)
        for i, d in enumerate(s):
            if d != out[at + i]:
                if out[at + i] != 1 and d != 1:
                    return None
                if d != 1:
                    out[at + i] = d
    return tuple(out)


MATMULS = {"matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "baddbmm", "addmm", "addbmm", "mv"}
LAYER_FUNCTIONS = {
    "linear", "embedding", "embedding_bag", "layer_norm", "rms_norm", "group_norm", "instance_norm", "conv1d",
    "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "batch_norm",
    "scaled_dot_product_attention", "bilinear", "prelu", "interpolate", "upsample", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
    "lp_pool2d", "local_response_norm", "one_hot", "cross_entropy", "grid_sample", "affine_grid",
    "max_pool2d_with_indices", "embedding_renorm_",
}  # known by name: they keep the batch in the rows of their first input
_AUGMENTED = {"add", "sub", "mul", "truediv", "div", "floordiv", "mod", "pow", "and", "or", "xor", "matmul"}


def in_place(func) -> bool:
    """Whether ``func`` writes into its first argument (``add_``, ``+=``, ``x[i] = ...``)."""
    name = op_name(func)
    if name.startswith("__"):
        return name == "__setitem__" or (name.startswith("__i") and name[3:-2] in _AUGMENTED)
    return name.endswith("_")


class Rows(NamedTuple):
    """G_f (R, V, *f with 1 at d) of a free tensor f with one entry per index r along its dim d,
    which the operation aligns with the batch: index r's cotangent, zero at the other entries
    (:func:`_diagonal` writes it whole)."""

    g: Tensor
    d: int


Cotangents = List[Union[Tensor, Rows]]  # G_f per free tensor: (N, V, *f), or by rows


class Meet:
    """One operation whose inputs include tensors ``free`` (batch-free, computed from
    parameters) and batched ones, and whose outputs carry the batch.

    ``flat``/``spec``: its arguments, flattened (detached; the free ones kept apart);
    ``dims``: each flattened argument's batch dimension (None: none); ``out_dims``: that of each
    output leaf with a gradient; ``rows``: the sample of each index along the batch dimension
    (None: index n is sample n)."""

    def __init__(
        self,
        func,
        flat: List,
        spec,
        free: List[int],
        dims,
        outputs: List[Tensor],
        out_dims,
        rows,
        parameters,
        held: bool = False,
        free_calls: Sequence = (),
    ):
        self.func, self.spec, self.free_at, self.dims = func, spec, free, dims
        self.free = [flat[i] for i in free]  # kept with their graphs: the second VJP runs through them
        self.flat = [None if i in free else (a.detach() if isinstance(a, Tensor) else a) for i, a in enumerate(flat)]
        self.inputs = [a for a in self.flat if isinstance(a, Tensor)]
        self.versions = [a._version for a in self.inputs]
        self.n_leaves = len(outputs)
        self.grad_leaves = [i for i, o in enumerate(outputs) if o.requires_grad]
        self.edges = [get_gradient_edge(outputs[i]) for i in self.grad_leaves]
        self.out_shapes = [outputs[i].shape for i in self.grad_leaves]
        self.out_dtypes = [outputs[i].dtype for i in self.grad_leaves]
        self.out_dims = out_dims
        self.aligned = _aligned(op_name(func), flat, free, outputs, out_dims)
        self.rows = rows
        self.parameters = parameters  # the trainable parameters the free tensors may reach
        self.device_type = outputs[0].device.type
        self.autocast = autocast_state(self.device_type)  # the operation is replayed under it
        # inline plans: {} while armed, then the contributions computed as the backward passed
        self.caught: Optional[Dict[nn.Parameter, Tensor]] = None
        self._rule: Any = _UNBOUND  # see _by_rule
        self.held = held  # ClipGrad: its free inputs went through HeldFree (jacext.engine.fused)
        self.free_calls = free_calls  # the tape's calls without the batch whose rules may serve (_by_calls)

    def label(self) -> str:
        return f"operation {op_name(self.func)}"

    def check_unmodified(self) -> None:
        if [a._version for a in self.inputs] != self.versions:
            raise JacextError(
                f"an input of {self.label()}, where a tensor computed without the batch (such as a "
                "positional embedding) meets the batch, was modified in place afterwards; jacext needs "
                "the values it saw. Use an out-of-place operation on that tensor."
            )

    def per_sample(self, leaf_grads: List[Optional[Tensor]], n: int) -> Dict[nn.Parameter, Tensor]:
        """Per parameter the free tensors reach, its per-sample contraction (N, V, *p): G_f
        itself for a free tensor that is a parameter; for the others, the rules of the free calls
        that computed them (:meth:`_by_rows`, :meth:`_by_calls`), else the batched VJP through
        the free tensor's graph."""
        if n == 0 or any(g is not None and g.numel() == 0 for g in leaf_grads):  # an empty batch: nothing
            return {}
        params = [p for p in self.parameters if p.requires_grad]
        ids = {id(p) for p in params}
        out: Dict[nn.Parameter, Tensor] = {}

        def add(p: nn.Parameter, g: Tensor) -> None:
            out[p] = out[p] + g if p in out else g

        through = []
        for f, g in zip(self.free, self.free_cotangents(leaf_grads, n), strict=True):
            if isinstance(g, Rows):
                if id(f) not in ids and self._by_rows(f, g, n, add):
                    continue
                g = _per_sample(_diagonal(g.g, g.d), self.rows, n)
            if id(f) in ids:
                add(f, g)
            else:
                through.append((f, g))
        if not through:
            return out
        v = through[0][1].shape[1]
        calls = self._calls_reached([f for f, _ in through])
        if calls:
            self._by_calls(calls, through, n, add)
            return out
        try:
            grads = torch.autograd.grad(
                [f for f, _ in through],
                params,
                [g.transpose(0, 1).flatten(0, 1) for _, g in through],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError as error:
            raise JacextError(
                f"jacext could not pull the per-sample cotangents of {self.label()} back to the parameters "
                f"that computed its batch-free input ({error}). Expand that input to the batch (for "
                "example position ids pos.expand(N, -1)) before the layer that computes it."
            ) from error
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                add(p, g.unflatten(0, (v, n)).transpose(0, 1))
        return out

    def _by_rows(self, f: Tensor, rows: "Rows", n: int, add: Callable[[nn.Parameter, Tensor], None]) -> bool:
        """J_W of a free call's parameters for its output f itself, with one entry per index r
        along its dim d, which the operation aligns with the batch (token type embeddings of ids
        expanded to (N, T)): index r's J_W is the rule's for row r of the call's inputs and
        row r of G_f, then summed per sample, handed to ``add``. False (nothing added) where f is
        no free call's output, or d is not one of the leading dims its rule treats alike."""
        node = get_gradient_edge(f).node
        rec = next((r for r in self.free_calls if r.edges[0].node is node), None)
        if rec is None or rec.layer.min_dim is None:
            return False
        d, trailing = rows.d, rec.layer.min_dim(rec.module) - 1
        if any(d >= a.dim() - trailing or a.shape[d] != f.shape[d] for a in rec.args):
            return False
        inputs = tuple(a.movedim(d, 0).unsqueeze(d + 1) for a in rec.args)  # (R, ..., 1 at d, ...)
        for p, j in _rule_of_call(rec, inputs, rows.g.transpose(0, 1)):  # (R, V, *p)
            add(p, _per_sample(j, self.rows, n))
        return True

    def _calls_reached(self, fs: List[Tensor]) -> Optional[List[Any]]:
        """The free calls (records of the tape's ``free_calls``) that the graphs of ``fs`` reach,
        where every path from them to a trainable parameter passes through one; None where one
        does not (a parameter used on a batch-free tensor outside any such call)."""
        stops = {rec.edges[0].node: rec for rec in self.free_calls}
        found: Dict[int, Any] = {}
        seen = set()
        stack = [f.grad_fn for f in fs]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            rec = stops.get(node)
            if rec is not None:
                found[id(rec)] = rec
            elif hasattr(node, "variable"):  # an AccumulateGrad: a leaf reached outside the calls
                if node.variable.requires_grad:
                    return None
            else:
                stack.extend(next_node for next_node, _ in node.next_functions)
        return list(found.values())

    def _by_calls(self, calls: List[Any], through, n: int, add: Callable[[nn.Parameter, Tensor], None]) -> None:
        """J_W of the parameters of free calls u -> layer(u) by the layer's own rule: the
        cotangents G_c (V, N, *c) of each call's output c, pulled back from G_f (N, V, *f)
        (G_f itself where f is c), and the rule applied to u expanded to the batch,
        (N, *u.shape): its rule treats every leading dim alike, so that sample n's J_W is the
        rule's for the input u and G_c[:, n]; each handed to ``add``."""
        of = {rec.edges[0].node: rec for rec in calls}
        owners = [of.get(get_gradient_edge(f).node) for f, _ in through]
        cotangents: Dict[int, Tensor] = {}
        if all(owners) and len({id(rec) for rec in owners}) == len(calls):
            for rec, (_, g) in zip(owners, through, strict=True):
                c = g.transpose(0, 1)
                cotangents[id(rec)] = cotangents[id(rec)] + c if id(rec) in cotangents else c
        else:
            v = through[0][1].shape[1]
            got = torch.autograd.grad(
                [f for f, _ in through],
                [rec.edges[0] for rec in calls],
                [g.transpose(0, 1).flatten(0, 1) for _, g in through],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            cotangents = {id(rec): g.unflatten(0, (v, n)) for g, rec in zip(got, calls, strict=True) if g is not None}
        for rec in calls:
            if id(rec) in cotangents:
                expanded = tuple(a.unsqueeze(0).expand(n, *a.shape) for a in rec.args)
                for p, j in _rule_of_call(rec, expanded, cotangents[id(rec)]):
                    add(p, j)

    def free_cotangents(self, leaf_grads: List[Optional[Tensor]], n: int) -> Cotangents:
        """G_f (N, V, *f) per free tensor (:class:`Rows` for one aligned with the batch): by the
        function's own rule where one applies, else by the operation's VJP."""
        by_rule = self._by_rule(leaf_grads, n)
        return by_rule if by_rule is not None else self._by_vjp(leaf_grads, n)

    def _by_rule(self, leaf_grads: List[Optional[Tensor]], n: int) -> Optional[Cotangents]:
        """G_f by a rule: a layer function's (jacext.rules.functional) whose weight arguments are
        the free tensors and whose other inputs hold the batch, an elementwise operation's, or
        ``torch.cat``'s; None where none applies. Bound to the call once (:meth:`_function_rule`,
        :meth:`_elementwise_rule`, :meth:`_cat_rule`: the rule as a function of G, or None)."""
        if self._rule is _UNBOUND:
            name = op_name(self.func)
            if name in FUNCTIONS:
                self._rule = self._function_rule(n)
            else:
                self._rule = self._elementwise_rule(n) if name in ELEMENTWISE else self._cat_rule(n)
        g = leaf_grads[self.grad_leaves[0]]
        if self._rule is None or g is None or g.dtype != self.free[0].dtype:  # (autocast: one dtype)
            return None
        return self._rule(g)

    def _arguments(self, names, defaults) -> Optional[Tuple[Dict, Callable[[Any], Optional[int]]]]:
        """The arguments by name (the free ones detached) and the flat index of a tensor among
        them, for a function of the arguments ``names`` with one output (None: not such a call)."""
        if self.n_leaves != 1 or self.grad_leaves != [0]:
            return None
        values = list(self.flat)
        for i, f in zip(self.free_at, self.free, strict=True):
            values[i] = f.detach()
        args = bind(names, defaults, *tree_unflatten(values, self.spec))
        if args is None or any(f.dtype != self.free[0].dtype for f in self.free):
            return None
        index = {id(v): i for i, v in enumerate(values) if isinstance(v, Tensor)}
        return args, lambda v: index.get(id(v))

    def _function_rule(self, n: int) -> Optional[Callable[[Tensor], Cotangents]]:
        function = FUNCTIONS[op_name(self.func)]
        bound = self._arguments(function.names, function.defaults)
        if bound is None or self.aligned:
            return None
        args, at = bound
        wanted = {at(args[s]): s for s in function.slots if at(args[s]) in self.free_at}
        x = args[function.names[0]]
        x_at = at(x)
        d = self.dims[x_at] if isinstance(x_at, int) else None
        if len(wanted) != len(self.free_at) or d is None or d != self.out_dims[0]:
            return None
        inner = function.inner(args)
        if inner is None or d >= x.dim() - inner or (x.is_floating_point() and x.dtype != self.free[0].dtype):
            return None
        also = {at(args[name]) for name in function.batched}
        if any(e is not None and (i not in also or e != d) for i, e in enumerate(self.dims) if i != x_at):
            return None
        if not function.leading and (d != 0 or self.rows is not None):
            return None
        interleaved = None if self.rows is None else _folding(self.rows, n)
        if self.rows is not None and interleaved is None:
            return None
        x = x.movedim(d, 0)
        if interleaved is not None:  # folded rows: the samples' own dim, and one for the rows of each
            x = _by_sample(x, 0, n, interleaved)

        def rule(g: Tensor) -> Cotangents:
            g = g.movedim(1 + d, 1)
            if interleaved is not None:
                g = _by_sample(g, 1, n, interleaved)
            got = function.rule(args, x, g, frozenset(wanted.values()))
            return [got[wanted[i]] for i in self.free_at]

        return rule

    def _elementwise_rule(self, n: int) -> Optional[Callable[[Tensor], Cotangents]]:
        name = op_name(self.func)
        bound = self._arguments(("input", "other", "alpha"), {"alpha": 1})
        if bound is None or len(self.free_at) != 1 or self.aligned:
            return None
        args, at = bound
        free = next((s for s in ("input", "other") if at(args[s]) == self.free_at[0]), None)
        x = args["other" if free == "input" else "input"]
        x_at = at(x)
        if free is None or x_at is None or self.dims[x_at] is None:
            return None
        f, d = args[free], self.out_dims[0]
        m = len(self.out_shapes[0])
        if x.dtype != f.dtype or f.dim() > m or (m - f.dim() <= d and f.shape[d - m + f.dim()] != 1):
            return None
        return lambda g: [_per_sample(elementwise(name, args, free, g, d), self.rows, n)]

    def _cat_rule(self, n: int) -> Optional[Callable[[Tensor], Cotangents]]:
        """``torch.cat`` of batched tensors and free ones expanded to the batch (stride 0 along
        the output's batch dim d, ``cls_token.expand(N, -1, -1)``): G_f is G's slice of f,
        sample r's entry on the diagonal (see :func:`_diagonal`)."""
        bound = self._arguments(("tensors", "dim"), {"dim": 0}) if op_name(self.func) == "cat" else None
        if bound is None:
            return None
        (args, at), d, m = bound, self.out_dims[0], len(self.out_shapes[0])
        tensors, c = args["tensors"], args["dim"] % m if isinstance(args["dim"], int) else d
        if c == d or any(not isinstance(t, Tensor) or t.dim() != m for t in tensors):
            return None
        starts = [sum(t.shape[c] for t in tensors[:k]) for k in range(len(tensors))]
        slices = {at(t): (start, t.shape[c]) for t, start in zip(tensors, starts, strict=True)}
        if any(self.aligned.get(i) != d or i not in slices for i in self.free_at):
            return None

        def rule(g: Tensor) -> Cotangents:
            rows = [g.narrow(1 + c, *slices[i]).movedim(1 + d, 0).unsqueeze(2 + d) for i in self.free_at]
            return [Rows(r, d) for r in rows]  # (R, V, *f with 1 at d)

        return rule

    def _by_vjp(self, leaf_grads: List[Optional[Tensor]], n: int) -> Cotangents:
        """G_f (N, V, *f) per free tensor: vmap over seeds of vmap over samples (each slice
        keeping a batch dimension of size 1) of the operation's VJP in its free inputs.

        A free tensor with one entry per sample along the dimension that an elementwise
        operation aligns with the batch (token type embeddings of ids expanded to (N, T)) is
        sliced per sample like the batched inputs: sample n's cotangent reaches its own entry,
        G_f[v, n] is zero elsewhere."""
        used = [(leaf, g) for leaf, g in zip(self.grad_leaves, [leaf_grads[i] for i in self.grad_leaves], strict=True)
                if g is not None]
        out_dims = dict(zip(self.grad_leaves, self.out_dims, strict=True))
        dims = list(self.dims)
        for i, d in self.aligned.items():
            dims[i] = d
        batched = [i for i, d in enumerate(dims) if d is not None]
        func, spec, free_at = self.func, self.spec, self.free_at
        flat = list(self.flat)
        for i, f in zip(free_at, self.free, strict=True):
            flat[i] = f.detach()
        inplace = in_place(func)

        def one(values, gs):
            sample = list(flat)
            for i, x in zip(batched, values, strict=True):
                sample[i] = x.unsqueeze(dims[i])
            primals = [sample[i] for i in free_at]

            def op(*free):
                filled = list(sample)
                if inplace and isinstance(filled[0], Tensor):  # written into: a copy made inside the transform
                    filled[0] = filled[0].clone()
                for i, f in zip(free_at, free, strict=True):
                    filled[i] = f
                args, kwargs = tree_unflatten(filled, spec)
                out = func(*args, **kwargs)
                leaves = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)] if not inplace else [args[0]]
                return [leaves[leaf] for leaf, _ in used]

            pull = vjp(op, *primals)[1]
            def seed(cs):
                return pull([c.unsqueeze(out_dims[leaf]) for c, (leaf, _) in zip(cs, used, strict=True)])

            return vmap(seed)(gs)

        per_row = vmap(one, in_dims=([dims[i] for i in batched], [1 + out_dims[leaf] for leaf, _ in used]))
        try:
            with autocast_as(self.autocast, self.device_type):
                got = per_row([flat[i] for i in batched], [g for _, g in used])  # per free (R, V, *f)
        except RuntimeError as error:
            raise JacextError(
                f"the per-sample VJP of {self.label()}, where a tensor computed without the batch meets "
                f"the batch, failed ({error}). Expand that tensor to the batch (for example position ids "
                "pos.expand(N, -1)) before the layer that computes it."
            ) from error
        return [
            Rows(g, self.aligned[i]) if i in self.aligned else _per_sample(g, self.rows, n)
            for g, i in zip(got, free_at, strict=True)
        ]


_UNBOUND = object()


def _rule_of_call(rec, inputs, g: Tensor):
    """(parameter, result) of a free call's rule (``rec``, a record of the tape's ``free_calls``)
    on ``inputs`` in place of the call's own and the cotangents ``g`` (V, R, *output)."""
    rec.check_unmodified()
    call = copy.copy(rec)
    call.args = inputs
    return [(rec.named[name], j) for name, j in apply_rule(call, [g]).items()]


def _diagonal(g: Tensor, d: int) -> Tensor:
    """G_f (R, V, *f with 1 at d) of a free tensor f with one entry per index r along its dim d
    (which the operation aligns with the batch) onto the diagonal: (R, V, *f), zero but where
    index r along d is r."""
    full = g.new_zeros(g.shape[0], g.shape[1], *g.shape[2 : 2 + d], g.shape[0], *g.shape[3 + d :])
    torch.diagonal(full, dim1=0, dim2=2 + d).copy_(g.squeeze(2 + d).movedim(0, -1))
    return full


def _per_sample(g: Tensor, rows: Optional[Tensor], n: int) -> Tensor:
    """``g`` (R, ...) per index along the batch dim, summed per sample: (N, ...)."""
    return g if rows is None else g.new_zeros(n, *g.shape[1:]).index_add_(0, rows.to(g.device), g)


def _folding(rows: Tensor, n: int) -> Optional[bool]:
    """How rows folded with another dim hold the ``n`` samples: in blocks (False: sample n's rows
    are n k, ..., n k + k - 1), interleaved (True: n, n + N, ...), or otherwise (None)."""
    k = rows.numel() // n
    if k * n != rows.numel():
        return None
    samples = torch.arange(n, device=rows.device)
    if torch.equal(rows.view(n, k), samples[:, None].expand(n, k)):
        return False
    if torch.equal(rows.view(k, n), samples.expand(k, n)):
        return True
    return None


def _by_sample(t: Tensor, dim: int, n: int, interleaved: bool) -> Tensor:
    """``t`` with the folded rows along ``dim`` as two dims: the samples, then each one's rows."""
    if interleaved:
        return t.unflatten(dim, (-1, n)).transpose(dim, dim + 1)
    return t.unflatten(dim, (n, -1))


def _aligned(name: str, flat, free: List[int], outputs: List[Tensor], out_dims) -> Dict[int, int]:
    """Free inputs with one entry per sample along the dimension that the operation aligns with
    the output's batch dimension: {flat index: that dimension}. Two kinds: inputs of an
    elementwise operation, aligned by broadcasting (token type embeddings of ids expanded to
    (N, T)); and inputs expanded to the batch along the output's batch dimension (stride 0:
    ``cls_token.expand(N, -1, -1)`` in a ``cat``), whose entries are one value, so that sample
    n's operation may take any of them: the expansion's backward sums them."""
    graded = [o for o in outputs if o.requires_grad]
    if len(graded) != 1:
        return {}
    out, d_out = graded[0], out_dims[0]
    broadcast = broadcast_shape([t.shape for t in flat if isinstance(t, Tensor)]) == out.shape
    elementwise = broadcast and name not in MATMULS | LAYER_FUNCTIONS | {"einsum"}  # (square factors broadcast too)
    found = {}
    for i in free:
        f = flat[i]
        d = d_out - (out.dim() - f.dim()) if elementwise else d_out
        if not 0 <= d < f.dim() or not f.shape[d] == out.shape[d_out] > 1:
            continue
        if elementwise or (f.dim() == out.dim() and f.stride(d) == 0):
            found[i] = d
    return found
