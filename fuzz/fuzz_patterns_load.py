"""atheris harness: ``Patterns.load`` on arbitrary bytes (coverage-guided, outside CI).

    python fuzz/fuzz_patterns_load.py /tmp/corpus-load tests/fuzz_corpus -max_total_time=600

The first folder receives the inputs libFuzzer finds interesting; ``tests/fuzz_corpus``
seeds it. The contract checked (``tests/test_fuzz.py: check_load_bytes``): the loader returns
usable patterns or raises ``ValueError``; any other exception is a crash (saved by libFuzzer
as ``crash-*``: add it to ``tests/fuzz_corpus`` with a regression test).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

with atheris.instrument_imports(include=["patternnet", "safetensors"]):
    from test_fuzz import check_load_bytes

FOLDER = Path(tempfile.mkdtemp(prefix="fuzz-load-"))


def one_input(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_load_bytes(data, FOLDER)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
