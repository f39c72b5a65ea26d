"""Gradient penalties (issue 15): a loss built from ``g = autograd.grad(out.sum(), x,
create_graph=True)`` (WGAN-GP's (|g_n| - 1)^2, R1's |g_n|^2), with or without the model's own
loss, gets per-sample results that include the penalty's term, exact against a loop that builds
each sample's penalty and loss on its own; what jacext cannot see whole is refused, leaving
nothing behind."""

import gc
import warnings

import pytest
import torch
from backpack import backpack
from torch import nn

import jacext
from jacext.dp import ClipGrad
from jacext.engine.record import Tape
from tests.errors.common import nothing_left_behind
from tests.reference import assert_close, overall_scale


class SeqFirst(nn.Module):
    """A Linear on the batch moved to dimension 1, then back."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.inner(x.transpose(0, 1))).transpose(0, 1)
        return self.out(h)


class Folded(nn.Module):
    """A Linear on the batch folded with the positions (N T rows)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 1)

    def forward(self, x):
        n, t, _ = x.shape
        return self.out(torch.tanh(self.fc(x.flatten(0, 1))).view(n, t, -1)).sum(1)


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.LeakyReLU(0.2), nn.Linear(6, 1))


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.ConvTranspose2d(3, 3, 2),
        nn.Softplus(),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 1),
    )


def normalised():  # WGAN-GP's critic: LayerNorm in place of BatchNorm
    return nn.Sequential(
        nn.Linear(5, 6), nn.LayerNorm(6), nn.LeakyReLU(0.2), nn.Linear(6, 4), nn.RMSNorm(4), nn.PReLU(), nn.Linear(4, 1)
    )


def normalised_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv2d(4, 4, 2), nn.InstanceNorm2d(4, affine=True),
        nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 3 * 3, 1),
    )


def sequence():  # N = T = 5 among the cases
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


MODELS = {  # name: (model, one sample's shape)
    "mlp": (mlp, (5,)),
    "cnn": (cnn, (2, 6, 6)),
    "normalised": (normalised, (5,)),
    "normalised-cnn": (normalised_cnn, (2, 6, 6)),
    "sequence": (sequence, (5, 4)),
    "seq-first": (SeqFirst, (5, 4)),
    "folded": (Folded, (3, 4)),
}


def wgan_gp(g):
    return (g.flatten(1).norm(dim=1) - 1).square().sum()


def r1(g):
    return g.flatten(1).square().sum()


def loss_with_penalty(model, x, penalty, with_output: bool):
    out = model(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return (out.square().sum() if with_output else 0) + 10 * penalty(g)


def per_sample_loop(model, x, penalty, with_output):
    """{name: (N, *p.shape)}: each sample's loss and penalty, built and differentiated alone."""
    rows = []
    for n in range(x.shape[0]):
        xn = x[n : n + 1].clone().requires_grad_()
        loss = loss_with_penalty(model, xn, penalty, with_output)
        names, params = zip(*model.named_parameters(), strict=True)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append({k: torch.zeros_like(p) if g is None else g for k, p, g in zip(names, params, grads, strict=True)})
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("with_output", [True, False], ids=["loss+penalty", "penalty"])
@pytest.mark.parametrize("penalty", [wgan_gp, r1], ids=["wgan-gp", "r1"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n", [3, 5])
def test_per_sample_results_include_the_penalty(name, n, penalty, with_output, dtype):
    make, shape = MODELS[name]
    model = make().to(dtype)
    x = torch.randn(n, *shape, dtype=dtype)
    expected = per_sample_loop(model, x, penalty, with_output)
    scale = overall_scale(expected)
    ext = jacext.extend(model)
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad()):
        loss_with_penalty(ext, x.clone().requires_grad_(), penalty, with_output).backward()
    for k, p in model.named_parameters():
        assert_close(p.grad_batch, expected[k], dtype, k, scale)
        assert_close(p.batch_l2, expected[k].flatten(1).square().sum(1), dtype, k, scale**2)
        if p.grad is not None:
            assert_close(p.grad, expected[k].sum(0), dtype, k, scale)
    assert nothing_left_behind()


def test_penalty_steps_free_their_tapes():
    """The penalty's graph holds its tape until the step's tensors are dropped: no tape is left
    for the cyclic garbage collector."""
    model = jacext.extend(mlp().double())
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            with backpack(jacext.BatchGrad()):
                x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
                loss_with_penalty(model, x, r1, True).backward()
        with warnings.catch_warnings():  # (isinstance on some of torch's deprecated objects warns)
            warnings.simplefilter("ignore")
            assert sum(isinstance(o, Tape) for o in gc.get_objects()) <= 1
    finally:
        gc.enable()


class RecurrentInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.RNN(5, 6, batch_first=True), nn.Linear(6, 1)

    def forward(self, x):
        return self.out(self.rnn(x.unsqueeze(1))[0][:, -1])


class ScaleInside(nn.Module):
    """A parameter used in the parent's own forward: it meets the batch there."""

    def __init__(self):
        super().__init__()
        self.fc, self.gamma, self.out = nn.Linear(5, 6), nn.Parameter(torch.ones(6)), nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x) * self.gamma))


def _refused(model, ext_factory, match):
    model = jacext.extend(model.double())
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(jacext.JacextError, match=match):
        with backpack(ext_factory()):
            loss_with_penalty(model, x, wgan_gp, True).backward()
    assert nothing_left_behind()
    for p in model.parameters():
        assert not hasattr(p, "grad_batch") and not hasattr(p, "batch_l2")


def test_a_layer_whose_rule_takes_no_input_derivative_on_the_penalty_is_refused():
    _refused(RecurrentInside(), jacext.BatchGrad, r"module 'rnn' \(RNN\) has no rule whose derivative in its input")


def test_a_parameter_meeting_the_batch_on_the_penalty_is_refused():
    _refused(ScaleInside(), jacext.BatchL2Grad, "parameters meet the batch outside a layer's call")


@pytest.mark.parametrize(
    "ext", [lambda: ClipGrad(1.0, loss_reduction="sum"), jacext.BatchJacobian], ids=["ClipGrad", "BatchJacobian"]
)
def test_a_penalty_under_other_extensions_is_refused(ext):
    _refused(mlp(), ext, "create_graph")


def test_a_penalty_on_an_inner_tensor_is_refused():
    """The input gradient of a tensor inside the model: no tap sees it (the root's input needs none)."""

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.rest = nn.Linear(5, 6), nn.Sequential(nn.Tanh(), nn.Linear(6, 1))

        def forward(self, x):
            self.h = self.first(x)
            return self.rest(self.h)

    model = jacext.extend(Inner().double())
    with pytest.raises(jacext.JacextError, match="a penalty on a tensor inside the model"):
        with backpack(jacext.BatchGrad()):
            out = model(torch.randn(4, 5, dtype=torch.float64))
            (g,) = torch.autograd.grad(out.sum(), model.h, create_graph=True)
            (out.sum() + r1(g)).backward()
    assert nothing_left_behind() and not any(hasattr(p, "grad_batch") for p in model.parameters())


def test_two_create_graph_backwards_are_refused():
    model = jacext.extend(mlp().double())
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(jacext.JacextError, match="more than one create_graph"):
        with backpack(jacext.BatchGrad()):
            out = model(x)
            (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
            (h,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
            (r1(g) + r1(h)).backward()
    assert nothing_left_behind() and not any(hasattr(p, "grad_batch") for p in model.parameters())


def test_huggingface_conv1d_takes_the_penalty(dtype):
    """GPT-2's Conv1D (y = x W + b) is affine in its input: registered so, with its own rule."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pytorch_utils.Conv1D(6, 4), nn.Tanh(), pytorch_utils.Conv1D(1, 6)).to(dtype)
    x = torch.randn(5, 5, 4, dtype=dtype)  # N = T
    expected = per_sample_loop(model, x, wgan_gp, True)
    ext = jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        loss_with_penalty(ext, x.clone().requires_grad_(), wgan_gp, True).backward()
    for k, p in model.named_parameters():
        assert_close(p.grad_batch, expected[k], dtype, k, overall_scale(expected))


def test_a_hessian_vector_product_is_refused():
    model = jacext.extend(mlp().double())
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    params = list(model.parameters())
    with pytest.raises(jacext.JacextError, match="Hessian-vector product"):
        with backpack(jacext.BatchGrad()):
            grads = torch.autograd.grad(model(x).square().sum(), params, create_graph=True)
            sum(g.sum() for g in grads).backward()
    assert nothing_left_behind() and not any(hasattr(p, "grad_batch") for p in model.parameters())


def test_a_backward_that_leaves_the_penalty_out_is_the_plain_one(dtype):
    """A penalty computed (for a log, say) but not differentiated: the results are the loss's."""
    model = mlp().to(dtype)
    x = torch.randn(4, 5, dtype=dtype)
    expected = per_sample_loop(model, x, lambda g: 0 * g.sum(), True)
    ext = jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        xg = x.clone().requires_grad_()
        out = ext(xg)
        torch.autograd.grad(out.sum(), xg, create_graph=True)
        out.square().sum().backward()
    for k, p in model.named_parameters():
        assert_close(p.grad_batch, expected[k], dtype, k, overall_scale(expected))
