"""RNN, LSTM, GRU and their cells: every parameter enters through an affine map per time step.

For each layer and direction, at every time step t (gates stacked along the last
dimension, in PyTorch's order: LSTM i, f, g, o; GRU r, z, n):

    a_t = W_ih x_t + b_ih         x_t: the layer's input
    b_t = W_hh h_{t-1} + b_hh     h_{t-1}: the previous hidden state (projected if proj_size > 0)
    p_t = W_hr m_t                LSTM with proj_size > 0: m_t = o_t * tanh(c_t), h_t = p_t

The recurrence never mixes samples, so with A, B, P the cotangents of a_t, b_t, p_t
(everything later steps and layers make of them, for seed v),

    J_W_ih[n, v] = sum_t A_t[v, n] x_t[n]^T        J_b_ih[n, v] = sum_t A_t[v, n]
    J_W_hh[n, v] = sum_t B_t[v, n] h_{t-1}[n]^T    J_b_hh[n, v] = sum_t B_t[v, n]
    J_W_hr[n, v] = sum_t P_t[v, n] m_t[n]^T

The rule recomputes the forward pass from the recorded inputs with PyTorch's formulas
(GRU: n_t = tanh(a_n + r_t * b_n), h_t = (1 - z_t) n_t + z_t h_{t-1}), on V copies of
the batch, one per seed (batch row v * N + n), so that one ordinary backward of the
recomputed outputs with the seeds' cotangents gives every A, B, P at once: cheaper
than a vmapped backward over many small steps, with the same V-fold memory. In a
packed sequence a sample's state is carried unchanged past its length, so its
cotangents there are zero. Dropout between layers (train mode) draws masks jacext
cannot see: refused.
"""

from typing import Any, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from jacext.errors import JacextError
from jacext.rules import register, trainable
from jacext.rules.util import as_run, replaying


class _Affine(NamedTuple):
    """One parameterised map y = W u + b of the recurrence, with its inputs u and outputs y
    as computed: one (T, B, .) tensor each, or one (B, .) tensor per time step."""

    weight: str
    bias: Optional[str]
    inputs: List[Tensor]
    outputs: List[Tensor]

    def __call__(self, weights: Dict[str, Tensor], u: Tensor) -> Tensor:
        y = F.linear(u, weights[self.weight], weights[self.bias] if self.bias else None)
        self.inputs.append(u)
        self.outputs.append(y)
        return y


def _maps(module: nn.Module, suffix: str, kinds=("ih", "hh")) -> List[_Affine]:
    """The maps ``weight_{kind}{suffix}`` with ``bias_{kind}{suffix}`` if the module has biases
    (the projection ``hr`` never has one)."""
    bias = lambda k: f"bias_{k}{suffix}" if module.bias and k != "hr" else None  # noqa: E731
    return [_Affine(f"weight_{k}{suffix}", bias(k), [], []) for k in kinds]


def _step(mode: str, a: Tensor, b: Tensor, h: Tensor, c: Any):
    """The new hidden state (before any projection) and cell state (None but for LSTM)
    from the pre-activations a = W_ih x + b_ih and b = W_hh h + b_hh."""
    if mode == "LSTM":
        i, f, g, o = (a + b).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        a_r, a_z, a_n = a.chunk(3, -1)
        b_r, b_z, b_n = b.chunk(3, -1)
        r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
        return (1 - z) * torch.tanh(a_n + r * b_n) + z * h, None
    return (torch.tanh if mode == "RNN_TANH" else torch.relu)(a + b), None


def _tile(t: Any, dim: int, v: int) -> Any:
    """``v`` copies of ``t`` along its batch dimension ``dim``: row ``i * N + n`` is sample n."""
    return None if t is None else t.repeat(*(v if d == dim else 1 for d in range(t.dim())))


def _fold(g: Optional[Tensor], dim: int) -> Optional[Tensor]:
    """Cotangents (V, *leaf) to the leaf's shape with the V seeds folded into its batch
    dimension ``dim`` as by ``_tile``: row ``v * N + n``."""
    return None if g is None else g.movedim(0, dim).flatten(dim, dim + 1)


def _unfold(t: Tensor, v: int) -> Tensor:
    """(..., V * N, d) with rows ``v * N + n`` to (T, V, N, d), T the product of the leading dims."""
    return t.reshape(-1, v, t.shape[-2] // v, t.shape[-1])


def _jacobians(module: nn.Module, outputs, cotangents, affines: List[_Affine], v: int) -> Dict[str, Tensor]:
    """Pull the folded ``cotangents`` of the recomputed, tiled ``outputs`` back to every affine
    map with a trainable parameter (one ordinary backward) and contract with the map's inputs."""
    wanted = [m for m in affines if trainable(module, m.weight) or (m.bias and trainable(module, m.bias))]
    pairs = [(o, g) for o, g in zip(outputs, cotangents, strict=True) if g is not None]
    if not wanted or not pairs:
        return {}
    ys = [y for m in wanted for y in m.outputs]
    outputs, cotangents = zip(*pairs, strict=True)
    grads = torch.autograd.grad(outputs, ys, cotangents, allow_unused=True, materialize_grads=True)
    out, i = {}, 0
    for m in wanted:
        gs, i = grads[i : i + len(m.outputs)], i + len(m.outputs)
        g = torch.cat([_unfold(g, v) for g in gs])
        u = as_run(torch.cat([_unfold(u.detach(), v) for u in m.inputs]), g)  # as the map's autocast cast it
        if trainable(module, m.weight):
            out[m.weight] = torch.einsum("tvno,tvni->nvoi", g, u)
        if m.bias and trainable(module, m.bias):
            out[m.bias] = g.sum(0).transpose(0, 1)
    return out


def _detached_weights(module: nn.Module) -> Dict[str, Tensor]:
    """The parameters as fresh leaves that require grad, so the recomputation builds a graph."""
    return {name: p.detach().requires_grad_() for name, p in module.named_parameters(recurse=False)}


def _time_major(module: nn.Module, x):
    """The input as (T, N, in) in the caller's sample order, the (T, N, 1) mask of the steps
    each sample has (None unless packed), and for a packed sequence the rows of the
    flattened (T * N) grid in the order of the packed data (None otherwise)."""
    if isinstance(x, PackedSequence):
        padded, lengths = pad_packed_sequence(x)
        padded = padded.detach()
        t, n = padded.shape[:2]
        steps = torch.arange(t).unsqueeze(1)
        order = torch.arange(n) if x.sorted_indices is None else x.sorted_indices.cpu()
        rows = torch.arange(t * n).view(t, n)[:, order][steps < lengths[order]]
        mask = (steps < lengths).unsqueeze(-1)
        return padded, mask.to(padded.device), rows.to(padded.device)
    if x.dim() != 3:
        raise JacextError(
            f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}; per-sample "
            f"quantities need a batch dimension: input of shape {'(N, T, in)' if module.batch_first else '(T, N, in)'}"
            " and hidden states of shape (layers * directions, N, hidden)."
        )
    return (x.transpose(0, 1) if module.batch_first else x), None, None


def _run(module: nn.RNNBase, x: Any, h0: Any, c0: Any, mask: Any):
    """PyTorch's multi-layer recurrence on time-major ``x``: the output (T, B, directions * hidden),
    the final states ([h_n] or [h_n, c_n]) and the affine maps it applied."""
    lstm, proj = module.mode == "LSTM", module.proj_size > 0
    directions = 2 if module.bidirectional else 1
    weights = _detached_weights(module)
    affines: List[_Affine] = []
    h_n: List[Tensor] = []
    c_n: List[Any] = []
    layer_input = x
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            ih, hh, hr = _maps(module, f"_l{layer}" + ("_reverse" if direction else ""), ("ih", "hh", "hr"))
            affines += [ih, hh, hr] if proj else [ih, hh]
            a = ih(weights, layer_input)
            h = h0[layer * directions + direction]
            c: Any = c0[layer * directions + direction] if lstm else None
            out: List[Any] = [None] * len(x)
            for t in reversed(range(len(x))) if direction else range(len(x)):
                h_new, c_new = _step(module.mode, a[t], hh(weights, h), h, c)  # c: None but for LSTM
                if proj:
                    h_new = hr(weights, h_new)
                if mask is not None:  # past a sample's length its state stays
                    h_new = torch.where(mask[t], h_new, h)
                    c_new = torch.where(mask[t], c_new, c) if lstm else None
                h, c = h_new, c_new
                out[t] = h
            outputs.append(torch.stack(out))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, -1)
    return layer_input, [torch.stack(h_n)] + ([torch.stack(c_n)] if lstm else []), affines


@register(nn.RNN, nn.LSTM, nn.GRU, batch_dim=lambda m: 0 if m.batch_first else 1)
def recurrent(module: nn.RNNBase, args, kwargs, grads):
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise JacextError(
            f"{type(module).__name__}(dropout={module.dropout}) in train mode drops units between layers "
            "with random masks jacext cannot observe. Use dropout=0, put the module in eval mode "
            "(module.eval()), or apply nn.Dropout modules between single-layer recurrent modules."
        )
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    x, mask, rows = _time_major(module, x)
    steps, n = x.shape[:2]
    lstm = module.mode == "LSTM"
    if hx is None:
        layers = module.num_layers * (2 if module.bidirectional else 1)
        h0 = x.new_zeros(layers, n, module.proj_size or module.hidden_size)
        c0 = x.new_zeros(layers, n, module.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
    g_out, g_states = grads[0], grads[-2:] if lstm else grads[-1:]
    v = next(g.shape[0] for g in grads if g is not None)
    if g_out is not None:
        if rows is not None:  # packed rows back to the (T, N) grid; the padding has no output
            g_out = g_out.new_zeros(v, steps * n, g_out.shape[-1]).index_copy_(1, rows, g_out).unflatten(1, (steps, n))
        elif module.batch_first:
            g_out = g_out.transpose(1, 2)
    with torch.enable_grad():
        with replaying():
            output, states, affines = _run(module, *(_tile(t, 1, v) for t in (x, h0, c0, mask)))
        cotangents = [_fold(g_out, 1)] + [_fold(g, 1) for g in g_states]
        return _jacobians(module, [output] + states, cotangents, affines, v)


_CELL_MODES = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU"}


@register(nn.RNNCell, nn.LSTMCell, nn.GRUCell, min_dim=lambda m: 2)
def recurrent_cell(module: Any, args, kwargs, grads):
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    mode = _CELL_MODES.get(type(module)) or f"RNN_{module.nonlinearity.upper()}"
    lstm = mode == "LSTM"
    if hx is None:
        h = c = x.new_zeros(x.shape[0], module.hidden_size)
    else:
        h, c = hx if lstm else (hx, None)
    v = next(g.shape[0] for g in grads if g is not None)
    x, h, c = (_tile(t, 0, v) for t in (x, h, c))
    ih, hh = _maps(module, "")
    with torch.enable_grad():
        weights = _detached_weights(module)
        with replaying():
            h, c = _step(mode, ih(weights, x), hh(weights, h), h, c)
        return _jacobians(module, [h, c] if lstm else [h], [_fold(g, 0) for g in grads], [ih, hh], v)
