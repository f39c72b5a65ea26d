"""Interleaved timing with ``torch.utils.benchmark.Timer``.

Rounds go round-robin over the methods (the starting method rotates each
round), so slow drifts of the machine's load hit every method alike. In each
round, every method gets one ``blocked_autorange``; its median per call is one
sample, and a method's time is the median of its samples over the rounds.
"""

import argparse
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.benchmark import Timer


def interleaved(runs: Dict[str, Callable[[], object]], repeats: int, min_run_time: float) -> Dict[str, List[float]]:
    """Seconds per call of each run, one sample per round; warnings were reported by the check."""
    names = list(runs)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    threads = torch.get_num_threads()  # Timer would otherwise use one thread
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            timer = Timer(stmt="run()", globals={"run": runs[name]}, num_threads=threads, label=name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                samples[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return samples


def add_timing_arguments(parser: argparse.ArgumentParser, min_run_time: float) -> None:
    """--quick, --repeats, --min-run-time and --threads, shared by the benchmark's commands."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke test, seconds)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 5, quick 1)")
    parser.add_argument(
        "--min-run-time", type=float, help=f"seconds per blocked_autorange (default {min_run_time}, quick 0.01)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default torch's, quick 1)")


@contextmanager
def torch_threads(n: Optional[int]):
    """torch's thread count set to ``n`` (unchanged for None) for the duration."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)
