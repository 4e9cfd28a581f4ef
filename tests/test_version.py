"""One version string: the package, the command line and the installed metadata agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import patternnet
from patternnet.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_pep440_and_in_the_changelog() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", patternnet.__version__)
    assert patternnet.__version__ in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject and "\nversion =" not in pyproject.split(
        "[tool.setuptools.dynamic]")[0]


def test_cli_version(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"patternnet {patternnet.__version__}"

