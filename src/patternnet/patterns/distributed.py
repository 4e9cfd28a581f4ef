"""Fitting patterns with ``torch.distributed``: shard the data, sum, all-reduce once.

The statistics of method.md §2 are sums, so a fit over N processes is exact: each rank adds
its own share of the data, one all-reduce adds the ranks' sums (:meth:`Statistics.all_reduce_`),
and every rank then holds the statistics of the whole data set (rank 0 writes the file).

Running on a cluster
--------------------
Launch one process per GPU (or per CPU socket) with ``torchrun``; each process calls
:func:`init_from_env` (the ``patternnet fit`` command does), which reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and picks NCCL on GPUs and
gloo on CPUs::

    # one machine, 4 GPUs
    torchrun --nproc-per-node 4 -m patternnet fit ...
    # two machines with 8 GPUs each (run on both; MASTER is the first machine's address)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint MASTER:29500 -m patternnet fit ...

From Python, initialise the process group yourself (or call :func:`init_from_env`) and call
:func:`~patternnet.patterns.fit.fit_patterns` on every rank with the *whole* data: it shards
the data itself (``distributed=None`` detects the initialised group).

Sharding never repeats a sample (unlike ``DistributedSampler``, which pads the last round):

- a tensor is cut into ``world_size`` contiguous slices;
- a map-style ``DataLoader`` is rebuilt with a sampler that gives rank ``r`` every
  ``world_size``-th index of the original order (starting at ``r``), or, with a custom batch
  sampler, every ``world_size``-th batch;
- any other iterable (generators, iterable datasets) is read in full by every rank, and rank
  ``r`` keeps every ``world_size``-th batch (correct, but each rank loads all the data: shard
  such data yourself and pass ``distributed=False`` with a final
  :meth:`Statistics.all_reduce_` for large data sets).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sized
from datetime import timedelta
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from .batches import iter_batches

__all__ = [
    "init_from_env",
    "is_initialized",
    "is_main_process",
    "local_device",
    "rank",
    "shard",
    "shutdown",
    "world_size",
]


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""

    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""

    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that writes files."""
    return rank() == 0


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_minutes: float | None = None) -> bool:
    """Initialise ``torch.distributed`` from the environment ``torchrun`` sets, if any.

    Parameters
    ----------
    backend:
        ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
    timeout_minutes:
        How long a collective (the final all-reduce) waits for the other ranks before it
        fails instead of hanging; default torch's (30 minutes for gloo).

    Returns
    -------
    bool
        True when a process group is (now) initialised, False when the process was not
        launched by ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``):
        then nothing is done and the fit runs in one process.
    """

    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(
            "WORLD_SIZE is set but this torch build has no torch.distributed; run in one process"
        )
    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
            "(torchrun --nproc-per-node N -m patternnet fit ...)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    options = {}
    if timeout_minutes is not None:

        options["timeout"] = timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend=backend, init_method="env://", **options)
    return True


def shutdown() -> None:
    """Destroy the process group if one is initialised (call at the end of a script)."""

    if is_initialized():
        dist.destroy_process_group()


def resolve(distributed: bool | None) -> bool:
    """Whether a fit runs distributed: ``None`` = when a process group is initialised."""
    if distributed is None:
        return is_initialized() and world_size() > 1
    if distributed and not is_initialized():
        raise ValueError(
            "distributed=True but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group (or patternnet.patterns.distributed."
            "init_from_env under torchrun) first"
        )
    return bool(distributed)


# ---------------------------------------------------------------------------- sharding
class _ShardSampler:
    """Every ``world``-th index of ``base`` (after the first ``limit``), from ``rank`` on."""

    def __init__(self, base: Iterable[Any], rank: int, world: int, limit: int | None) -> None:
        self.base, self.rank, self.world, self.limit = base, rank, world, limit

    def _total(self) -> int:
        total = len(self.base)  # type: ignore[arg-type]
        return total if self.limit is None else min(total, self.limit)

    def __iter__(self) -> Iterator[Any]:
        source: Iterator[Any] = iter(self.base)
        if self.limit is not None:
            source = islice(source, self.limit)
        return islice(source, self.rank, None, self.world)

    def __len__(self) -> int:
        return len(range(self.rank, self._total(), self.world))


class _RoundRobin:
    """Batches ``rank``, ``rank + world``, ... of any iterable of batches."""

    def __init__(self, data: Any, batch_size: int | None, limit: int | None, rank: int,
                 world: int) -> None:
        self.data, self.batch_size, self.limit = data, batch_size, limit
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[Tensor]:
        for index, batch in enumerate(iter_batches(self.data, self.batch_size, limit=self.limit)):
            if index % self.world == self.rank:
                yield batch


def _is_random_without_seed(sampler: Any) -> bool:

    return isinstance(sampler, RandomSampler) and sampler.generator is None


def _rebuild_loader(loader: Any, **changes: Any) -> Any:

    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    kwargs.update(changes)
    return DataLoader(loader.dataset, **kwargs)


def shard(
    data: Any, batch_size: int | None, limit: int | None, rank: int, world: int
) -> tuple[Any, int | None]:
    """This rank's share of ``data`` and the ``limit`` left to apply to it.

    Parameters
    ----------
    data:
        What :func:`~patternnet.patterns.fit.iter_batches` accepts.
    batch_size:
        The batch size for tensor data (or generic iterables).
    limit:
        The number of samples of the whole fit (over all ranks), or None.
    rank, world:
        This process's rank and the number of processes.

    Returns
    -------
    data, limit:
        The shard (same kinds of data) and the limit to apply to it (None when the shard
        already respects the global limit).

    Raises
    ------
    ValueError
        For a shuffling ``DataLoader`` without a seeded generator: the ranks would draw
        different orders and their shards would overlap.
    """
    if world <= 1:
        return data, limit

    if isinstance(data, Tensor):
        if limit is not None:
            data = data[:limit]
        return torch.tensor_split(data, world)[rank], None
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        if data.batch_size is not None:
            if _is_random_without_seed(data.sampler):
                raise ValueError(
                    "the DataLoader shuffles without a seeded generator, so each rank would "
                    "draw another order and the shards would overlap; pass shuffle=False "
                    "(the order does not change the sums) or generator=torch.Generator()"
                    ".manual_seed(0)"
                )
            sampler = _ShardSampler(data.sampler, rank, world, limit)
            return _rebuild_loader(
                data, batch_size=data.batch_size, sampler=sampler, drop_last=data.drop_last
            ), None
        if limit is None and isinstance(data.batch_sampler, Sized):
            if _is_random_without_seed(getattr(data.batch_sampler, "sampler", None)):
                raise ValueError(
                    "the DataLoader's batch sampler shuffles without a seeded generator; the "
                    "ranks' shards would overlap: use a sequential or seeded sampler"
                )
            batches = _ShardSampler(data.batch_sampler, rank, world, None)
            return _rebuild_loader(data, batch_sampler=batches), None
    return _RoundRobin(data, batch_size, limit, rank, world), None
