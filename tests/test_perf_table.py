"""The headline performance table: one function renders it for both READMEs and `make bench`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from perf.table import READMES, headline_table, replace_block, table_in


def test_the_readmes_show_the_table_of_the_stored_results() -> None:
    table = headline_table()
    for path in READMES:
        assert table_in(path) == table, f"{path.name}: run python -m perf.table --write"


def test_the_table_shows_every_repeat_and_the_median(tmp_path: Path) -> None:
    pairs = [{"forward_s": 10.0, "floor_s": 40.0, "fit_s": f, "ratio": f / 10.0,
              "floor_ratio": 4.0, "load_average": [load, 0.0, 0.0]}
             for f, load in ((30.0, 2.0), (50.0, 7.5), (40.0, 3.0))]
    machine = {"cpu": "test CPU", "cores": 2, "torch": "2.x"}
    result = {"machine": machine, "model": "vgg16", "images": 64, "size": 224, "batch": 16,
              "threads": 2, "date": "2026-12-03", "pairs": pairs, "ratio_median": 4.0}
    (tmp_path / "fit_whole_vgg16_224_64img.json").write_text(json.dumps(result))
    table = headline_table(tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| vgg16"))
    assert "**4.00** (median; 3.00, 5.00, 4.00; not met)" in row
    assert "| 4.00, 4.00, 4.00 |" in row and "| 2.0, 7.5, 3.0 |" in row
    assert "Machine: test CPU, 2 cores" in table


def test_replace_block_keeps_the_rest() -> None:
    text = "a\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\nb\n"
    new = replace_block(text, "new")
    assert new == "a\n<!-- perf-table:start -->\nnew\n<!-- perf-table:end -->\nb\n"
    with pytest.raises(ValueError, match="block"):
        replace_block("no markers", "x")
