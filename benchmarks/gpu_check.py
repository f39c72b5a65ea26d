"""``python -m benchmarks.gpu_check [--out gpu-results] [--budget-s 420]``: issue #17's checks on one GPU.

With a CUDA device, in this order, each part timed:

1. the test cases that run on CUDA (``pytest -k cuda`` over ``tests``: the fuzz tests' ``cuda``
   device, skipped where there is none), for at most ``--tests-budget-s`` seconds;
2. the benchmark (:func:`benchmarks.harness.run_workload`) on the GPU for :data:`GPU_WORKLOADS`,
   all in float32 (TF32 off), then all under bfloat16 autocast, with every peer that runs each:
   medians of ``torch.utils.benchmark`` blocks (which synchronise the device), peak memory from
   ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; a workload whose turn
   comes once ``--budget-s`` seconds (tests included) have passed is skipped with a note;
3. ``gpu-check.json`` (everything), ``gpu-check.md`` (the tables and the issue's targets) and
   ``pytest.txt`` (the tests' output) under ``--out``.

Without a CUDA device it prints "no CUDA device: nothing run" and exits 0.
"""

import argparse
import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from benchmarks.harness import first_line, run_workload
from benchmarks.report import header, table
from benchmarks.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent
GPU_WORKLOADS = ["gpt2-dp", "mlp", "cnn", "resnet18", "transformer", "mlp-jacobian", "ntk-trace-1024", "ntk-full-1024"]
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}
GRAD_TARGET = 0.7  # jacext's per-sample gradients / the fastest peer
DP_TIME_TARGET, DP_MEMORY_TARGET = 1.2, 1.05  # ClipGrad's DP step / the plain step: time, peak memory
NTK_TARGET = 0.1  # jacext.ntk / torch.func's Jacobian contraction
TORCH_FUNC_NTK = "torch.func Jacobian contraction"


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="gpu-results", help="folder for the results (%(default)s)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="total seconds (%(default)s)")
    parser.add_argument("--tests-budget-s", type=float, default=150.0, help="seconds for the tests (%(default)s)")
    parser.add_argument("--no-tests", action="store_true", help="skip part 1")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=GPU_WORKLOADS)
    parser.add_argument("--precisions", nargs="+", choices=list(AUTOCAST), default=list(AUTOCAST))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (%(default)s)")
    parser.add_argument("--min-run-time", type=float, default=0.05, help="seconds per block (%(default)s)")
    return parser.parse_args(argv)


def run_tests(budget_s: float, log: Path) -> dict:
    """The CUDA test cases in a child process (its group killed after ``budget_s``); output to ``log``."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", "cuda"]
    if importlib.util.find_spec("xdist"):
        command += ["-n", "4"]
    timed_out = False
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    ) as child:
        try:
            output, _ = child.communicate(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            timed_out = True
    log.write_text(output)
    lines = [line for line in output.splitlines() if line.strip()]
    return {
        "command": " ".join(command[1:]),
        "returncode": None if timed_out else child.returncode,
        "timed_out": timed_out,
        "summary": f"stopped after {budget_s:.0f} s" if timed_out else (lines[-1] if lines else ""),
    }


def run_benchmark(
    names: List[str],
    precisions: List[str],
    until: float,
    repeats: int,
    min_run_time: float,
    device: str = "cuda",
    quick: bool = False,
    memory: bool = True,
) -> Tuple[List[dict], List[str]]:
    """Every workload in float32, then under each autocast, until ``time.perf_counter()`` passes
    ``until``: the results (with their ``seconds``) and a note for each one not run."""
    results, skipped = [], []
    for precision in precisions:
        for name in names:
            if time.perf_counter() > until:
                skipped.append(f"{name}, {precision}: over the time budget")
                continue
            began = time.perf_counter()
            try:
                result = run_workload(
                    WORKLOADS[name], quick, repeats, min_run_time, memory, device=device, autocast=AUTOCAST[precision]
                )
                results.append({**result, "seconds": time.perf_counter() - began})
            except Exception as error:  # out of memory while timing, a failed build: noted, the rest goes on
                skipped.append(f"{name}, {precision}: {first_line(error)}")
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"{name}, {precision}: {time.perf_counter() - began:.1f} s", flush=True)
    return results, skipped


def targets(workloads: List[dict]) -> List[dict]:
    """Issue #17's targets against the measured rows: ``{target, workload, precision, method, measured, met}``."""
    found = []

    def add(target: str, workload: dict, row: dict, measured: Optional[float], limit: float) -> None:
        found.append(
            {
                "target": target,
                "workload": workload["name"],
                "precision": workload["precision"],
                "method": row["method"],
                "measured": measured,
                "met": None if measured is None else measured <= limit,
            }
        )

    for workload in workloads:
        rows = {r["method"]: r for r in workload["rows"]}
        ours = [r for r in workload["rows"] if r["family"] == "jacext"]
        for row in ours:
            if workload["quantity"] == "grad":
                add(f"≤ {GRAD_TARGET}× the fastest peer", workload, row, row["ratio_fastest_peer"], GRAD_TARGET)
            elif workload["quantity"] == "dp-step":
                add(f"≤ {DP_TIME_TARGET}× the plain step", workload, row, row["ratio_plain"], DP_TIME_TARGET)
                memory = row["ratio_plain_memory"]
                add(f"peak memory ≤ {DP_MEMORY_TARGET}× the plain step's", workload, row, memory, DP_MEMORY_TARGET)
            elif workload["quantity"].startswith("ntk"):
                peer = rows.get(TORCH_FUNC_NTK, {}).get("median_s")
                ratio = row["median_s"] / peer if peer and row["median_s"] else None
                add(f"≤ {NTK_TARGET}× {TORCH_FUNC_NTK}", workload, row, ratio, NTK_TARGET)
    return found


def markdown(report: dict) -> str:
    h, parts = report["header"], report["parts_s"]
    lines = [
        f"`{h['command']}` — {h['date']}",
        "",
        f"{h['device']}, CUDA {h['cuda']}, torch {h['torch']}, Python {h['python']}; "
        + ", ".join(f"{p} {v}" for p, v in h["versions"].items()),
        f"float32 with TF32 off; timing: {h['repeats']} interleaved rounds of "
        f"blocked_autorange(min_run_time={h['min_run_time']} s), median of the rounds' medians",
        "",
        "Parts: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in parts.items()),
    ]
    if report["tests"]:
        lines += ["", f"Tests (`{report['tests']['command']}`): {report['tests']['summary']}"]
    lines += ["", "## Targets (issue #17)", "", "| target | workload | precision | method | measured | met |"]
    lines.append("|---|---|---|---|---|---|")
    for t in report["targets"]:
        measured = "–" if t["measured"] is None else f"{t['measured']:.3g}×"
        met = {True: "yes", False: "no", None: "–"}[t["met"]]
        lines.append(f"| {t['target']} | {t['workload']} | {t['precision']} | {t['method']} | {measured} | {met} |")
    for workload in report["workloads"]:
        lines += ["", table({**workload, "title": f"{workload['title']} — {workload['precision']}"})]
    if report["skipped"]:
        lines += ["", "Not run:", *[f"- {note}" for note in report["skipped"]]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing run")
        return 0
    start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "header": {
            **header(argv),
            "command": " ".join(["python -m benchmarks.gpu_check", *argv]),
            "device": torch.cuda.get_device_name(),
            "cuda": torch.version.cuda,
            "repeats": args.repeats,
            "min_run_time": args.min_run_time,
        },
        "parts_s": {},
        "tests": None,
    }
    if not args.no_tests:
        report["tests"] = run_tests(min(args.tests_budget_s, args.budget_s), out / "pytest.txt")
        report["parts_s"]["tests"] = time.perf_counter() - start
        print(f"tests: {report['parts_s']['tests']:.1f} s ({report['tests']['summary']})", flush=True)
    bench_start = time.perf_counter()
    report["workloads"], report["skipped"] = run_benchmark(
        args.workloads, args.precisions, start + args.budget_s, args.repeats, args.min_run_time
    )
    report["parts_s"]["benchmark"] = time.perf_counter() - bench_start
    report["targets"] = targets(report["workloads"])
    report["parts_s"]["total"] = time.perf_counter() - start
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu-check.md").write_text(markdown(report))
    print(f"benchmark: {report['parts_s']['benchmark']:.1f} s; total {report['parts_s']['total']:.1f} s")
    print(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    for note in report["skipped"]:
        print(f"not run: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
