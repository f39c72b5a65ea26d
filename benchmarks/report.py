"""The run's header (versions, threads, load) and the markdown tables."""

import datetime
import os
import platform
import sys
from importlib import metadata
from typing import List, Optional

import torch

LOOP = "naive per-sample loop"
PACKAGES = ["jacext", "backpack-for-pytorch", "opacus", "nngeometry"]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def header(argv: List[str]) -> dict:
    """What the numbers depend on, taken before the run (``loadavg_after`` is added at the end)."""
    return {
        "command": " ".join(["python -m benchmarks", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "versions": {p: _version(p) for p in PACKAGES},
        "loadavg_before": list(os.getloadavg()),
    }


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3g}"


def _diff(row: dict) -> str:
    if row["max_diff"] is None:
        return row["reason"] if row["mismatch"] else "–"
    text = f"{row['max_diff']:.1e}" + (" ✗ mismatch" if row["mismatch"] else "")
    if row["family"] != "jacext":
        return text
    return f"{text} (vs {'loop' if row['compared_with'] == LOOP else row['compared_with']})"


def table(workload: dict) -> str:
    """One workload's markdown table, then the reasons and warnings worth knowing; with a column
    for the step's peak memory against the plain pass's where that was measured (on CUDA)."""
    step = any(row["ratio_plain_memory"] is not None for row in workload["rows"])
    lines = [
        f"### {workload['title']}",
        "",
        "| method | median time | × plain | × fastest peer | peak extra memory | "
        + ("× plain peak memory | " if step else "")
        + "max diff vs jacext |",
        "|---|---|---|---|---|---|" + ("---|" if step else ""),
    ]
    notes = []
    for row in workload["rows"]:
        if not row["available"]:
            lines.append(f"| {row['method']} | n/a: {row['reason']} | | | | |" + (" |" if step else ""))
            continue
        memory = "–" if row["peak_extra_mib"] is None else f"{row['peak_extra_mib']:.0f} MiB"
        step_memory = f"{_ratio(row['ratio_plain_memory'])} | " if step else ""
        lines.append(
            f"| {row['method']} | {_time(row['median_s'])} | {_ratio(row['ratio_plain'])} | "
            f"{_ratio(row['ratio_fastest_peer'])} | {memory} | {step_memory}{_diff(row)} |"
        )
        notes += [f"- {row['method']} warned: {w}" for w in row["warnings"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def markdown(report: dict) -> str:
    h = report["header"]
    load = lambda key: ", ".join(f"{x:.2f}" for x in h[key])  # noqa: E731
    versions = ", ".join(f"{p} {v}" for p, v in h["versions"].items())
    lines = [
        f"`{h['command']}` — {h['date']}",
        "",
        f"torch {h['torch']}, torch threads: {h['threads']}, {h['cpu']} ({h['cpu_count']} CPUs), "
        f"Python {h['python']}; {versions}",
        "",
        f"load average (1, 5, 15 min) before: {load('loadavg_before')}; after: {load('loadavg_after')}",
        f"timing: {h['repeats']} interleaved rounds of blocked_autorange(min_run_time={h['min_run_time']} s), "
        "median of the rounds' medians",
    ]
    for workload in report["workloads"]:
        lines += ["", table(workload)]
    return "\n".join(lines) + "\n"
