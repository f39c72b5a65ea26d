"""Result memory: reusing a previous result that nobody holds, and refusing one that cannot fit.

Writing N x P per-sample numbers into freshly allocated memory costs several times writing
them into memory that is already mapped (page faults, zeroing by the kernel). A result that
the previous backward stored on a parameter, and that no other tensor, view or array still
references, is overwritten in place instead; anything the user kept is never touched.
"""

import os
import sys
from typing import Any, Optional

import torch
from torch import Tensor

from jacext.errors import JacextError

GiB = 2**30


def reusable(p: Tensor, field: str, shape, dtype: torch.dtype) -> Optional[Tensor]:
    """``p.<field>`` if it is a contiguous tensor of ``shape`` and ``dtype`` on p's device,
    referenced only by that attribute (no other name, view, or numpy array shares its memory),
    and this interpreter's reference counts passed the self-check at import (:data:`REUSE`)."""
    return _unreferenced(p, field, shape, dtype) if REUSE else None


def _unreferenced(p: Tensor, field: str, shape, dtype: torch.dtype) -> Optional[Tensor]:
    old = vars(p).get(field)
    if (
        type(old) is not Tensor
        or old.shape != shape
        or old.dtype != dtype
        or old.device != p.device
        or old.requires_grad
        or old._is_view()
        or not old.is_contiguous()
    ):
        return None
    # references: the attribute, ``old`` here and getrefcount's argument; storage: ``old`` and
    # the storage object made to ask, which Python holds here, as getrefcount's argument and
    # through the storage itself (a storage object the user kept is that same object: one more)
    storage = old.untyped_storage()
    if sys.getrefcount(old) != 3 or torch._C._storage_Use_Count(storage._cdata) != 2 or sys.getrefcount(storage) != 3:
        return None
    return old


def _counts_behave() -> bool:
    """The self-check: on this interpreter, a result that nothing else holds is found free, and
    one held by another name, a view or its storage object is found held. CPython does not promise stable
    reference counts across versions; where they differ, results go to fresh memory."""
    p = torch.zeros(1)
    vars(p)["_probe"] = torch.zeros(4)
    free = _unreferenced(p, "_probe", (4,), torch.float32) is not None
    other_name = vars(p)["_probe"]
    held_by_name = _unreferenced(p, "_probe", (4,), torch.float32) is None
    del other_name
    view = vars(p)["_probe"][:2]
    held_by_view = _unreferenced(p, "_probe", (4,), torch.float32) is None
    del view
    storage = vars(p)["_probe"].untyped_storage()
    held_by_storage = _unreferenced(p, "_probe", (4,), torch.float32) is None
    del storage
    free_again = _unreferenced(p, "_probe", (4,), torch.float32) is not None
    return free and held_by_name and held_by_view and held_by_storage and free_again


REUSE: bool = _counts_behave()  # whether previous results may be overwritten at all


class ResultSlot:
    """Where one parameter's result for one extension goes: its previous result where that is
    :func:`reusable`, else memory of the attribute's own shape, allocated when a rule asks for
    it. A result written here is stored as it is, not as a view of a larger block, so that the
    next backward can reuse it."""

    def __init__(self, shape: torch.Size, like: Tensor, previous: Optional[Tensor]):
        self.shape, self.like, self.tensor = shape, like, previous
        self.taken = False

    def take(self, shape) -> Tensor:
        """The slot's memory, viewed as ``shape`` (same number of elements)."""
        self.taken = True
        if self.tensor is None:
            self.tensor = self.like.new_empty(self.shape)
        return self.tensor.view(shape)

    def index_add(self, shape, index: Tensor, src: Tensor) -> Tensor:
        """The slot's memory viewed as ``shape`` (R, D), zero but for ``out[index[i]] += src[i]``.

        Sparse results (Embedding: a few of the R rows per sample) need not clear all R rows:
        where the slot holds the previous result written here, and torch's version counter
        shows no in-place change to it since, only the rows written then are cleared."""
        out = self.take(shape)
        base: Any = self.tensor  # set by take; carries the rows it last wrote as an attribute
        written = getattr(base, "_jacext_rows", None)
        if written is not None and written[0] == base._version and written[1] == out.shape:
            out.index_fill_(0, written[2], 0)
        else:
            out.zero_()
        out.index_add_(0, index, src)
        base._jacext_rows = (base._version, out.shape, index)
        return out

    def holds(self, block: Tensor) -> bool:
        """Whether ``block`` is the slot's memory, written whole."""
        t = self.tensor
        if t is None or not block.is_contiguous():
            return False
        return block.data_ptr() == t.data_ptr() and block.numel() == t.numel()


def available_bytes(device: torch.device, wanted: int = 0) -> Optional[int]:
    """Memory that can still be allocated on ``device`` (None where unknown). On the CPU, where
    ``wanted`` is at most half the free pages, those (one system call) instead of MemAvailable
    from /proc/meminfo (0.1 ms, as much as the rest of a small model's step takes in jacext)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            free_pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # not on this system
            free_pages = 0
        if wanted <= free_pages // 2:
            return free_pages
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def require_fits(nbytes: int, device: torch.device, what: str, advice: str) -> None:
    """Raise before allocating ``nbytes`` on ``device`` if they cannot be had."""
    free = available_bytes(device, nbytes)
    if free is not None and nbytes > free:
        raise JacextError(
            f"{what} would need {nbytes / GiB:.2f} GiB on {device}, but only {free / GiB:.2f} GiB "
            f"are available. {advice}"
        )
