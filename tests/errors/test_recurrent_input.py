"""Recurrent layers that refuse an input or a mode: an unbatched input (GRU, GRUCell) and
dropout between the layers in train mode.
"""

import pytest
import torch
from common_models import Sequence
from torch import nn

import jacext

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")


T, N, IN, HIDDEN = 3, 3, 2, 2


def initial_states(rnn, dtype):
    shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), N)
    h0 = torch.randn(*shape, rnn.proj_size or rnn.hidden_size, dtype=dtype)
    return (h0, torch.randn(*shape, rnn.hidden_size, dtype=dtype)) if isinstance(rnn, nn.LSTM) else (h0,)


def inputs(rnn, dtype, lengths=None, with_state=False):
    x = torch.randn(*((N, T) if rnn.batch_first else (T, N)), IN, dtype=dtype)
    return (x, lengths) + (initial_states(rnn, dtype) if with_state else ())


def test_unbatched_input_is_refused():
    with pytest.raises(jacext.JacextError, match="unbatched"):
        jacext.jacobian(Sequence(nn.GRU(IN, HIDDEN)), (torch.randn(T, IN), None))
    with pytest.raises(jacext.JacextError, match="batch"):
        jacext.jacobian(nn.GRUCell(IN, HIDDEN), torch.randn(IN))


def test_train_mode_dropout_is_refused():
    rnn = nn.GRU(IN, HIDDEN, num_layers=2, dropout=0.5)
    with pytest.raises(jacext.JacextError, match="dropout"):
        jacext.jacobian(Sequence(rnn), inputs(rnn, torch.float32))
