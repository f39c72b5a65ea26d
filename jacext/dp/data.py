"""Data for DP-SGD: Poisson sampling (Opacus's ``DPDataLoader``) and virtual steps
(``BatchMemoryManager``: logical Poisson batches split into physical ones)."""

import math
from typing import Iterator, List, Optional

from torch.utils.data import BatchSampler, DataLoader, Sampler

from jacext.dp.accounting import require_opacus
from jacext.errors import JacextError


def poisson_loader(
    data_loader: DataLoader,
    *,
    distributed: bool = False,
    generator=None,
    batch_first: bool = True,
    rand_on_empty: bool = False,
) -> DataLoader:
    """Opacus's ``DPDataLoader.from_data_loader``: every sample in each batch with probability
    1 / len(data_loader), independently (empty batches possible)."""
    require_opacus("Poisson sampling")
    from opacus.data_loader import DPDataLoader

    return DPDataLoader.from_data_loader(
        data_loader, distributed=distributed, generator=generator, batch_first=batch_first, rand_on_empty=rand_on_empty
    )


def poisson_rate(data_loader: DataLoader) -> Optional[float]:
    """The sampling rate of a loader that samples Poisson batches (Opacus's samplers, also under a
    batch splitter), None for any other loader."""
    sampler = data_loader.batch_sampler
    for _ in range(3):
        if sampler is None:
            return None
        rate = getattr(sampler, "sample_rate", None)
        if rate is not None and hasattr(sampler, "generator"):
            return float(rate)
        sampler = getattr(sampler, "sampler", None)
    return None


class _SplittingSampler(Sampler[List[int]]):
    """Each logical batch of ``sampler`` as physical batches of at most ``size`` samples; tells the
    optimizer which step ends the logical batch (as Opacus's BatchSplittingSampler)."""

    def __init__(self, sampler, size: int, optimizer):
        self.sampler, self.size, self.optimizer = sampler, size, optimizer

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.sampler:
            batch = list(batch)
            if not batch:
                self.optimizer.signal_skip_step(do_skip=False)
                yield []
                continue
            k = math.ceil(len(batch) / self.size)
            q, r = divmod(len(batch), k)  # numpy.array_split's sizes: the first r one longer
            start = 0
            for i in range(k):
                end = start + q + (1 if i < r else 0)
                self.optimizer.signal_skip_step(do_skip=i < k - 1)
                yield batch[start:end]
                start = end

    def __len__(self) -> int:
        rate, n = getattr(self.sampler, "sample_rate", None), getattr(self.sampler, "num_samples", None)
        if rate is not None and n is not None:
            return math.ceil(len(self.sampler) * rate * n / self.size)
        if isinstance(self.sampler, BatchSampler):
            return math.ceil(len(self.sampler) * self.sampler.batch_size / self.size)
        return len(self.sampler)


class BatchMemoryManager:
    """Virtual steps: each logical (Poisson) batch in physical batches of at most
    ``max_physical_batch_size`` samples (Opacus's ``BatchMemoryManager`` interface).

    Inside the block, iterate the loader it gives and call ``optimizer.step()`` after every
    backward pass, as usual: the steps of a logical batch's physical batches accumulate its
    clipped sums; the last adds the noise once, scales by the logical batch's expected size and
    steps; the accountant counts one step of the logical batch.

    Args:
        data_loader: the private data loader (``make_private`` returned it).
        max_physical_batch_size: the most samples one forward/backward pass sees.
        optimizer: the private optimizer (``jacext.dp.DPOptimizer``).

    Example:
        >>> with BatchMemoryManager(data_loader=loader, max_physical_batch_size=16,
        ...                         optimizer=optimizer) as physical:   # doctest: +SKIP
        ...     for x, y in physical:
        ...         optimizer.zero_grad()
        ...         criterion(model(x), y).backward()
        ...         optimizer.step()
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer):
        if not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be a positive int, got {max_physical_batch_size!r}")
        if not hasattr(optimizer, "signal_skip_step"):
            raise JacextError("BatchMemoryManager needs the private optimizer (make_private's), which can skip steps")
        expected = getattr(optimizer, "sample_rate", None)
        rate = poisson_rate(data_loader)
        if expected is not None:
            if rate is None and getattr(optimizer, "poisson_sampling", False):
                raise JacextError(
                    "the data loader does not sample Poisson batches, but the privacy accounting assumes "
                    "it does: pass the data loader that make_private returned"
                )
            if rate is not None and not math.isclose(rate, expected, rel_tol=1e-9):
                raise JacextError(
                    f"the data loader samples at rate {rate}, the accountant counts steps at sample rate "
                    f"{expected}: pass the data loader that make_private returned"
                )
        self.data_loader, self.max_physical_batch_size, self.optimizer = data_loader, max_physical_batch_size, optimizer

    def __enter__(self) -> DataLoader:
        dl = self.data_loader
        return DataLoader(
            dataset=dl.dataset,
            batch_sampler=_SplittingSampler(dl.batch_sampler, self.max_physical_batch_size, self.optimizer),
            num_workers=dl.num_workers,
            collate_fn=dl.collate_fn,
            pin_memory=dl.pin_memory,
            timeout=dl.timeout,
            worker_init_fn=dl.worker_init_fn,
            multiprocessing_context=dl.multiprocessing_context,
            generator=dl.generator,
            prefetch_factor=dl.prefetch_factor,
            persistent_workers=dl.persistent_workers,
        )

    def __exit__(self, *exc) -> None:
        return None
