"""Hypothesis profiles for the fuzz tests, and exact float32 arithmetic on CUDA.

``ci`` (default): few examples, derandomized, so that ``make test`` is fast and reproducible
(tests ask for fewer still with ``models.examples``).
``fuzz`` (``JACEXT_FUZZ=1``, as in ``make fuzz``): hundreds of fresh random examples per test;
failures are saved in hypothesis's example database (``.hypothesis/``) and replayed first.
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", max_examples=500, deadline=None, print_blob=True)
settings.load_profile("fuzz" if os.environ.get("JACEXT_FUZZ") else "ci")


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    """No TensorFloat-32 on CUDA (cuDNN convolutions use it by default): the oracle and jacext
    contract in different orders, and TF32's 10-bit mantissa is beyond the float32 tolerance."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
