"""Layers called without the batch (positions), their values meeting it in one operation, and
the backward paths around the root output: against the loop, with N equal to the length."""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch, loop_jacobian
from torch import nn

import jacext
from jacext.dp import ClipGrad

N = T = 6
V, D = 9, 4


class Positions(nn.Module):
    """Token and position embeddings; ``how`` says how the positions meet the tokens."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D, scale_grad_by_freq=how == "counted")
        self.scale = nn.Linear(D, D)  # a second layer on the batch-free positions
        self.head = nn.Linear(D, 3)
        self.register_buffer("types", torch.tensor([[0, 1, 1, 0, 1, 0]]))  # (1, T), as HF's token types
        self.register_buffer("grid", torch.linspace(-1, 1, T * D).view(T, D))

    def forward(self, idx):
        pos = self.pos(torch.arange(idx.shape[1]) % (3 if self.how == "counted" else T))
        if self.how == "chain":
            pos = torch.tanh(self.scale(pos))[None]
        elif self.how == "views":  # between the layer and the meet: views and a scaling
            pos = 2 * pos.t()[None].transpose(1, 2)
        elif self.how == "expanded ids":  # one entry per sample, ids expanded to the batch
            pos = self.pos(self.types.expand(idx.shape[0], -1))
        elif self.how == "linear":  # a Linear on a batch-free buffer
            pos = self.scale(self.grid)
        h = self.tok(idx)
        if self.how == "in place":
            h += pos
        else:
            h = h + pos
        return self.head(h).mean(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("how", ["add", "in place", "chain", "views", "expanded ids", "linear", "counted"])
def test_batch_free_layers_against_the_loop(how, dtype):
    torch.manual_seed(0)
    model = Positions(how).to(dtype)
    x, y = torch.randint(0, V, (N, T)), torch.randint(0, 3, (N,))
    lossfunc = nn.CrossEntropyLoss()
    grads, jacobians = loop_grad_batch(model, lossfunc, y, x), loop_jacobian(model, x)
    jacext.extend(model)
    with backpack(jacext.BatchGrad(), jacext.BatchL2Grad(), jacext.BatchJacobian()):
        lossfunc(model(x), y).backward()
    scale = max(g.abs().max() for g in grads.values())
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, grads[name], dtype, name, scale)
        assert_close(p.batch_l2, grads[name].flatten(1).square().sum(1), dtype, name, scale**2)
        assert_close(p.jacobian, jacobians[name], dtype, name)
    assert jacext.backward_plan(model) == "pull-back"


def test_clipping_with_batch_free_layers():
    torch.manual_seed(0)
    model = Positions("add").double()
    x, y = torch.randint(0, V, (N, T)), torch.randint(0, 3, (N,))
    lossfunc = nn.CrossEntropyLoss(reduction="sum")
    grads = loop_grad_batch(model, lossfunc, y, x)
    norms = sum(g.flatten(1).square().sum(1) for g in grads.values()).sqrt()
    bound = float(norms.median())
    weights = (bound / (norms + 1e-6)).clamp(max=1)
    jacext.extend(model)
    with backpack(ClipGrad(bound, loss_reduction="sum")):
        lossfunc(model(x), y).backward()
    for name, p in model.named_parameters():
        expected = torch.einsum("n,n...->...", weights, grads[name])
        assert_close(p.grad if p.grad is not None else torch.zeros_like(p), expected, torch.float64, name)


def test_batched_values_written_into_a_batch_free_tensor_are_refused():
    class Into(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos, self.head = nn.Embedding(T, D), nn.Linear(D, 2)

        def forward(self, h):
            pos = self.pos(torch.arange(h.shape[1])).expand(h.shape[0], -1, -1).clone()
            pos += h
            return self.head(pos).mean(1)

    model = jacext.extend(Into())
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="out-of-place"):
        model(torch.randn(N, T, D))


def test_output_without_the_batch_is_refused():
    class Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(T, D)

        def forward(self, x):
            return self.pos(torch.arange(x.shape[1]))

    model = jacext.extend(Only())
    with backpack(jacext.BatchGrad()), pytest.raises(jacext.JacextError, match="does not depend on its input"):
        model(torch.randn(N, T))


def test_backward_not_through_the_output_leaves_no_stale_result():
    """A loss computed from an inner activation (not from the extended module's output)."""

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)
            self.hidden = None

        def forward(self, x):
            self.hidden = self.a(x)
            return self.b(self.hidden)

    model = jacext.extend(Inner())
    with backpack(jacext.BatchGrad()):
        model(torch.randn(4, 3)).sum().backward()
    assert model.a.weight.grad_batch.shape[0] == 4
    with backpack(jacext.BatchGrad()):
        model(torch.randn(2, 3))
        with pytest.raises(jacext.JacextError, match="without passing through (an|the) output"):
            model.hidden.sum().backward()
    assert not hasattr(model.a.weight, "grad_batch")


def test_dict_output_with_a_loss_computed_inside():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, y):
            logits = self.lin(x)
            return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}

    torch.manual_seed(0)
    model = WithLoss().double()
    x, y = torch.randn(N, 3, dtype=torch.float64), torch.randint(0, 2, (N,))
    jacext.extend(model)
    with backpack(jacext.BatchGrad()):
        model(x, y)["loss"].backward()
    reference = [
        torch.autograd.grad(nn.functional.cross_entropy(model.lin(x[n : n + 1]), y[n : n + 1]) / N, model.lin.weight)[0]
        for n in range(N)
    ]
    assert_close(model.lin.weight.grad_batch, torch.stack(reference), torch.float64)
