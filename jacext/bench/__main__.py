"""``python -m jacext.bench [--quick] [--workloads ...] [--json out.json]``."""

import argparse
import json
import os
import sys
from typing import List, Optional

import torch

from jacext.bench.harness import run_workload
from jacext.bench.report import header, markdown
from jacext.bench.workloads import WORKLOADS


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jacext.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke test, seconds)")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers as JSON")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 5, quick 1)")
    parser.add_argument("--min-run-time", type=float, help="seconds per blocked_autorange (default 0.3, quick 0.01)")
    parser.add_argument("--threads", type=int, help="torch threads (default torch's, quick 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the benchmark, print the tables, return (and optionally write) the report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.quick else threads))
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


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
