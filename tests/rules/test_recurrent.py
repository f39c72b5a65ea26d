import pytest
import torch
from common_models import Sequence
from reference import assert_close, check_grad_batch, check_jacobian
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from jacext.rules import layer_of

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")

T, N, IN, HIDDEN = 3, 3, 2, 2

LAYERS = {
    "rnn_tanh": lambda **kw: nn.RNN(IN, HIDDEN, **kw),
    "rnn_relu": lambda **kw: nn.RNN(IN, HIDDEN, nonlinearity="relu", **kw),
    "lstm": lambda **kw: nn.LSTM(IN, HIDDEN + 1, **kw),
    "lstm_proj": lambda **kw: nn.LSTM(IN, HIDDEN + 1, proj_size=HIDDEN, **kw),
    "gru": lambda **kw: nn.GRU(IN, HIDDEN, **kw),
}


def initial_states(rnn, dtype):
    shape = (rnn.num_layers * (2 if rnn.bidirectional else 1), N)
    h0 = torch.randn(*shape, rnn.proj_size or rnn.hidden_size, dtype=dtype)
    return (h0, torch.randn(*shape, rnn.hidden_size, dtype=dtype)) if isinstance(rnn, nn.LSTM) else (h0,)


def inputs(rnn, dtype, lengths=None, with_state=False):
    x = torch.randn(*((N, T) if rnn.batch_first else (T, N)), IN, dtype=dtype)
    return (x, lengths) + (initial_states(rnn, dtype) if with_state else ())


CONFIGS = {
    "plain": dict(num_layers=1, bidirectional=False, batch_first=False, bias=True),
    "deep_bidir_batch_first_nobias": dict(num_layers=2, bidirectional=True, batch_first=True, bias=False),
    "deep": dict(num_layers=2, bidirectional=False, batch_first=False, bias=True),
    "bidir_batch_first": dict(num_layers=1, bidirectional=True, batch_first=True, bias=True),
}


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("layer", LAYERS)
def test_sequence(layer, config, with_state, dtype):
    rnn = LAYERS[layer](**CONFIGS[config]).to(dtype)
    check_jacobian(Sequence(rnn), *inputs(rnn, dtype, with_state=with_state))


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("layer", LAYERS)
def test_packed(layer, enforce_sorted, dtype):
    rnn = LAYERS[layer](num_layers=2, bidirectional=True, batch_first=not enforce_sorted).to(dtype)
    lengths = torch.tensor([3, 2, 1] if enforce_sorted else [2, 3, 1])
    model = Sequence(rnn, enforce_sorted=enforce_sorted)
    check_jacobian(model, *inputs(rnn, dtype, lengths, with_state=True))


@pytest.mark.parametrize("layer", ["lstm_proj", "gru"])
def test_grad_batch_output_only_partly_frozen(layer, dtype):
    """Only the output reaches the loss (zero cotangents for h_n, c_n); some parameters frozen."""
    rnn = LAYERS[layer](num_layers=2, bidirectional=True).to(dtype)
    rnn.weight_hh_l0.requires_grad_(False)
    rnn.bias_ih_l1_reverse.requires_grad_(False)
    y = torch.randn(N, T * rnn.num_layers * (rnn.proj_size or rnn.hidden_size), dtype=dtype)
    check_grad_batch(Sequence(rnn, states=False), nn.MSELoss(), y, *inputs(rnn, dtype))


class Classifier(nn.Module):
    """Embedding, packed LSTM and a linear head on the last layer's final states."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, IN)
        self.rnn = nn.LSTM(IN, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * HIDDEN, 3)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.rnn(packed)
        return self.head(torch.cat([h_n[-2], h_n[-1]], 1))


def test_classifier(dtype):
    tokens, lengths = torch.randint(0, 5, (N, T)), torch.tensor([2, 3, 1])
    check_grad_batch(Classifier().to(dtype), nn.CrossEntropyLoss(), torch.randint(0, 3, (N,)), tokens, lengths)


def test_eval_mode_dropout(dtype):
    rnn = nn.LSTM(IN, HIDDEN, num_layers=2, dropout=0.5).to(dtype).eval()
    check_jacobian(Sequence(rnn), *inputs(rnn, dtype))


CELLS = {
    "rnn_tanh": lambda bias: nn.RNNCell(IN, HIDDEN, bias=bias),
    "rnn_relu": lambda bias: nn.RNNCell(IN, HIDDEN, bias=bias, nonlinearity="relu"),
    "lstm": lambda bias: nn.LSTMCell(IN, HIDDEN, bias=bias),
    "gru": lambda bias: nn.GRUCell(IN, HIDDEN, bias=bias),
}


class Unrolled(nn.Module):
    """A cell applied ``steps`` times, every new state concatenated into the (N, C) output."""

    def __init__(self, cell, steps):
        super().__init__()
        self.cell, self.steps = cell, steps

    def forward(self, x, *hx):
        state, outs = (tuple(hx) if len(hx) > 1 else hx[0]) if hx else None, []
        for _ in range(self.steps):
            state = self.cell(x, state)
            outs += list(state) if isinstance(state, tuple) else [state]
        return torch.cat(outs, 1)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", CELLS)
def test_cell(cell, bias, with_state, dtype):
    module = CELLS[cell](bias).to(dtype)
    states = [torch.randn(N, HIDDEN, dtype=dtype) for _ in range(2 if cell == "lstm" else 1)]
    check_jacobian(Unrolled(module, steps=1), torch.randn(N, IN, dtype=dtype), *(states if with_state else []))


@pytest.mark.parametrize("cell", CELLS)
def test_cell_unrolled(cell, dtype):
    """One cell called at every time step: the contributions of the calls add up."""
    model = Unrolled(CELLS[cell](True).to(dtype), steps=3)
    x = torch.randn(N, IN, dtype=dtype)
    check_grad_batch(model, nn.CrossEntropyLoss(), torch.randint(0, 3 * HIDDEN, (N,)), x)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
def test_lstm_cell_rule(with_state, dtype):
    """The rule given the cotangents of h' and c' directly, against one autograd pass per sample and seed."""
    cell = nn.LSTMCell(IN, HIDDEN).to(dtype)
    x = torch.randn(N, IN, dtype=dtype)
    hx = (torch.randn(N, HIDDEN, dtype=dtype), torch.randn(N, HIDDEN, dtype=dtype)) if with_state else None
    grads = [torch.randn(4, N, HIDDEN, dtype=dtype) for _ in range(2)]
    got = layer_of(cell).rule(cell, (x,) + ((hx,) if with_state else ()), {}, grads)
    params = dict(cell.named_parameters())
    for n in range(N):
        h, c = cell(x[n : n + 1], None if hx is None else (hx[0][n : n + 1], hx[1][n : n + 1]))
        for v in range(4):
            contraction = (h * grads[0][v, n]).sum() + (c * grads[1][v, n]).sum()
            expected = torch.autograd.grad(contraction, list(params.values()), retain_graph=True)
            for (name, _), e in zip(params.items(), expected, strict=True):
                assert_close(got[name][n, v], e, dtype, name)
