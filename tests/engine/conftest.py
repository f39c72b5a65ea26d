"""Fixtures of the engine tests.

``contractions``: the paths of the records whose fused node ran the rule inside the backward, one
entry per call (a spy on jacext.engine.plan.InlineFused.contract_now, to count the contractions;
which plan ran is ``jacext.backward_plan(model)``).
"""

import pytest

import jacext.engine.plan as plans
from jacext.state import state_of


@pytest.fixture
def contractions(monkeypatch):
    """The records whose fused node ran the rule inside the backward (InlineFused.contract_now)."""
    calls = []
    original = plans.InlineFused.contract_now

    def spy(self, rec, g):
        calls.append(state_of(rec.module).path)
        return original(self, rec, g)

    monkeypatch.setattr(plans.InlineFused, "contract_now", spy)
    return calls
