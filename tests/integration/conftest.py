import pytest
import torch


@pytest.fixture(autouse=True)
def _float64():
    """Every integration model in float64, seeded; the default dtype restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
