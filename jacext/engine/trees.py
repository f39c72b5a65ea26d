"""pytree's leaves, without pytree's cost for the containers of nearly every call.

The torch-function mode flattens the arguments and outputs of every operation of the forward
pass; ``torch.utils._pytree.tree_leaves`` costs microseconds per container there. :func:`leaves`
gives the same leaves in the same order: tensors and scalars are leaves, plain tuples, lists and
dicts (in insertion order) are opened here, and any other type goes to pytree itself (a
namedtuple, ``torch.Size``, a HuggingFace ``ModelOutput``, a type that a library registered).
"""

import types
from typing import Any, List

import torch
from torch.utils._pytree import tree_leaves

_LEAVES = {torch.Tensor, torch.nn.Parameter, int, float, bool, complex, str, type(None), torch.dtype, torch.device,
           slice, types.EllipsisType, torch.memory_format, torch.layout}


def leaves(tree: Any) -> List[Any]:
    """``tree_leaves(tree)``."""
    if type(tree) in _LEAVES:
        return [tree]
    out: List[Any] = []
    _gather(tree, out)
    return out


def _gather(x: Any, out: List[Any]) -> None:
    t = type(x)
    if t is tuple or t is list:
        for y in x:
            if type(y) in _LEAVES:
                out.append(y)
            else:
                _gather(y, out)
    elif t is dict:
        for y in x.values():
            if type(y) in _LEAVES:
                out.append(y)
            else:
                _gather(y, out)
    elif t in _LEAVES:
        out.append(x)
    else:
        out.extend(tree_leaves(x))
