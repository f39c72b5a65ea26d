"""Side-by-side benchmark of jacext and its peers: ``python -m jacext.bench --help``.

Modules: :mod:`~jacext.bench.workloads` (models and batches),
:mod:`~jacext.bench.methods` (the reference pass and jacext),
:mod:`~jacext.bench.peers` (torch.func, ExpandedWeights, Opacus, BackPACK,
nngeometry, a naive loop), :mod:`~jacext.bench.harness` (check, time, measure),
:mod:`~jacext.bench.timing`, :mod:`~jacext.bench.memory`, :mod:`~jacext.bench.report`;
:mod:`~jacext.bench.scaling` (``python -m jacext.bench.scaling``: cost against N, C and width).
"""
