"""Side-by-side benchmark of jacext and its peers: ``python -m benchmarks --help``.

Modules: :mod:`~benchmarks.workloads` (models and batches),
:mod:`~benchmarks.methods` (the reference pass and jacext),
:mod:`~benchmarks.peers` (torch.func, ExpandedWeights, Opacus, BackPACK,
nngeometry, a naive loop), :mod:`~benchmarks.harness` (check, time, measure),
:mod:`~benchmarks.timing`, :mod:`~benchmarks.memory`, :mod:`~benchmarks.report`;
:mod:`~benchmarks.scaling` (``python -m benchmarks.scaling``: cost against N, C and width);
:mod:`~benchmarks.gpu_check` (``python -m benchmarks.gpu_check``: the CUDA tests and the benchmark on a GPU).
Not part of the installed package: run from the repository's root.
"""
