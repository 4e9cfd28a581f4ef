"""atheris harness: the ``patternnet`` command line on fuzzed arguments (outside CI).

    python fuzz/fuzz_cli.py /tmp/corpus-cli -max_total_time=600

Each input is decoded into a command line: a sub-command, then options taken from the
parser's own option list with values from a list of hostile strings or raw fuzzed text
(``tests/test_fuzz.py``). ``main`` runs on the tiny model ``fuzz_model:make`` with small real
files in a temporary folder and must return 0 or 2; a traceback is a crash.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

with atheris.instrument_imports(include=["patternnet"]):
    from test_fuzz import HOSTILE_VALUES, MAIN_COMMANDS, OPTIONS, check_cli_main, cli_workspace

FOLDER = Path(tempfile.mkdtemp(prefix="fuzz-cli-"))
cli_workspace(FOLDER)
MODELS = ["fuzz_model:make", "torch.nn:Identity", "nope_module:f"]


def command_line(data: atheris.FuzzedDataProvider) -> list[str]:
    command = MAIN_COMMANDS[data.ConsumeIntInRange(0, len(MAIN_COMMANDS) - 1)]
    argv = [command]
    if command != "methods" and data.ConsumeBool():
        argv += ["--model", MODELS[data.ConsumeIntInRange(0, len(MODELS) - 1)],
                 "--out", "{tmp}/out", "--quiet"]
        if command in ("fit", "evaluate"):
            argv += ["--data", "{tmp}/data.npy"]
        if command == "evaluate":
            argv += ["--patterns", "{tmp}/p.safetensors"]
        if command == "explain":
            argv += ["{tmp}/image.png", "--patterns", "{tmp}/p.safetensors"]
    options = [o for o in OPTIONS[command] if o not in ("--help", "-h", "--workers")]
    for _ in range(data.ConsumeIntInRange(0, 4)):
        if options:
            argv.append(options[data.ConsumeIntInRange(0, len(options) - 1)])
        if data.ConsumeBool():
            argv.append(HOSTILE_VALUES[data.ConsumeIntInRange(0, len(HOSTILE_VALUES) - 1)])
        else:
            argv.append(data.ConsumeUnicodeNoSurrogates(12))
    return [a for a in argv if not a.startswith("-h")]


def one_input(raw: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_cli_main(command_line(atheris.FuzzedDataProvider(raw)), FOLDER)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
