"""The one place that touches BackPACK's global context (``backpack.context.CTX``).

BackPACK keeps ``with backpack(...)``'s settings in class attributes, one for the whole
process: two threads, each in its own block, would see each other's extensions (or none,
once the other's block has ended), and the last block to end could leave its predecessor's
extensions active. :func:`per_thread` makes them per thread, as jacext's tapes are: a
thread sees what its own innermost block set, and BackPACK's defaults outside one. Threads
that Python did not start (autograd's own, which run a CUDA backward) never enter a block:
there, the settings are those the last block entered or left in any thread.
"""

import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Tuple

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
    saved = CTX.get_active_exts(), CTX.get_retain_graph(), CTX.get_extension_hook(), _paused()
    CTX.set_active_exts(())
    CTX.set_retain_graph(True)
    CTX.set_extension_hook(no_op)
    _local.paused = True  # BackPACK's own ``disable()`` would switch storing off in every thread
    try:
        yield
    finally:
        CTX.set_active_exts(saved[0])
        CTX.set_retain_graph(saved[1])
        CTX.set_extension_hook(saved[2])
        _local.paused = saved[3]


def _paused() -> bool:
    return getattr(_local, "paused", False)


_FIELDS = ("active_exts", "debug", "extension_hook", "retain_graph")
_local = threading.local()
_last: Dict[str, Any] = {}  # the settings last written in any thread, for autograd's own threads


def per_thread() -> None:
    """Replace CTX's getters and setters by per-thread ones, and let BackPACK's input storing
    (``disable.should_store_io``) also ask whether this thread paused it (once; on import)."""
    if getattr(CTX, "_jacext_per_thread", False):
        return
    stores = disable.should_store_io
    disable.should_store_io = staticmethod(lambda: not _paused() and stores())
    for field in _FIELDS:
        _last[field] = getattr(CTX, field)
        setattr(CTX, f"get_{field}", staticmethod(_getter(field, getattr(CTX, field))))
        setattr(CTX, f"set_{field}", staticmethod(_setter(field)))
    CTX._jacext_per_thread = True


def _getter(field: str, default: Any) -> Callable[[], Any]:
    def get() -> Any:
        mine = getattr(_local, "settings", None)
        if mine is not None and field in mine:
            return mine[field]
        return _last[field] if isinstance(threading.current_thread(), threading._DummyThread) else default

    return get


def _setter(field: str) -> Callable[[Any], None]:
    def set_(value: Any) -> None:
        value = tuple(value) if field == "active_exts" else value
        vars(_local).setdefault("settings", {})[field] = _last[field] = value

    return set_


per_thread()
