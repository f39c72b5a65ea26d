"""Privacy accounting, from Opacus (an optional dependency: ``pip install jacext[dp]``).

jacext never computes privacy itself: the accountants ("rdp", "prv", "gdp"), the noise
multiplier for a target epsilon and the Poisson data loader are Opacus's, imported lazily.
"""

import importlib
from typing import Any


def require_opacus(what: str = "privacy accounting") -> Any:
    """The ``opacus`` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("opacus")
    except ImportError as error:
        raise ImportError(
            f"jacext.dp needs Opacus for {what}: install it with `pip install jacext[dp]` (or `pip install opacus`)"
        ) from error


def create_accountant(mechanism: str):
    """An Opacus accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``."""
    if mechanism not in ("rdp", "prv", "gdp"):
        raise ValueError(f"accountant must be 'rdp', 'prv' or 'gdp', got {mechanism!r}")
    require_opacus()
    from opacus.accountants import create_accountant as create

    return create(mechanism=mechanism)


def noise_multiplier_for(
    *, target_epsilon: float, target_delta: float, sample_rate: float, epochs: int, mechanism: str, **kwargs
) -> float:
    """Opacus's ``get_noise_multiplier``: the smallest sigma that spends at most ``target_epsilon``
    in ``epochs / sample_rate`` steps at ``sample_rate`` (``kwargs``: e.g. ``epsilon_tolerance``)."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            epochs=epochs,
            accountant=mechanism,
            **kwargs,
        )
    )
