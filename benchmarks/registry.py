"""All benchmarked methods, in table order: the reference, the peers, jacext."""

from typing import List

from benchmarks.methods import Method, jacext_methods, plain
from benchmarks.peers import peers


def all_methods() -> List[Method]:
    return [plain(), *peers(), *jacext_methods()]


def methods_for(quantity: str) -> List[Method]:
    """The methods that take part in workloads asking for ``quantity``."""
    return [m for m in all_methods() if quantity in m.quantities]


def method_named(name: str) -> Method:
    return next(m for m in all_methods() if m.name == name)
