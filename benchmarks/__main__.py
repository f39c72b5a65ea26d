"""``python -m benchmarks [--quick] [--workloads ...] [--json out.json]``; ``--workloads real-models``:
the real models' workloads (:mod:`benchmarks.real_models`)."""

import argparse
import json
import os
import sys
from typing import List, Optional

from benchmarks.harness import run_workload
from benchmarks.real_models import ADDED, REAL_MODELS
from benchmarks.report import header, markdown
from benchmarks.timing import add_timing_arguments, torch_threads
from benchmarks.workloads import WORKLOADS

GROUPS = {"real-models": REAL_MODELS}


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    gpu = [name for name, w in WORKLOADS.items() if not w.on_cpu]
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=[*WORKLOADS, *GROUPS],
        default=[name for name in WORKLOADS if name not in [*gpu, *(w.name for w in ADDED)]],
        help=f"names or groups ({', '.join(GROUPS)}); default: all but {', '.join(gpu)} (sized for a GPU: "
        "benchmarks.gpu_check) and those of benchmarks.real_models but resnet18",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers as JSON")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    add_timing_arguments(parser, min_run_time=0.3)
    args = parser.parse_args(argv)
    args.workloads = [name for group in args.workloads for name in GROUPS.get(group, [group])]
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark, print the tables, return (and optionally write) the report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    with torch_threads(args.threads or (1 if args.quick else None)):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: List[str]) -> dict:
    repeats = args.repeats or (1 if args.quick else 5)
    min_run_time = args.min_run_time or (0.01 if args.quick else 0.3)
    report: dict = {"header": {**header(argv), "quick": args.quick, "repeats": repeats, "min_run_time": min_run_time}}
    report["workloads"] = [
        run_workload(WORKLOADS[name], args.quick, repeats, min_run_time, memory=not args.no_memory)
        for name in args.workloads
    ]
    report["header"]["loadavg_after"] = list(os.getloadavg())
    print(markdown(report), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
