"""One workload end to end: check every method's result, time them side by side, measure memory.

The check runs every method once (recording its warnings) and compares its
result with jacext's; jacext's own rows are compared with the naive per-sample
loop (for the NTK, with torch.func's Jacobian contraction, or nngeometry where that
is n/a). A method that cannot do the workload (missing package, unsupported layer,
error) becomes an "n/a" row with the reason and is neither timed nor measured. On a CUDA
device memory is measured in this process, and each row also gets the step's peak (the model,
its buffers and the batch, plus the peak extra) and its ratio to the plain pass's.
"""

import importlib
import statistics
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from benchmarks.memory import cuda_peak_extra, peak_extra
from benchmarks.methods import Method, Prepared, under_autocast
from benchmarks.registry import methods_for
from benchmarks.timing import interleaved
from benchmarks.workloads import Case, Workload

TOLERANCE = 1e-4  # float32: max |difference| allowed, relative to max(1, max |reference|)
AUTOCAST_TOLERANCE = 3e-2  # the same under bfloat16 autocast (8 bits of mantissa)


@dataclass
class Row:
    """One method's line in a workload's table; times in seconds, memory in MiB."""

    method: str
    family: str
    available: bool = True
    reason: str = ""
    warnings: List[str] = field(default_factory=list)
    compared_with: str = ""
    max_diff: Optional[float] = None
    mismatch: bool = False
    samples_s: List[float] = field(default_factory=list)
    median_s: Optional[float] = None
    ratio_plain: Optional[float] = None
    ratio_fastest_peer: Optional[float] = None
    baseline_mib: Optional[float] = None
    peak_extra_mib: Optional[float] = None
    step_peak_mib: Optional[float] = None
    ratio_plain_memory: Optional[float] = None


def first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def _prepare(method: Method, case: Case, row: Row) -> Optional[Tuple[Prepared, Optional[List[Tensor]]]]:
    """Set the method up and run it once: ``(prepared, result)``, or ``None`` with ``row`` marked n/a."""
    try:
        importlib.import_module(method.needs)
    except ImportError as error:
        row.available, row.reason = False, f"{method.needs} not importable ({first_line(error)})"
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared: Optional[Prepared] = None
        try:
            prepared = method.setup(case)
            result = prepared.standard(prepared.run())
        except Exception as error:  # a peer's failure is a result of the benchmark
            row.available, row.reason = False, first_line(error)
            prepared = None
    row.warnings = sorted({str(w.message).split(". ")[0][:200] for w in caught})
    return None if prepared is None else (prepared, result)


def _compare(row: Row, result: List[Tensor], reference: List[Tensor], against: str, tolerance: float) -> None:
    row.compared_with = against
    if [r.shape for r in result] != [r.shape for r in reference]:
        row.mismatch = True
        row.reason = f"shapes {[tuple(r.shape) for r in result]} != {[tuple(r.shape) for r in reference]}"
        return
    row.max_diff = max((a - b).abs().max().item() for a, b in zip(result, reference, strict=True))
    scale = max(1.0, max(r.abs().max().item() for r in reference))
    row.mismatch = row.max_diff > tolerance * scale


def _check(
    case: Case, methods: List[Method], tolerance: float
) -> Tuple[List[Row], Dict[str, Callable[[], object]]]:
    """Run every method once and compare; the rows and the runs to time, in table order.

    The reference peers (``Method.reference``: the naive loop, for the NTK the
    contractions) and jacext's first method go first and keep their results; jacext's
    rows are compared with the first reference that could do the workload, every
    other row with jacext's first method. Other results are compared as they come and
    dropped (the Jacobians are large).
    """
    rows = {m.name: Row(m.name, m.family) for m in methods}
    ours = next(m.name for m in methods if m.family == "jacext")
    candidates = [m.name for m in methods if m.reference]
    kept: Dict[str, List[Tensor]] = {}
    runs = {}
    for method in sorted(methods, key=lambda m: (not m.reference, m.name != ours)):
        row = rows[method.name]
        outcome = _prepare(method, case, row)
        if outcome is None:
            continue
        runs[method.name], result = outcome[0].run, outcome[1]
        if result is None:  # the plain pass computes no per-sample quantity
            continue
        if method.reference or method.name == ours:
            kept[method.name] = result
            continue
        reference = next((name for name in candidates if name in kept), None)
        against = reference if method.family == "jacext" else ours
        if against is not None and against in kept:
            _compare(row, result, kept[against], against, tolerance)
    reference = next((name for name in candidates if name in kept), None)
    if ours in kept:  # the references ran before jacext's result existed
        for name in candidates:
            if name in kept:
                _compare(rows[name], kept[name], kept[ours], ours, tolerance)
        if reference is not None:
            _compare(rows[ours], kept[ours], kept[reference], reference, tolerance)
    return list(rows.values()), {name: runs[name] for name in rows if name in runs}


def _state_mib(case: Case) -> float:
    """The model's parameters and buffers and the batch, in MiB."""
    tensors = [*case.model.parameters(), *case.model.buffers(), case.x, case.y]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _measure_memory(
    workload: Workload, case: Case, rows: List[Row], methods: List[Method], quick: bool, autocast
) -> None:
    by_name = {m.name: m for m in methods}
    for row in rows:
        if row.available:
            if case.x.is_cuda:
                measured = cuda_peak_extra(case, by_name[row.method])
            else:
                measured = peak_extra(workload.name, row.method, quick, autocast)
            row.baseline_mib, row.peak_extra_mib = measured["baseline_mib"], measured["peak_extra_mib"]
    if not case.x.is_cuda:  # ru_maxrss's growth is not the step's own peak
        return
    state = _state_mib(case)
    for row in rows:
        if row.peak_extra_mib is not None:
            row.step_peak_mib = state + row.peak_extra_mib
    plain = next((r.step_peak_mib for r in rows if r.family == "plain"), None)
    for row in rows:
        if row.step_peak_mib is not None and plain:
            row.ratio_plain_memory = row.step_peak_mib / plain


def run_workload(
    workload: Workload,
    quick: bool,
    repeats: int,
    min_run_time: float,
    memory: bool = True,
    device: str = "cpu",
    autocast: Optional[torch.dtype] = None,
) -> dict:
    """Rows (as dicts) and the workload's description; ``autocast``: the methods run under
    ``torch.autocast`` to that dtype (and are compared with :data:`AUTOCAST_TOLERANCE`)."""
    case = workload.build(quick, device=device)
    methods = methods_for(workload.quantity)
    if autocast is not None:
        methods = [under_autocast(m, case.x.device.type, autocast) for m in methods]
    rows, runs = _check(case, methods, TOLERANCE if autocast is None else AUTOCAST_TOLERANCE)
    samples = interleaved(runs, repeats, min_run_time)
    runs.clear()  # what the runs left behind (results on parameters) is freed before memory is measured
    for row in rows:
        if row.method in samples:
            row.samples_s = samples[row.method]
            row.median_s = statistics.median(row.samples_s)
    plain = next((r.median_s for r in rows if r.family == "plain"), None)
    peers = [r.median_s for r in rows if r.family == "peer" and r.median_s is not None and not r.mismatch]
    for row in rows:
        if row.median_s is not None:
            row.ratio_plain = row.median_s / plain if plain else None
            row.ratio_fastest_peer = row.median_s / min(peers) if peers else None
    if memory:
        _measure_memory(workload, case, rows, methods, quick, autocast)
    return {
        "name": workload.name,
        "title": workload.title if not quick else f"{workload.title} (quick: tiny sizes, B={case.x.shape[0]})",
        "quantity": workload.quantity,
        "batch": int(case.x.shape[0]),
        "device": str(case.x.device),
        "precision": "float32" if autocast is None else f"{str(autocast).removeprefix('torch.')} autocast",
        "rows": [asdict(r) for r in rows],
    }
