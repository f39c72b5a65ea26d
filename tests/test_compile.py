"""torch.compile: single-seed extensions work on compiled modules; BatchJacobian says clearly that it does not."""

import pytest
import torch
from backpack import backpack
from reference import assert_close, loop_grad_batch
from torch import nn

import jacext


def compiled_model():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    jacext.extend(model)
    model.compile()
    return model


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_batch_grad_on_a_compiled_module():
    model = compiled_model()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    expected = loop_grad_batch(model, nn.MSELoss(reduction="sum"), y, x)
    with backpack(jacext.BatchGrad()):
        nn.MSELoss(reduction="sum")(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(p.grad_batch, expected[name], torch.float64, name)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_batch_jacobian_on_a_compiled_module_is_a_clear_error():
    model = compiled_model()
    with backpack(jacext.BatchJacobian()):
        out = model(torch.randn(3, 4, dtype=torch.float64))
        with pytest.raises(jacext.JacextError, match="torch.compile"):
            out.sum().backward()
