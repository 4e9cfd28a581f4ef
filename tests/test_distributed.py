"""A 2-process gloo fit equals the 1-process fit (method.md §2: the sums all-reduce exactly).

Two processes are spawned on this machine (``torch.multiprocessing``, gloo backend); each
fits the same float64 model on the whole data with ``distributed=None`` (detected), so the
library shards it. Rank 0 saves what it got; the test compares with a one-process fit.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import patternnet as pn
from patternnet.patterns import distributed as distributed_mod
from patternnet.patterns.checkpoint import load_checkpoint
from patternnet.patterns.fit import iter_batches

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

BATCH = 4
N = 22


def make_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).double()


def make_data() -> torch.Tensor:
    return torch.randn(N, 2, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def data_forms(x: torch.Tensor) -> dict[str, object]:
    return {
        "tensor": x,
        "loader": DataLoader(TensorDataset(x, torch.zeros(N)), batch_size=BATCH),
        "generator": (b for b in x.split(BATCH)),
    }


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert distributed_mod.init_from_env(backend="gloo", timeout_minutes=2)
    try:
        x = make_data()
        results = {}
        for name, data in data_forms(x).items():
            patterns = pn.fit_patterns(make_model(), data, batch_size=BATCH, progress=False)
            results[name] = patterns
        limited = pn.fit_patterns(make_model(), data_forms(x)["loader"], limit=13,
                                  progress=False, estimator="linear")
        checkpointed = pn.fit_patterns(make_model(), x, batch_size=BATCH, progress=False,
                                       checkpoint=Path(out) / "fit.ckpt", checkpoint_every=1)
        if distributed_mod.is_main_process():
            for name, patterns in results.items():
                patterns.save(Path(out) / f"{name}.safetensors")
            limited.save(Path(out) / "limited.safetensors")
            checkpointed.save(Path(out) / "checkpointed.safetensors")
    finally:
        distributed_mod.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_patterns_close(a: pn.Patterns, b: pn.Patterns) -> None:
    assert set(a) == set(b)
    assert a.metadata["images"] == b.metadata["images"]
    for name in a:
        assert set(a[name]) == set(b[name])
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-10, atol=1e-12)


def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    x = make_data()
    single = pn.fit_patterns(make_model(), x, batch_size=BATCH, progress=False)
    assert single.metadata["images"] == N
    for name in ("tensor", "loader", "generator", "checkpointed"):
        assert_patterns_close(pn.Patterns.load(tmp_path / f"{name}.safetensors"), single)
    limited = pn.fit_patterns(make_model(), x, limit=13, progress=False, estimator="linear")
    assert_patterns_close(pn.Patterns.load(tmp_path / "limited.safetensors"), limited)
    # Each rank checkpointed its own share; together they hold every sample once.
    shares = [load_checkpoint(tmp_path / f"fit.ckpt.rank{r}of2")[0] for r in range(2)]
    assert sum(s.images for s in shares) == N and all(s.images > 0 for s in shares)


def test_shard_never_repeats_a_sample() -> None:
    x = torch.arange(23.0).view(23, 1)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    for data, limit in ((x, None), (x, 10), (loader, None), (loader, 10)):
        seen = []
        for rank in range(3):
            part, rest = distributed_mod.shard(data, 4, limit, rank, 3)
            seen += [float(v) for b in iter_batches(part, 4, limit=rest) for v in b.flatten()]
        assert sorted(seen) == [float(i) for i in range(limit or 23)]


def test_shard_refuses_unseeded_shuffle() -> None:
    x = torch.randn(8, 2)
    loader = DataLoader(TensorDataset(x), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="seeded generator"):
        distributed_mod.shard(loader, None, None, 0, 2)


def test_distributed_true_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="init_process_group"):
        pn.fit_patterns(make_model(), make_data(), progress=False, distributed=True)
    if "WORLD_SIZE" not in os.environ:
        assert distributed_mod.init_from_env() is False  # not launched by torchrun
