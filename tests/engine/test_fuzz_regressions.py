"""Bugs the fuzzer (tests/fuzz) found that only a sequence of models in one process shows.

Each test runs its models one after the other, as a hypothesis worker runs its examples, from
an empty cache of the batch tracker's probes (``BatchTracker._probed``, shared by every model
of the process), and compares each model's Jacobians with the loop of ``tests/reference.py``.
"""

import pytest
import torch
from reference import assert_close, loop_jacobian
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import jacext
from jacext.engine.batch import BatchTracker


@pytest.fixture(autouse=True)
def _empty_probe_cache(monkeypatch):
    monkeypatch.setattr(BatchTracker, "_probed", {})


def check(model, x):
    expected = loop_jacobian(model, x)
    for name, value in jacext.jacobian(model, x).items():
        assert_close(value, expected[name], torch.float64, name)


class Packed(nn.Module):
    """A bidirectional RNN on sequences packed by the lengths ``(x[..., 0] > 0).sum(1)``
    (unsorted), padded back, flattened, and a Linear."""

    def __init__(self, hidden):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, bidirectional=True, batch_first=True)
        self.head = nn.Linear(3 * 2 * hidden, 2)

    def forward(self, x):
        lengths = (x[..., 0] > 0).sum(1)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]
        return self.head(out.flatten(1))


def sequences(lengths):
    x = torch.randn(len(lengths), 3, 2, dtype=torch.float64)
    x[..., 0] = torch.tensor([[1.0 if t < n else -1.0 for t in range(3)] for n in lengths])
    return x


def test_packed_sequences_of_the_same_shape_with_other_lengths():
    """Found by the fuzzer (InstanceNorm1d -> packed bidirectional RNN -> Flatten -> Linear, wrong
    by 1.7 only after other examples): the tracker cached how index_select and
    _pack_padded_sequence move the batch by the shapes of their arguments, not by the values
    of the sorting indices and the lengths; a second model on inputs of the same shape but
    other lengths got the first one's order of samples, and the head's per-sample Jacobians
    went to the wrong samples (the packing's padded-back output keyed differently, with a
    hidden size of 2, so that the stale orders did not cancel)."""
    check(Packed(1).double(), sequences([1, 3, 2]))
    check(Packed(2).double(), sequences([3, 2, 1]))


class Reordered(nn.Module):
    """The samples reordered by a buffer of indices, a Linear, and the order restored."""

    def __init__(self, order):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.register_buffer("order", torch.tensor(order))
        self.register_buffer("back", torch.argsort(self.order))

    def forward(self, x):
        return self.fc(x.index_select(0, self.order)).index_select(0, self.back)


def test_indices_of_the_same_shape_with_other_values():
    """The same cache, for any operation whose integer arguments move the batch: a second model
    that reorders its samples otherwise must not get the first one's order."""
    x = torch.randn(3, 2, dtype=torch.float64)
    check(Reordered([1, 2, 0]).double(), x)
    check(Reordered([2, 0, 1]).double(), x)
