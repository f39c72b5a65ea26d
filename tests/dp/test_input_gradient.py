"""What ClipGrad leaves to the rest of the graph: the extended model's parameters get the
clipped sum; its inputs, and whatever computed them upstream (a GAN's generator, an embedding
outside the extended model), get their ordinary, unclipped gradient, on every plan: the inline
plans clip only the parameters' gradients, the pull-back plan (a tensor computed without the
batch meets it inside the model) divides what leaves the model through an input by the
weights it scaled the root's cotangent with. Against plain autograd, float64 and float32.
"""

import pytest
import torch
from backpack import backpack
from reference import assert_close
from torch import nn

import jacext
from jacext.dp import ClipGrad


class PositionAdd(nn.Module):
    """x + pos: a parameter meeting the batch (held: ClipGrad clips inline)."""

    def __init__(self, d):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x + self.pos


class SeqFirst(nn.Module):
    """A seq-first recurrent layer on the root's input (N, T, D) transposed: the input's batch
    is in dim 0, the layer's in dim 1."""

    def __init__(self, d, meet):
        super().__init__()
        self.pos = PositionAdd(d) if meet else nn.Identity()
        self.rnn, self.fc = nn.GRU(d, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.rnn(self.pos(x).transpose(0, 1))[0].mean(0))


def discriminator(kind, d=4):
    if kind == "inline":
        return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 2))
    if kind == "meet":
        return nn.Sequential(PositionAdd(d), nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 2))
    return SeqFirst(d, meet=kind == "seq-first, pull-back")


KINDS = ["inline", "meet", "seq-first", "seq-first, pull-back"]
PLANS = {"inline": "inline, clipping", "meet": "inline, clipping", "seq-first": "pull-back",
         "seq-first, pull-back": "pull-back"}


@pytest.mark.parametrize("direct", [False, True], ids=["through-the-model", "and-directly"])
@pytest.mark.parametrize("kind", KINDS)
def test_upstream_gradients_are_unclipped_on_every_plan(kind, direct, dtype):
    """z -> generator -> x -> extended discriminator -> loss (plus, ``direct``, a term of x
    itself): the generator's gradients and x's are those of plain autograd; the
    discriminator's are clipped (its plan as named)."""
    torch.manual_seed(0)
    n, t, d = 5, 5, 4  # N = T
    generator = nn.Linear(3, d).to(dtype)
    model = discriminator(kind, d).to(dtype)
    z = torch.randn(n, t, 3, dtype=dtype) if kind.startswith("seq") else torch.randn(n, 3, dtype=dtype)
    y = torch.randn(n, 2, dtype=dtype)

    def generated():
        x = generator(z)
        x.retain_grad()
        return x

    def loss(x):
        value = (model(x) - y).square().sum()
        return value + x.square().sum() if direct else value

    x = generated()
    loss(x).backward()
    expected = {"x": x.grad.clone(), **{k: p.grad.clone() for k, p in generator.named_parameters()}}
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    generator.zero_grad(), model.zero_grad()

    jacext.extend(model)
    x = generated()  # (jacext refuses modules it does not extend inside its context)
    with backpack(ClipGrad(1e-3, loss_reduction="sum")):  # every sample clipped
        loss(x).backward()
    assert jacext.backward_plan(model) == PLANS[kind]
    got = {"x": x.grad, **{k: p.grad for k, p in generator.named_parameters()}}
    for k in expected:
        assert_close(got[k], expected[k], dtype, k)
    for k, p in model.named_parameters():  # clipped: far below the plain gradient
        assert p.grad.norm() < 1e-2 * plain[k].norm() + 1e-2, k
