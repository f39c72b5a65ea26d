"""Peak extra memory of one method, measured in a child process of its own.

The child (forked from a server that has only imported the benchmark, so it
starts small) builds the workload, sets the method up, warms it up on two
samples, then reads its peak resident set size (``ru_maxrss``), runs the method
once on the full batch and reads it again. The difference is the memory the
method needed beyond the model, the batch and the libraries: activations,
buffers, and the result itself.
"""

import multiprocessing
import resource
import warnings
from typing import Dict

import torch

from jacext.bench.peers import OPTIONAL_PEERS
from jacext.bench.registry import method_named
from jacext.bench.workloads import WORKLOADS


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(workload: str, method: str, quick: bool, threads: int) -> Dict[str, float]:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # reported by the parent's check
    case = WORKLOADS[workload].build(quick)
    m = method_named(method)
    m.setup(case.slice(2)).run()
    prepared = m.setup(case)
    before = _maxrss_mib()
    result = prepared.run()
    after = _maxrss_mib()
    del result
    return {"baseline_mib": before, "peak_extra_mib": after - before}


def peak_extra(workload: str, method: str, quick: bool) -> Dict[str, float]:
    """``{"baseline_mib", "peak_extra_mib"}`` of ``method`` on ``workload``, from a fresh child."""
    context = multiprocessing.get_context("forkserver")
    # torch.func imports torch._dynamo on first use; failed imports (a missing peer) are skipped
    context.set_forkserver_preload(["jacext.bench.memory", "torch._dynamo", *OPTIONAL_PEERS])
    with context.Pool(1) as pool:
        return pool.apply(_measure, (workload, method, quick, torch.get_num_threads()))
