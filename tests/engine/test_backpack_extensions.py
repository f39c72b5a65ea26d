"""jacext's extensions next to BackPACK's own (``jacext.extend(model, backpack=True)``,
jacext.engine.backpack_ctx): both in one backward, with the same numbers as BackPACK alone.
"""

import backpack.extensions as bpext
import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch
from torch import nn

import jacext


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_combined_with_backpack_extensions_and_agrees_with_backpack_batchgrad():
    model = jacext.extend(mlp().double(), backpack=True)
    lossfunc = nn.CrossEntropyLoss()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with backpack(bpext.BatchGrad()):
        lossfunc(model(x), y).backward()
    theirs = [p.grad_batch.clone() for p in model.parameters()]
    with backpack(jacext.BatchGrad(), jacext.BatchJacobian(), bpext.BatchL2Grad()):
        lossfunc(model(x), y).backward()
    for p, t in zip(model.parameters(), theirs, strict=True):
        assert_close(p.grad_batch, t, torch.float64)
        assert_close(p.batch_l2, (t**2).flatten(1).sum(1), torch.float64)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_inline_path_next_to_backpacks_own_extensions():
    """BackPACK's module hooks run in the same ordinary backward that jacext catches G in."""
    import copy

    import backpack.extensions as bpext
    from backpack import extend as backpack_extend

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    twin, lossfunc = backpack_extend(copy.deepcopy(model)), backpack_extend(nn.CrossEntropyLoss())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    expected = loop_grad_batch(model, lossfunc, y, x)
    jacext.extend(model, backpack=True)
    with backpack(jacext.BatchGrad(), bpext.DiagGGNExact(), bpext.BatchL2Grad()):
        lossfunc(model(x), y).backward()
    with backpack(bpext.DiagGGNExact(), bpext.BatchL2Grad()):
        lossfunc(twin(x), y).backward()
    assert jacext.backward_plan(model) == "inline"
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_close(p.grad_batch, expected[name], torch.float64, name)
        for field in ("diag_ggn_exact", "batch_l2", "grad"):
            assert_close(getattr(p, field), getattr(q, field), torch.float64, f"{name}.{field}")
