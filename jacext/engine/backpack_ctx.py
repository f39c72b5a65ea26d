"""The one place that touches BackPACK's global context (``backpack.context.CTX``)."""

from contextlib import contextmanager
from typing import Tuple

from backpack import disable
from backpack.context import CTX
from backpack.utils.hooks import no_op

from jacext.extensions import JacextExtension


def active_extensions() -> Tuple:
    """The extensions of the innermost ``with backpack(...)`` block (empty outside one)."""
    return tuple(CTX.get_active_exts())


def jacext_active() -> bool:
    """Whether a jacext extension is active."""
    return any(isinstance(e, JacextExtension) for e in CTX.get_active_exts())


@contextmanager
def paused():
    """BackPACK's module hooks (``extend(..., backpack=True)``) also fire in the engine's own
    backward and in forward passes that rules run: let them do nothing there and keep the
    inputs they stored for the real backward. With no extension active, no tape opens there."""
    saved = CTX.get_active_exts(), CTX.get_retain_graph(), CTX.get_extension_hook()
    CTX.set_active_exts(())
    CTX.set_retain_graph(True)
    CTX.set_extension_hook(no_op)
    try:
        with disable():
            yield
    finally:
        CTX.set_active_exts(saved[0])
        CTX.set_retain_graph(saved[1])
        CTX.set_extension_hook(saved[2])
