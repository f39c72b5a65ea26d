"""Following the batch: which dimension of each tensor holds which sample.

Every rule needs the samples of its layer's input. Where a model folds the batch with other
dimensions (``x.flatten(0, 1)``, window partitions), transposes it (a seq-first layer) or
calls a layer on tensors without one (``wpe(arange(T))``), the leading dimension is not the
batch, and guessing from sizes is silently wrong when they happen to agree (T = N). So while a
tape records, this tracker follows the batch from the extended module's inputs through every
operation the torch-function mode sees, and gives each tensor a :class:`Layout`:

* ``Layout(dim, rows)``: index i along ``dim`` belongs to sample ``rows[i]`` (``rows`` None:
  to sample i); no other dimension carries the batch;
* :class:`Opaque` (with the operation that made it): the values combine several samples (a
  reduction over the batch, ``h.mean(0)``, or a product contracting it), or come from an
  operation jacext does not know;
* no layout at all: the tensor does not depend on the batch.

How an operation moves the batch is read off the operation itself, in three ways:
elementwise operations (the output's shape is the broadcast of the inputs') keep it,
aligned from the right; operations that move values (views, permutations, indexing,
concatenation) are run once more on a probe whose values are each element's sample + 1,
and the output's probe says where every sample went (cached per signature of shapes, unless
indices or masks, whose values decide it, are among the arguments); reductions,
products and the layer functions are known by name. An operation outside all three gets
:class:`Opaque`; a layer called on such a tensor raises, naming the operation.

Writes move values too: a tensor made by a factory (``ids.new_zeros(ids.shape)``,
``torch.ones(N, T)``) has no batch until batched values are written into it
(``shifted[:, 1:] = ids[:, :-1]``, ``copy_``, ``index_put_``; integer values too, unlike
indices), then it has the batch where the write put it, a write into a view reaching its base.
"""

import weakref
from dataclasses import dataclass
from typing import AbstractSet, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from jacext.engine.meets import LAYER_FUNCTIONS as _ROWS
from jacext.engine.meets import MATMULS as _MATMULS
from jacext.engine.meets import broadcast_shape, in_place, op_name
from jacext.engine.trees import leaves
from jacext.errors import JacextError


@dataclass(frozen=True)
class Layout:
    """The batch of one tensor: along ``dim``, index i is sample ``rows[i]`` (None: sample i)."""

    dim: int
    rows: Optional[Tensor] = None

    def __eq__(self, other) -> bool:
        if not isinstance(other, Layout) or self.dim != other.dim:
            return False
        if self.rows is None or other.rows is None:
            return self.rows is other.rows
        return self.rows is other.rows or torch.equal(self.rows, other.rows)

    __hash__ = None  # type: ignore[assignment]

    def key(self) -> Tuple:
        return (self.dim, None if self.rows is None else tuple(self.rows.tolist()))


@dataclass(frozen=True)
class Opaque:
    """A tensor whose batch cannot be followed: ``what`` says why (the operation)."""

    what: str
    mixed: bool  # True: it combines samples; False: jacext does not know the operation
    inert: bool = False  # no gradient flows through it (a mask): a layer may take it beside its batch


_MOVES = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "movedim", "moveaxis",
    "swapaxes", "swapdims", "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "__getitem__",
    "narrow", "select", "split", "chunk", "unbind", "tensor_split", "cat", "concat", "concatenate", "stack",
    "roll", "flip", "repeat", "tile", "view_as", "reshape_as", "clone", "unfold", "pad", "index_select",
    "repeat_interleave", "split_with_sizes", "hsplit", "vsplit", "dsplit", "hstack", "vstack", "pixel_shuffle",
    "pixel_unshuffle", "channel_shuffle", "diagonal", "tril", "triu", "masked_select", "take_along_dim",
    "_pack_padded_sequence", "_pad_packed_sequence", "gather", "index_copy", "index_put", "scatter",
}
_KEEPS = {"to", "type", "float", "double", "half", "bfloat16", "detach", "cpu", "cuda", "requires_grad_"}
_REDUCES = {"sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "norm", "logsumexp", "nansum",
            "nanmean", "argmax", "argmin", "any", "all", "median", "count_nonzero", "std_mean", "var_mean"}
_ALONG = {"softmax", "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "sort", "argsort", "topk",
          "logcumsumexp", "normalize", "glu"}


class TensorMap:
    """Tensors, by identity and held weakly, to values: ``torch.utils.weak.WeakIdKeyDictionary``
    without the weak reference it makes at every lookup (the tracker looks up every tensor of
    every operation). An entry whose tensor has died stays until the map does (one forward
    pass's), and never answers for a new tensor that took its id."""

    __slots__ = ("_entries",)

    def __init__(self):
        self._entries: Dict[int, Tuple[weakref.ref, object]] = {}

    def get(self, t, default=None):
        entry = self._entries.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else default

    def __contains__(self, t) -> bool:
        entry = self._entries.get(id(t))
        return entry is not None and entry[0]() is t

    def __setitem__(self, t: Tensor, value) -> None:
        self._entries[id(t)] = (weakref.ref(t), value)

    def __bool__(self) -> bool:
        return bool(self._entries)


class BatchTracker:
    """The layouts of the tensors of one forward pass (held weakly), from its ``n`` samples."""

    _probed: Dict[tuple, object] = {}  # how a value-moving operation moves the batch, by signature

    def __init__(self, n: int):
        self.n = n
        self.tags = TensorMap()
        self.seeded: set = set()  # ids of the extended module's inputs (alive while it runs)
        # tensors computed by layers without the batch (their calls not recorded), and what
        # they were computed from: where one meets the batch, on_meet records the operation
        self.free = TensorMap()
        self.free_parameters: Dict[int, Tensor] = {}  # the trainable parameters free tensors are computed from
        self.on_meet: Optional[Callable] = None
        self.on_batch_statistics: Optional[Callable] = None  # batch_norm(training=True) on the batch: (args, kwargs)

    def seed(self, tensors, dim: int) -> None:
        """The extended module's inputs: those with ``n`` entries along ``dim`` are the batch."""
        for t in tensors:
            if self.is_batch_input(t, dim):
                self.tags[t] = Layout(dim)
                self.seeded.add(id(t))

    def is_batch_input(self, t, dim: int) -> bool:
        """Whether an input ``t`` of the extended module carries the batch along ``dim``."""
        return isinstance(t, Tensor) and t.dim() > dim and t.shape[dim] == self.n

    def declare(self, t: Tensor, dim: int) -> None:
        """A layer with its own layout flag (``batch_first=False``) is called on an input of the
        extended module itself: the flag says where that input's batch is."""
        if self.tags.get(t) == Layout(0) and id(t) in self.seeded and dim != 0 and t.dim() > dim:
            self.tags[t] = Layout(dim)

    def tag(self, t: Tensor) -> Optional[object]:
        return self.tags.get(t)

    def retag(self, before: List[Tensor], after: List[Tensor]) -> None:
        """``after[i]`` stands for ``before[i]`` (an alias, a fused node's output)."""
        for b, a in zip(before, after, strict=True):
            tag = self.tags.get(b)
            if a is not b and tag is not None:
                self.tags[a] = tag

    def mark_free(self, outputs: List[Tensor]) -> None:
        """Outputs of a layer called without the batch."""
        for o in outputs:
            if o.requires_grad:
                self.free[o] = True

    def _is_free(self, t, loose: AbstractSet[int]) -> bool:
        return isinstance(t, Tensor) and (id(t) in loose or (bool(self.free) and t in self.free))

    def before(self, func, args, kwargs, loose: AbstractSet[int] = frozenset()) -> Optional[Tensor]:
        """Before an in-place ``func`` that writes a free tensor into a batched one: a copy of
        the tensor written into (the meet needs the values it had). ``loose``: the ids of the
        parameters that are free in this operation (jacext.engine.uses)."""
        if not (self.free or loose) or not args or not isinstance(args[0], Tensor) or not in_place(func):
            return None
        flat = leaves((args, kwargs))
        if any(self._is_free(t, loose) for t in flat):
            return args[0].detach().clone()
        return None

    def held(self, args, kwargs, loose: AbstractSet[int], hold: Callable[[Tensor], Tensor]):
        """For an operation with free and batched inputs (a meet, if its outputs need a gradient):
        its arguments with ``hold(f)`` for each free ``f`` (jacext.engine.fused.HeldFree), and the
        ids of the free tensors; None for any other operation."""
        flat = leaves((args, kwargs))
        free = [i for i, t in enumerate(flat) if self._is_free(t, loose) and t.requires_grad]
        if not free or not any(isinstance(t, Tensor) and t in self.tags for t in flat):
            return None
        spec = tree_flatten((args, kwargs))[1]
        held = list(flat)
        for i in free:
            held[i] = hold(flat[i])
        return (*tree_unflatten(held, spec), {id(flat[i]) for i in free})

    def after(
        self,
        func,
        args,
        kwargs,
        out,
        written: Optional[Tensor] = None,
        loose: AbstractSet[int] = frozenset(),
        held: AbstractSet[int] = frozenset(),
    ) -> None:
        """Tag the tensors of ``out`` from the inputs of ``func`` (``written``, ``loose``: see
        :meth:`before`; ``held``: the ids of the free tensors the operation took through
        :meth:`held`)."""
        if kwargs or any(isinstance(a, (list, tuple, dict)) for a in args):
            flat = leaves((args, kwargs))
        else:  # the common call, without pytree's cost
            flat = list(args)
        tagged = [(t, self.tags.get(t)) for t in flat if isinstance(t, Tensor)]
        tagged = [(t, g) for t, g in tagged if g is not None]
        free = [i for i, t in enumerate(flat) if self._is_free(t, loose)] if self.free or loose else []
        if loose:
            self.free_parameters.update((id(t), t) for t in flat if id(t) in loose)
        if not tagged:
            if free:  # computed from free tensors only: free too
                self.mark_free([o for o in leaves(out) if isinstance(o, Tensor)])
            return
        name = op_name(func)
        if name == "batch_norm" and self.on_batch_statistics is not None:
            self.on_batch_statistics(args, kwargs)
        if name in {"__setitem__", "copy_"}:  # the batch written into args[0]
            out = args[0]
        outs = [o for o in ([out] if isinstance(out, Tensor) else leaves(out)) if isinstance(o, Tensor)]
        if not outs:
            return
        live = [(t, g) for t, g in tagged if not (isinstance(g, Opaque) and g.inert)]  # inert: indices, masks
        opaque = [g for _, g in live if isinstance(g, Opaque)]
        if name == "embedding_bag" and flat[0].dim() == 1 and not any(g.mixed for g in opaque):
            tag: object = _bags(outs, self.n)  # the tokens' own layout may be ambiguous (all bags empty)
        elif opaque:
            tag = opaque[0]
        elif not live:
            tag = tagged[0][1]
        else:
            tag = self._infer(func, name, args, kwargs, live, outs)
        if not any(o.requires_grad for o in outs):  # mixing values without gradients couples no derivative
            tag = [_inert(g) for g in tag] if isinstance(tag, list) else _inert(tag)
        elif isinstance(tag, Opaque) and tag.inert:
            tag = Opaque(tag.what, tag.mixed)
        if isinstance(tag, list):
            for o, g in zip(outs, tag, strict=True):
                if g is not None:
                    self.tags[o] = g
        else:
            for o in outs:
                self.tags[o] = tag
        if in_place(func) and isinstance(args[0], Tensor) and args[0]._base is not None:
            self._write_through(args[0], args[0]._base, name)
        if free and any(o.requires_grad for o in outs):
            flat, spec = tree_flatten((args, kwargs))
            self._meet(func, name, flat, spec, free, outs, written, all(id(flat[i]) in held for i in free))

    def _write_through(self, view: Tensor, base: Tensor, name: str) -> None:
        """``name`` wrote into ``view`` in place, and so into its ``base``: the base's layout,
        from its probe with the view's written where the view lies in its memory (a shift into a
        fresh tensor, ``shifted[:, 1:].copy_(ids[:, :-1])``)."""
        tag = self.tags.get(view)
        if isinstance(self.tags.get(base), Opaque):
            return
        if not isinstance(tag, Layout):
            if tag is not None:
                self.tags[base] = tag
            return
        try:
            probe = torch.empty_strided(base.shape, base.stride(), dtype=torch.float64, device=base.device)
            probe.copy_(self._probe_of(base, True))
            at = view.storage_offset() - base.storage_offset()
            probe.as_strided(view.shape, view.stride(), at).copy_(self._probe_of(view, True))
        except _Stale:
            self.tags[base] = Opaque(f"{name} on a tensor changed in place since its batch was read", mixed=False)
            return
        base_tag = self.tags.get(base)
        prior = base_tag.dim if isinstance(base_tag, Layout) else tag.dim if view.dim() == base.dim() else 0
        read = _read(probe, name, prior, self.n)
        if read is not None:
            self.tags[base] = read

    def _meet(self, func, name, flat, spec, free, outs, written, held: bool) -> None:
        """A free tensor meets the batch in ``func``: where the batch is in every input and
        output, for :attr:`on_meet` (``held``: every free input went through ``hold``)."""
        if written is not None:
            if 0 in free:
                raise JacextError(
                    f"{name} writes batched values into a tensor computed without the batch (such as a "
                    "positional embedding); jacext cannot separate the samples there. Use an out-of-place "
                    "operation (pos = pos + x)."
                )
        tags = [self.tags.get(t) if isinstance(t, Tensor) and i not in free else None for i, t in enumerate(flat)]
        if written is not None:
            flat = [written, *flat[1:]]  # the values before the operation wrote into it
        out_tags = [self.tags.get(o) for o in outs]
        layouts = [g for g in tags + out_tags if g is not None]
        aligned = all(isinstance(g, Layout) for g in layouts) and all(
            _same_rows(g.rows, layouts[0].rows) for g in layouts
        )
        if not aligned:
            raise JacextError(
                f"a tensor computed without the batch (such as a positional embedding) meets the batch in "
                f"{name}, whose inputs and outputs do not keep the samples in one dimension, in one order; "
                "jacext cannot separate the samples' derivatives there. Expand the tensor to the batch "
                "(for example position ids pos.expand(N, -1)) before the layer that computes it."
            )
        if self.on_meet is not None:
            dims = [g.dim if isinstance(g, Layout) else None for g in tags]
            out_dims = [g.dim for g, o in zip(out_tags, outs, strict=True) if o.requires_grad]
            self.on_meet(func, flat, spec, free, outs, dims, out_dims, layouts[0].rows, held)

    def _infer(self, func, name, args, kwargs, tagged, outs):
        layouts = [(t, g) for t, g in tagged]
        if all(o.dim() == 0 for o in outs):
            return Opaque(f"{name} reducing the batch to a scalar", mixed=True)
        if name in _FACTORIES:
            return [None] * len(outs) if len(outs) > 1 else None
        if name in _KEEPS and len(outs) == 1 and outs[0].shape == layouts[0][0].shape:
            return layouts[0][1]
        if name in _PERMUTES and layouts[0][0] is args[0] and len(outs) == 1:
            moved = _permuted(name, args, kwargs, layouts[0][1], args[0].dim(), outs[0].dim())
            if moved is not None:
                return moved
        if name in _MOVES or name in _KEEPS or name in {"__setitem__", "copy_"}:
            moved = self._probe(func, name, args, kwargs, outs)
            if moved is None and name == "__setitem__":  # no batched value written: where, by the index
                return _written_where(args, layouts)
            return moved
        if name in _REDUCES or name in _ALONG:
            return _reduced(name, args, kwargs, layouts, outs)
        if name in _MATMULS:
            return _matmul(name, args, layouts, outs)
        if name == "einsum":
            return _einsum(args, layouts, outs)
        # layer functions whose arguments may broadcast by chance (sizes all equal): before the shapes
        if name == "multi_head_attention_forward":  # (output like the query, weights (N, L, S))
            return [Layout(layouts[0][1].dim, layouts[0][1].rows)] + [Layout(0, layouts[0][1].rows)] * (len(outs) - 1)
        if name in {"lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"} and layouts[0][0] is args[0]:
            g = layouts[0][1]
            return [Layout(g.dim, g.rows)] * len(outs) if len(outs) > 1 else Layout(g.dim, g.rows)
        if name in {"lstm", "gru", "rnn_tanh", "rnn_relu"}:
            return _recurrent(name, args, layouts[0], outs)
        out = outs[0]
        shapes = [t.shape for t in leaves((args, kwargs)) if isinstance(t, Tensor)]
        elementwise = len(outs) == 1 and broadcast_shape(shapes) == out.shape
        if elementwise:
            dims = {(out.dim() - t.dim() + g.dim) for t, g in layouts}
            rows = [g.rows for _, g in layouts]
            if len(dims) == 1 and all(Layout(0, r) == Layout(0, rows[0]) for r in rows):
                return Layout(dims.pop(), rows[0])
            return Opaque(f"{name} combining tensors whose batch dimensions differ", mixed=True)
        if name in _ROWS:
            t, g = layouts[0]
            if g.dim == 0 or name in {"linear", "embedding", "layer_norm", "rms_norm", "one_hot"}:
                d = g.dim if out.dim() >= t.dim() else None
                if d is not None and out.shape[d] == t.shape[d]:
                    return Layout(d, g.rows)
            return Opaque(f"{name} on an input whose batch is in dimension {g.dim}", mixed=False)
        return _unique_size(name, layouts[0], outs)

    def _probe(self, func, name, args, kwargs, outs):
        """Run ``func`` on probes (sample + 1 per element, 0 where no sample) and read where
        each output's samples went."""
        flat = leaves((args, kwargs))
        values = _moved_values(name, args, kwargs)
        key = (func, self.n, tuple(_signature(a, self.tags.get(a) if isinstance(a, Tensor) else None) for a in flat))
        # the signature holds shapes, not values: integer and boolean tensors beside the data
        # (indices, masks, the lengths of packed sequences) move the batch by their values
        cacheable = all(not isinstance(a, Tensor) or i in values or _probed_by_sample(a) for i, a in enumerate(flat))
        try:
            hash(key)
        except TypeError:
            cacheable = False
        if cacheable and key in self._probed:
            return self._probed[key]
        try:
            probes = [self._probe_of(a, i in values) if isinstance(a, Tensor) else a for i, a in enumerate(flat)]
        except _Stale:
            return Opaque(f"{name} on a tensor changed in place since its batch was read", mixed=False)
        p_args, p_kwargs = tree_unflatten(probes, tree_flatten((args, kwargs))[1])
        with torch.no_grad():
            out = func(*p_args, **p_kwargs)
        if name in {"__setitem__", "copy_"}:
            out = probes[0]
        results = [o for o in ([out] if isinstance(out, Tensor) else leaves(out)) if isinstance(o, Tensor)]
        data = next((t, g) for t in flat if isinstance(t, Tensor) for g in [self.tags.get(t)] if isinstance(g, Layout))
        if any(p.numel() == 0 for p in results):  # nothing to read: where the batch's size is
            return _unique_size(name, data, outs)
        dims = [_PACKED[name](args)] + [None] * (len(results) - 1) if name in _PACKED else [None] * len(results)
        tags = [_read(p, name, data[1].dim, self.n, d) for p, d in zip(results, dims, strict=True)]
        result = tags[0] if len(tags) == 1 else tags
        if cacheable:
            self._probed[key] = result
        return result

    def _probe_of(self, t: Tensor, data: bool) -> Tensor:
        """``t``'s probe; integer and boolean tensors that are not the operation's data (indices,
        masks) stay as they are, and may not depend on the batch."""
        g = self.tags.get(t)
        floating = _probed_by_sample(t)
        if not (floating or data):  # indices and masks move the probe as they move the data
            return t
        dtype = torch.float64 if floating else torch.int64
        if not isinstance(g, Layout):
            return torch.zeros(t.shape, dtype=dtype, device=t.device)
        if g.dim >= t.dim() or (g.rows is not None and g.rows.numel() != t.shape[g.dim]):
            raise _Stale()
        ids = torch.arange(t.shape[g.dim], device=t.device) if g.rows is None else g.rows.to(t.device)
        ids = ids + _ID
        shape = [1] * t.dim()
        shape[g.dim] = -1
        return ids.to(dtype).view(shape).expand(t.shape).contiguous()


_FACTORIES = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like", "ones_like",
              "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
_PERMUTES = {"transpose", "swapaxes", "swapdims", "t", "permute", "movedim", "moveaxis", "unsqueeze", "squeeze"}


def _permuted(name, args, kwargs, g: Layout, ndim: int, out_ndim: int) -> Optional[object]:
    """Where a permutation of dimensions (or an added or removed one) puts the batch, from its
    arguments alone (values cannot tell a batch of one sample from other dimensions of size 1)."""
    rest = list(args[1:]) + list(kwargs.values())
    ints = [a for a in rest if isinstance(a, int)]
    seqs = [a for a in rest if isinstance(a, (list, tuple))]
    order = list(range(ndim))
    if name in {"transpose", "swapaxes", "swapdims", "t"}:
        a, b = (ints[0] % ndim, ints[1] % ndim) if len(ints) == 2 else (0, 1)
        if ndim < 2:
            return g
        order[a], order[b] = order[b], order[a]
    elif name == "permute":
        dims = seqs[0] if seqs else ints
        order = [d % ndim for d in dims]
    elif name in {"movedim", "moveaxis"}:
        if len(seqs) == 2:
            src, dst = [d % ndim for d in seqs[0]], [d % ndim for d in seqs[1]]
        elif len(ints) == 2:
            src, dst = [ints[0] % ndim], [ints[1] % ndim]
        else:
            return None
        kept = [d for d in range(ndim) if d not in src]
        order = [-1] * ndim
        for s_, d_ in zip(src, dst, strict=True):
            order[d_] = s_
        it = iter(kept)
        order = [o if o >= 0 else next(it) for o in order]
    elif name == "unsqueeze":
        d = ints[0] % (ndim + 1) if ints else None
        return None if d is None else Layout(g.dim + (1 if d <= g.dim else 0), g.rows)
    elif name == "squeeze":
        if out_ndim == ndim:
            return g
        if not ints and not seqs:
            return None  # which size-1 dims went: the probe tells
        gone = {d % ndim for d in (seqs[0] if seqs else ints)}
        if g.dim in gone:
            return Opaque("squeeze of the batch dimension", mixed=False)
        return Layout(g.dim - sum(1 for d in gone if d < g.dim), g.rows)
    if len(order) != ndim:
        return None
    return Layout(order.index(g.dim), g.rows)


# the argument (position, keyword) of a value-moving operation that holds values it writes
# beside its data, the first argument: integers there are values too (token ids shifted into a
# fresh tensor, shifted[:, 1:] = ids[:, :-1]), not indices
_SOURCES = {"__setitem__": (2, "value"), "copy_": (1, "src"), "index_put": (2, "values"), "index_put_": (2, "values"),
            "index_copy": (3, "source"), "index_copy_": (3, "source"), "scatter": (3, "src"), "scatter_": (3, "src"),
            "masked_scatter": (2, "source"), "masked_scatter_": (2, "source")}


def _moved_values(name: str, args, kwargs) -> AbstractSet[int]:
    """The positions, in ``tree_flatten((args, kwargs))``, of the tensors whose values ``name``
    moves: the first argument (all tensors of a list there: ``cat``) and the values it writes;
    the other integer and boolean tensors are indices and masks."""
    at, key = _SOURCES.get(name, (0, None))
    moved = [(j in (0, at), a) for j, a in enumerate(args)] + [(k == key, v) for k, v in kwargs.items()]
    found: set = set()
    i = 0
    for values, a in moved:
        n = len(leaves(a))
        if values:
            found.update(range(i, i + n))
        i += n
    return found


def _probed_by_sample(t: Tensor) -> bool:
    """Whether a tensor beside an operation's data gets a probe (floating point: values), rather
    than moving the probe by its own values (integers and booleans: indices, masks)."""
    return t.is_floating_point() or t.is_complex()


class _Stale(Exception):
    """A tensor's recorded layout no longer fits its shape (an in-place resize)."""


def _written_where(args, layouts) -> object:
    """``x[index] = v`` without batched values, at places an index that depends on the batch
    chooses: a boolean mask over x's leading dimensions differs per sample along its batch
    dimension, and so does x (``mask[ids == pad] = 0``, as ``masked_fill_``); other indices are
    not followed."""
    index = args[1]
    for t, g in layouts:
        if t is index and t.dtype == torch.bool and t.shape == args[0].shape[: t.dim()] and isinstance(g, Layout):
            return Layout(g.dim, g.rows)
    return Opaque("__setitem__ at places that depend on the batch", mixed=False)


def _inert(tag):
    return Opaque(tag.what, tag.mixed, inert=True) if isinstance(tag, Opaque) else tag


def _unique_size(name, first, outs):
    """An operation jacext does not know: the batch is where an output has the batch's size,
    if exactly one of its dimensions has it; otherwise the sizes are ambiguous."""
    t, g = first
    if g.rows is not None:
        return Opaque(f"{name} on a tensor whose batch is folded with another dimension", mixed=False)
    tags = []
    for o in outs:
        dims = [d for d in range(o.dim()) if o.shape[d] == t.shape[g.dim]]
        tags.append(Layout(dims[0]) if len(dims) == 1 else Opaque(f"{name} (sizes ambiguous)", mixed=False))
    return tags[0] if len(tags) == 1 else tags


def _bags(outs, n: int) -> list:
    """EmbeddingBag on flat indices with offsets: one bag per sample, whatever the tokens' layout."""
    if outs[0].shape[0] != n:
        return [Opaque("embedding_bag with other than one bag per sample", mixed=False)] + [None] * (len(outs) - 1)
    return [Layout(0)] + [None] * (len(outs) - 1)


def _recurrent(name, args, first, outs):
    """torch's recurrent kernels: the output like the input, the states (layers, N, H) in the
    order of the input's batch, or for packed data (``args[1]``: the batch sizes) in the order
    of its first time step."""
    t, g = first
    if t is not args[0]:
        return Opaque(f"{name} with states that depend on the batch but an input that does not", mixed=False)
    rows = g.rows
    packed = isinstance(args[1], Tensor) and args[1].dim() == 1 and not args[1].is_floating_point()
    if packed:
        n = int(args[1][0])
        rows = torch.arange(n) if rows is None else rows[:n]
    states = _canonical(rows)
    return [Layout(g.dim, g.rows)] + [Layout(1 if o.dim() == 3 else 0, states) for o in outs[1:]]


def _canonical(rows: Optional[Tensor]) -> Optional[Tensor]:
    """None where ``rows`` is 0, 1, ..., N - 1."""
    if rows is None or torch.equal(rows, torch.arange(rows.numel(), device=rows.device)):
        return None
    return rows


def _signature(a, tag):
    if isinstance(a, Tensor):
        return ("T", tuple(a.shape), a.dtype, a.is_contiguous(), tag.key() if isinstance(tag, Layout) else None)
    if isinstance(a, slice):
        return ("S", a.start, a.stop, a.step)
    return a


_ID = 2**30  # probe value of sample 0; values below are no sample's (zeros, padding constants)


# where the packing of sequences puts the batch (args[2]: batch_first): the probe of a single
# sample cannot tell the packed rows (T, F) of a fold from a feature dim of size 1
_PACKED = {"_pack_padded_sequence": lambda args: 0, "_pad_packed_sequence": lambda args: 0 if args[2] else 1}


def _read(p: Tensor, name: str, prior: int, n: int, dim: Optional[int] = None):
    """The layout a probe shows: the one dimension along which the samples vary (``dim``: the
    one the operation is known to put them in; ``prior``: the batch dimension of its data; ``n``:
    the batch size). Indices along it that hold no sample's values (constants) are their own
    sample's where every other index holds its own sample (a fresh tensor of the batch's shape
    written for some samples, ``buf[:2] = x[:2]``); among other orders they are refused."""
    p = p.to(torch.float64)
    p = torch.where((p >= _ID) & (p == p.round()), p - (_ID - 1), 0.0)
    if p.numel() == 0 or not bool((p > 0).any()):
        return None
    candidates = []
    for d in range(p.dim()) if dim is None else [dim]:
        others = [i for i in range(p.dim()) if i != d]
        hi = p.amax(dim=others) if others else p
        lo = torch.where(p > 0, p, torch.inf).amin(dim=others) if others else p
        if bool(((hi == lo) | (hi == 0)).all()):
            present = hi[hi > 0]
            distinct = int(present.unique().numel())
            # most samples told apart; then one index per sample (a single sample is in every
            # dimension of its values; the batch is where it has one index, else folded where
            # it was: x.reshape(-1, F))
            candidates.append(((distinct, distinct == present.numel(), d == prior, present.numel(), -d), d, hi))
    if not candidates:
        return Opaque(f"{name} spreading the batch over several dimensions", mixed=False)
    _, d, hi = max(candidates, key=lambda c: c[0])
    rows = hi.long() - 1
    if bool((rows < 0).any()):
        own = torch.arange(rows.numel(), device=rows.device)
        if rows.numel() == n and bool(((rows == own) | (rows < 0)).all()):
            return Layout(d)
        return Opaque(f"{name} moving samples into the rows of others, beside rows without a sample", mixed=True)
    return Layout(d, _canonical(rows))


def _dims_arg(name, args, kwargs):
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], Tensor) else None)
    if name in {"normalize"}:
        dim = kwargs.get("dim", args[2] if len(args) > 2 else 1)
    if name == "glu":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else -1)
    return dim


def _reduced(name, args, kwargs, layouts, outs):
    t, g = layouts[0]
    if not isinstance(g, Layout) or t is not args[0]:
        return Opaque(name, mixed=False)
    dim = _dims_arg(name, args, kwargs)
    ndim = t.dim()
    dims = set(range(ndim)) if dim is None else {d % ndim for d in ((dim,) if isinstance(dim, int) else dim)}
    if g.dim in dims:
        return Opaque(f"{name} over the batch dimension", mixed=True)
    keep = name in _ALONG or kwargs.get("keepdim", False) or (len(args) > 2 and args[2] is True)
    d = g.dim if keep else g.dim - sum(1 for i in dims if i < g.dim)
    return [Layout(d, g.rows) if o.dim() > d else None for o in outs]


def _matmul(name, args, layouts, outs):
    """Matrix products: the batch stays in a broadcast dimension or in the rows of the left
    factor (the columns of the right one); contracted, it is mixed."""
    out = outs[0]
    a, b = (args[1], args[2]) if name in {"baddbmm", "addmm", "addbmm"} else (args[0], args[1])
    if name == "__rmatmul__":
        a, b = b, a
    dims = set()
    for t, g in layouts:
        if t is not a and t is not b:
            dims.add(out.dim() - t.dim() + g.dim)  # the added term, broadcast
            continue
        d = g.dim - t.dim()  # from the right
        if t.dim() == 1 or (t is a and d == -1) or (t is b and d == -2):
            return Opaque(f"{name} contracting the batch dimension", mixed=True)
        dims.add(out.dim() + d)
    if len(dims) != 1:
        return Opaque(f"{name} of factors whose batch dimensions differ", mixed=True)
    return Layout(dims.pop(), layouts[0][1].rows)


def _einsum(args, layouts, outs):
    equation = args[0].replace(" ", "")
    operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    ins, _, out_letters = equation.partition("->")
    terms = ins.split(",")
    found = set()
    for t, g in layouts:
        i = next(i for i, o in enumerate(operands) if o is t)
        letters = terms[i]
        if "." in letters:
            return Opaque("einsum with an ellipsis", mixed=False)
        letter = letters[g.dim]
        if letter not in out_letters:
            return Opaque("einsum contracting the batch dimension", mixed=True)
        found.add(out_letters.index(letter))
    if len(found) != 1:
        return Opaque("einsum of operands whose batch dimensions differ", mixed=True)
    return Layout(found.pop(), layouts[0][1].rows)




@dataclass
class Placement:
    """Where one recorded call's rule finds its samples.

    ``in_dims``: the batch dimension of each tensor input (flattened as ``tree_flatten((args,
    kwargs))``; None where it has none), ``out_dims`` that of each output leaf with a
    gradient; ``move``: the rule reads the batch from dim 0, where these dims move it
    (``leading`` layers in a seq-first model); ``rows``: the sample of each row of the rule's
    results (None: row i is sample i), summed per sample afterwards."""

    in_dims: List[Optional[int]]
    out_dims: List[int]
    move: bool = False
    rows: Optional[Tensor] = None
    plain: bool = False  # the batch where the rule reads it, one row per sample: results as they are
    free: bool = False  # called without the batch: not recorded (see jacext.engine.meets)


def place(
    tracker: BatchTracker, module, layer, label: str, args, flat_inputs: List, outputs: List[Tensor]
) -> Placement:
    """The :class:`Placement` of a call of ``module`` (what jacext knows of it: ``layer``) on
    ``args`` (``flat_inputs``: every tensor of its arguments) returning ``outputs`` (those with
    a gradient), or a :class:`JacextError` that names the module and what to do.

    The layout a call departs from (the batch leading, one row per sample) only where the
    tracker is sure: no input depends on the batch (``free``), the samples moved to another
    dimension (``move``, or an error for layers with a layout flag), or folded with another
    dimension in order (``rows``). An input whose batch the tracker cannot follow but that
    mixes no samples leaves the rule to read its leading dimension, as it always has."""
    # the leading dimension of the tensors of N entries, as the generic rule reads it by default
    leading = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == tracker.n else None for t in flat_inputs]
    plain = Placement(leading, [0] * len(outputs), plain=True)
    if layer.rule is not None and args and not isinstance(args[0], Tensor):  # PackedSequence: the rule's own
        return plain
    tags = [tracker.tag(t) if isinstance(t, Tensor) else None for t in flat_inputs]
    mixed = next((g for g in tags if isinstance(g, Opaque) and g.mixed and not g.inert), None)
    if mixed is not None:
        _refuse_opaque(label, mixed)
    if all(g is None for g in tags) or all(tracker.tag(o) is None for o in outputs):
        # a value shared by all samples (also from batched inputs read for their shape only,
        # positions(ids) -> arange(T)): its derivatives separate where it meets the batch
        return Placement([], [], free=True)
    first = next((i for i, t in enumerate(flat_inputs) if isinstance(t, Tensor)), None)
    if tracker.n == 1 and layer.rule is not None and first is not None:
        return _one_sample(layer, module, flat_inputs[first], plain)
    lead = tags[first] if first is not None else None
    if first is None or not isinstance(lead, Layout):
        return plain
    rows = lead.rows
    if rows is not None and not _folded(rows, tracker.n, flat_inputs[first].shape[lead.dim]):  # bags, packing
        return plain
    in_dims = [g.dim if isinstance(g, Layout) and _same_rows(g.rows, rows) else None for g in tags]
    out_dims = [_out_dim(tracker, o, lead.dim) for o in outputs]
    without = next((o for o in outputs if tracker.tag(o) is None), None)
    if without is not None:
        raise JacextError(
            f"module {label} returns outputs that hold the batch and one that does not (shape "
            f"{tuple(without.shape)}, computed without the batch); jacext cannot differentiate such a call "
            "per sample. Compute the batch-free output in a call of its own (a submodule), or detach it."
        )
    if layer.rule is None:  # the generic rule takes every dim as it is
        plain_dims = rows is None and all(d in (0, None) for d in in_dims) and all(d == 0 for d in out_dims)
        return Placement(in_dims, out_dims, rows=rows, plain=plain_dims)
    expected = layer.batch_dim(module) if layer.batch_dim is not None else 0
    if lead.dim == expected:
        return Placement(in_dims, out_dims, rows=rows, plain=rows is None) if rows is not None else plain
    if layer.leading and expected == 0:
        return Placement(in_dims, out_dims, move=True, rows=rows)
    raise JacextError(
        f"module {label} receives the batch in dimension {lead.dim} of its input, but its rule reads it from "
        f"dimension {expected}. Call it with the batch where the layer expects it (batch_first), or "
        "move the batch there (x.transpose(0, 1)) before the call."
    )


def _one_sample(layer, module, x: Tensor, plain: Placement) -> Placement:
    """A batch of one sample: every index of every dimension of ``x`` is that sample's, and the
    probes cannot tell which dimension would hold more (the rows of packed sequences, a seq-first
    stack, a fold with a dim of size 1 look alike). The rule reads its batch where it expects
    it; its rows are all the sample's, and their results summed are its result."""
    expected = layer.batch_dim(module) if layer.batch_dim is not None else 0
    size = x.shape[expected] if x.dim() > expected else 1
    if size <= 1:  # (0: the flat tokens of empty bags, whose rule reads the offsets)
        return plain
    return Placement(plain.in_dims, plain.out_dims, rows=torch.zeros(size, dtype=torch.long, device=x.device))


def _folded(rows: Tensor, n: int, size: int) -> bool:
    """Rows the results can be summed back from: every sample, either folded in order with
    another dimension (each in one block) or permuted (one row each)."""
    if rows.numel() != size or rows.numel() == 0 or int(rows.min()) != 0 or int(rows.max()) != n - 1:
        return False
    if rows.unique().numel() != n:
        return False
    return rows.numel() == n or bool((rows[1:] >= rows[:-1]).all())


def _same_rows(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    return Layout(0, a) == Layout(0, b)


def _out_dim(tracker: BatchTracker, o: Tensor, default: int) -> int:
    tag = tracker.tag(o)
    return tag.dim if isinstance(tag, Layout) else default


def _refuse_opaque(label: str, opaque: Opaque) -> None:
    if opaque.mixed:
        raise JacextError(
            f"the input of module {label} combines several samples ({opaque.what}), so its per-sample "
            "derivatives are not defined; jacext needs every sample's values computed from that sample "
            "alone (for BatchNorm, choose jacext.extend(model, batchnorm=...))."
        )
    raise JacextError(
        f"jacext cannot follow the batch dimension to the input of module {label}: it went through "
        f"{opaque.what}. Register how that operation moves the batch, or compute the input with "
        "operations that keep the batch in one dimension."
    )
