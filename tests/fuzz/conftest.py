"""Hypothesis profiles for the fuzz tests.

``ci`` (default): few examples, derandomized, so that ``make test`` is fast and reproducible.
``fuzz`` (``JACEXT_FUZZ=1``, as in ``make fuzz``): hundreds of fresh random examples per test;
failures are saved in hypothesis's example database (``.hypothesis/``) and replayed first.
"""

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("fuzz", max_examples=500, deadline=None, print_blob=True)
settings.load_profile("fuzz" if os.environ.get("JACEXT_FUZZ") else "ci")
