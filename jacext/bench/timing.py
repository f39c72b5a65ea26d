"""Interleaved timing with ``torch.utils.benchmark.Timer``.

Rounds go round-robin over the methods (the starting method rotates each
round), so slow drifts of the machine's load hit every method alike. In each
round, every method gets one ``blocked_autorange``; its median per call is one
sample, and a method's time is the median of its samples over the rounds.
"""

import warnings
from typing import Callable, Dict, List

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
