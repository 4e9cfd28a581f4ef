"""Run the full torchvision zoo walk model by model and record how far each one gets.

``python tests/zoo_walk_run.py --out walk.jsonl`` walks every classification model that the
fast CI walk (tests/test_zoo_walk.py) leaves out, smallest first, each in its own process
under a memory limit (``--limit-gib``, ``RLIMIT_DATA``: an allocation beyond it fails inside
that process instead of exhausting the machine) and a time limit (``--timeout``). It writes
one JSON line per model: the outcome (``explained``, ``refused``, ``failed``, ``too big``,
``timeout``), the stage it reached (``build``, ``check``, ``fit``, ``explain <method>``),
the error, the seconds and the peak memory. Models already in the output are skipped, so an
interrupted walk resumes. ``--one NAME`` walks one model in this process and prints its
stages (what the parent reads).

The same walk as ``pytest -m slow tests/test_zoo_walk.py`` with ``PATTERNNET_ZOO_ALL=1``,
which stops at the first failure; this runner records every model instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak_gib() -> float:
    """This process's peak resident memory in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def one(name: str) -> int:
    """Walk ``name`` here, printing ``STAGE``/``DONE``/``ERROR`` lines; exit status 0."""
    sys.path.insert(0, str(HERE))
    import test_zoo_walk  # noqa: PLC0415 - the tests folder is not a package

    start = time.perf_counter()

    def record(stage: str) -> None:
        print(f"STAGE {stage} {time.perf_counter() - start:.1f} {peak_gib():.2f}", flush=True)

    try:
        outcome = test_zoo_walk.walk(name, record=record)
    except MemoryError as error:
        print(f"TOOBIG MemoryError: {error}"[:2000].replace("\n", " "), flush=True)
        return 0
    except Exception as error:  # noqa: BLE001 - every failure is recorded, not raised
        text = f"{type(error).__name__}: {error}"
        if "can't allocate memory" in text or "not enough memory" in text:
            print(f"TOOBIG {text}"[:2000].replace("\n", " "), flush=True)
            return 0
        last = traceback.extract_tb(error.__traceback__)[-1]
        where = f" ({Path(last.filename).name}:{last.lineno})"
        print(f"ERROR {text}"[:2000].replace("\n", " ") + where, flush=True)
        return 0
    print(f"DONE {outcome} {peak_gib():.2f}", flush=True)
    return 0


def run_one(name: str, limit_gib: float, timeout: float) -> dict:
    """Walk ``name`` in a child process under the limits; its record."""
    limit = int(limit_gib * 2**30)

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    start = time.perf_counter()
    record: dict = {"model": name, "stage": None, "outcome": None, "error": None, "started": {}}
    try:
        child = subprocess.run(
            [sys.executable, __file__, "--one", name], capture_output=True, text=True,
            timeout=timeout, preexec_fn=limits, env=os.environ.copy(),
        )  # fmt: skip
        lines = child.stdout.splitlines()
        returncode = child.returncode
        stderr = child.stderr
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout or b""
        lines = (out.decode() if isinstance(out, bytes) else out).splitlines()
        returncode, stderr = None, ""
        record["outcome"] = "timeout"
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "STAGE":
            stage, seconds, memory = rest.rsplit(" ", 2)
            record["stage"], record["peak_gib"] = stage, float(memory)
            record["started"][stage] = float(seconds)
        elif kind == "DONE":
            outcome, _, memory = rest.partition(" ")
            record["outcome"], record["peak_gib"] = outcome, float(memory)
        elif kind in ("ERROR", "TOOBIG"):
            record["outcome"] = "failed" if kind == "ERROR" else "too big"
            record["error"] = rest
    if record["outcome"] is None:
        record["outcome"] = "too big" if returncode and returncode < 0 else "failed"
        record["error"] = f"exit status {returncode}: " + stderr.strip()[-1500:]
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="walk this model in this process")
    parser.add_argument("--out", type=Path, help="JSON lines, one per model (appended)")
    parser.add_argument("--limit-gib", type=float, default=7.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per model")
    parser.add_argument("models", nargs="*", help="these models (default: the slow walk's)")
    args = parser.parse_args(argv)
    if args.one:
        return one(args.one)
    if args.out is None:
        parser.error("--out is needed for a walk")
    sys.path.insert(0, str(HERE))
    import test_zoo_walk  # noqa: PLC0415 - the tests folder is not a package

    if args.models:
        names = args.models
    else:
        names = [name for name, _ in test_zoo_walk.slow_selection()]
    done = set()
    if args.out.is_file():
        done = {json.loads(line)["model"] for line in args.out.read_text().splitlines() if line}
    for name in names:
        if name in done:
            continue
        record = run_one(name, args.limit_gib, args.timeout)
        with args.out.open("a") as file:
            file.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
