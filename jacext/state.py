"""jacext's state on a module: one attribute, ``module._jacext``, holding a :class:`ModuleState`.

``jacext.extend`` writes it; the engine and the layer rules read it (the module's path for
error messages, the options the user chose for it); ``jacext.unextend`` removes it with every
hook it lists.
"""

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Optional, Tuple

from torch import nn

ATTRIBUTE = "_jacext"


@dataclass
class ModuleState:
    """What jacext keeps on one module of an extended model."""

    path: str = "?"  # its name in the extended root, for error messages
    options: Dict[str, Any] = field(default_factory=dict)  # per-layer choices (batchnorm=...)
    handles: Dict[str, Tuple[Any, ...]] = field(default_factory=dict)  # hooks, by purpose
    root: bool = False  # the extended module itself (opens and closes a tape)
    backpack: bool = False  # also extended with backpack.extend
    last_task: Optional[int] = None  # root only: the graph task whose backward computed its results
    plan: Optional[str] = None  # root only: the name of the last backward's plan (jacext.backward_plan)
    saved_training: Optional[bool] = None  # a layer's own mode while its policy switched it (BatchNorm "eval")

    def copy(self) -> "ModuleState":
        return replace(self, options=dict(self.options), handles=dict(self.handles))

    def remove_hooks(self, keep: Tuple[str, ...] = ()) -> None:
        """Remove the hooks of every purpose not in ``keep``."""
        for purpose in [k for k in self.handles if k not in keep]:
            for handle in self.handles.pop(purpose):
                handle.remove()


def state_of(module: nn.Module) -> Optional[ModuleState]:
    return vars(module).get(ATTRIBUTE)


def ensure_state(module: nn.Module) -> ModuleState:
    state = state_of(module)
    if state is None:
        state = vars(module)[ATTRIBUTE] = ModuleState()
    return state


def option(module: nn.Module, name: str, default: Any = None) -> Any:
    """The per-layer option ``name`` chosen at ``jacext.extend`` (``default`` if none)."""
    state = state_of(module)
    return state.options.get(name, default) if state is not None else default


def module_label(module: nn.Module) -> str:
    """``'path' (Class)`` for error messages."""
    state = state_of(module)
    return f"'{state.path if state is not None else '?'}' ({type(module).__name__})"
