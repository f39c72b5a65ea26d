"""Peak extra memory of one method, measured in a child process of its own.

The child (forked from a server that has only imported the benchmark, so it
starts small) builds the workload, sets the method up, warms it up on two
samples, then reads its peak resident set size (``ru_maxrss``), runs the method
once on the full batch and reads it again. The difference is the memory the
method needed beyond the model, the batch and the libraries: activations,
buffers, and the result itself. On a CUDA device, :func:`cuda_peak_extra` measures the same
in this process with ``torch.cuda.max_memory_allocated``.
"""

import gc
import multiprocessing
import resource
import warnings
from typing import Dict, Optional

import torch

from benchmarks.methods import Method, under_autocast
from benchmarks.peers import OPTIONAL_PEERS
from benchmarks.registry import method_named
from benchmarks.workloads import WORKLOADS, Case


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _measure(workload: str, method: str, quick: bool, threads: int, autocast) -> Dict[str, float]:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # reported by the parent's check
    case = WORKLOADS[workload].build(quick)
    m = method_named(method) if autocast is None else under_autocast(method_named(method), "cpu", autocast)
    m.setup(case.slice(2)).run()
    prepared = m.setup(case)
    before = _maxrss_mib()
    result = prepared.run()
    after = _maxrss_mib()
    del result
    return {"baseline_mib": before, "peak_extra_mib": after - before}


def peak_extra(
    workload: str, method: str, quick: bool, autocast: Optional[torch.dtype] = None
) -> Dict[str, float]:
    """``{"baseline_mib", "peak_extra_mib"}`` of ``method`` on ``workload``, from a fresh child."""
    context = multiprocessing.get_context("forkserver")
    # torch.func imports torch._dynamo on first use; failed imports (a missing peer) are skipped
    context.set_forkserver_preload(["benchmarks.memory", "torch._dynamo", *OPTIONAL_PEERS])
    with context.Pool(1) as pool:
        return pool.apply(_measure, (workload, method, quick, torch.get_num_threads(), autocast))


def cuda_peak_extra(case: Case, method: Method) -> Dict[str, float]:
    """The same on ``case``'s CUDA device, in this process: a warm-up on two samples by a setup of
    its own, then a fresh setup and the growth of ``max_memory_allocated`` over one full call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported by the check
        method.setup(case.slice(2)).run()
        case.model.zero_grad(set_to_none=True)  # the plain pass's warm-up gradients
        gc.collect()
        prepared = method.setup(case)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = prepared.run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    del result, prepared
    gc.collect()
    return {"baseline_mib": before / 2**20, "peak_extra_mib": (peak - before) / 2**20}
