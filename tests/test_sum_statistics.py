"""A residual sum's statistics read in the model's own layout (issue 13, cost).

The default fit reads each sum's summands where the model holds them, ``(N, U, P)``, one
batched product per summand; these tests hold it to the float64 reference (and to the
unit-major reading it replaced) for every estimator's set of sums.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from patternnet.engine.nodes import sum_call
from patternnet.patterns.graph_statistics import update_channelwise
from patternnet.patterns.statistics import LayerStatistics, required_sums

UNITS, SUMMANDS = 6, 3


def batches(dtype: torch.dtype = torch.float32) -> list[tuple[tuple[Tensor, ...], Tensor]]:
    """Summands far from zero (a ReLU's output, a shifted one, a wide one) and their sum."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (5, 3, 5):  # a smaller batch in between: the buffers are views of one workspace
        relu = torch.relu(torch.randn(n, UNITS, 4, 5, generator=g)) * 2.0
        shifted = torch.randn(n, UNITS, 4, 5, generator=g) * 0.3 + 8.0
        wide = torch.randn(n, UNITS, 4, 5, generator=g) * 3.0 - 9.0
        summands = (relu.to(dtype), shifted.to(dtype), wide.to(dtype))
        out.append((summands, summands[0] + summands[1] + summands[2]))
    return out


def fit(precision: str, sums: frozenset, native: bool = True,
        dtype: torch.dtype = torch.float32) -> tuple[LayerStatistics, dict]:  # fmt: skip
    stats = LayerStatistics(UNITS, UNITS, SUMMANDS, sums, "cpu")
    workspace: dict = {}
    for summands, y in batches(dtype):
        call = sum_call(summands, y, summands)
        if not native:
            call.native = None
        update_channelwise(stats, call, precision, workspace)
    stats.flush()
    return stats, workspace


@pytest.mark.parametrize(
    "estimator, negative",
    [("two_component", True), ("two_component", False), ("linear", True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_read_in_place_equal_the_float64_reference(estimator, negative, dtype) -> None:
    sums = required_sums(estimator, negative, "float32")
    reference, _ = fit("float64", required_sums(estimator, negative, "float64"), dtype=dtype)
    ours, workspace = fit("float32", sums, dtype=dtype)
    before, _ = fit("float32", sums, native=False, dtype=dtype)
    assert workspace, "the sum was not read in place"
    assert set(ours.tensors) == set(before.tensors)
    for key, value in ours.tensors.items():
        if not isinstance(value, Tensor):
            assert value == before.tensors[key] == reference.tensors[key], key
            continue
        exact = reference.tensors[key]
        assert value.shape == exact.shape == before.tensors[key].shape, key
        error = float((value - exact).abs().max() / exact.abs().max())
        assert error < 1e-6, (key, error)
        torch.testing.assert_close(value, before.tensors[key], rtol=1e-5, atol=1e-5 * float(
            exact.abs().max()))


def test_workspace_is_reused_from_batch_to_batch() -> None:
    stats = LayerStatistics(UNITS, UNITS, SUMMANDS, required_sums("two_component", True,
                                                                  "float32"), "cpu")  # fmt: skip
    workspace: dict = {}
    pointers = set()
    for summands, y in batches():
        update_channelwise(stats, sum_call(summands, y, summands), "float32", workspace)
        pointers.add(workspace[y.device].data_ptr())
    assert len(pointers) == 1
