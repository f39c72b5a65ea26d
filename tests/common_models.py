"""Models shared by several test files: wrappers that turn layers with several outputs into one
(N, C) output, a compiled MLP, a small regression."""

import torch
from backpack import backpack
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import jacext


class Sequence(nn.Module):
    """Output and final states of a recurrent module as one (N, C) tensor.

    Called as ``model(x, lengths, *hx)``: ``lengths`` packs ``x`` (None: not packed),
    ``hx`` are the initial states (h0 or h0, c0; none: zeros)."""

    def __init__(self, rnn, states=True, enforce_sorted=True):
        super().__init__()
        self.rnn, self.states, self.enforce_sorted = rnn, states, enforce_sorted

    def forward(self, x, lengths, *hx):
        batch_first = self.rnn.batch_first
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=self.enforce_sorted)
        out, state = self.rnn(x, hx=(tuple(hx) if len(hx) > 1 else hx[0]) if hx else None)
        if lengths is not None:
            out, _ = pad_packed_sequence(out, batch_first=True)
        elif not batch_first:
            out = out.transpose(0, 1)
        states = list(state) if isinstance(state, tuple) else [state]
        return torch.cat([out.flatten(1)] + [s.transpose(0, 1).flatten(1) for s in states] * self.states, 1)


class Attend(nn.Module):
    """Self- or cross-attention returning a batch-first tensor."""

    def __init__(self, mha, cross=False, **call):
        super().__init__()
        self.mha, self.cross, self.call = mha, cross, call

    def forward(self, x):
        q = x if self.mha.batch_first else x.transpose(0, 1)
        kv = q.flip(-2) if self.cross else q
        if self.mha.kdim != self.mha.embed_dim:
            kv = kv[..., : self.mha.kdim]
        out, weights = self.mha(q, kv, kv, **self.call)
        out = out if self.mha.batch_first else out.transpose(0, 1)
        if weights is not None and weights.dim() == 4:  # per head: (N, H, L, S) -> (N, L, H * S)
            weights = weights.transpose(1, 2).flatten(2)
        return out if weights is None else torch.cat([out, weights], dim=-1)


def compiled_model():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    jacext.extend(model)
    model.compile()
    return model


def regression():
    torch.manual_seed(0)
    model = jacext.extend(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double())
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.sin(x[:, :2]) + x[:, 2:]
    return model, x, y


def backward_with_jacobian(model, x, y):
    with backpack(jacext.BatchJacobian()):
        out = model(x)
        out.backward(out - y)
    return (out - y).detach()
