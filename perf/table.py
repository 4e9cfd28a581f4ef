"""The headline table of the README and perf/README: the whole default fit against forward.

One function, :func:`headline_table`, turns the stored results (``perf/results/
fit_whole_*.json`` from ``python -m perf.fit --whole`` and ``setup_*.json`` from
``python -m perf.setup``) into the Markdown table both READMEs show; ``make bench`` prints it
after measuring, and ``python -m perf.table --write`` puts it between the
``<!-- perf-table -->`` markers of both files (``tests/test_perf_table.py`` checks they agree).

Usage: python -m perf.table            (print)
       python -m perf.table --write    (also rewrite the READMEs' tables)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
#: The files that show the table, between these markers.
READMES = (HERE.parent / "README.md", HERE / "README.md")
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
#: The goal of issue 15: the default fit at most this many times forward-only inference.
GOAL = 3.5


def _load(pattern: str, results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob(pattern))]


def headline_table(results: Path = RESULTS) -> str:
    """The Markdown table of every stored whole-call and setup measurement.

    Every figure is the default ``fit_patterns(model, images, batch_size=B)`` call in wall
    time, everything included (setup, pass, solve), except where the row names its setting.
    """
    lines = [
        f"Default `fit_patterns` call, wall time, everything included, against forward-only "
        f"inference over the same images in the same process (goal ≤ {GOAL} × forward). The "
        "floor is forward plus the weight-gradient products with the default fit's stacked "
        "output gradients (3·O + 1 per layer before `negative=\"auto\"`; since then 2·O in "
        "layers read only through ReLUs), measured in the same run. Random weights, "
        "Fashion-MNIST images resized "
        "and ImageNet-normalised; `load` is the 1-minute load average of the 2-core machine "
        "at the end of each repeat (shared with other work).",
        "",
        "| model | images × size² | batch | threads | fit s | forward s | fit ÷ forward | "
        "floor ÷ forward | load | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    wholes = _load("fit_whole_*.json", results)
    machines = sorted({f"{r['machine']['cpu']}, {r['machine']['cores']} cores, torch "
                       f"{r['machine']['torch']}" for r in wholes})  # fmt: skip
    if machines:
        lines[0] += f" Machine: {'; '.join(machines)}."
    for r in wholes:
        pairs = r["pairs"]
        fits = ", ".join(f"{p['fit_s']:.1f}" for p in pairs)
        forwards = ", ".join(f"{p['forward_s']:.1f}" for p in pairs)
        ratios = ", ".join(f"{p['ratio']:.2f}" for p in pairs)
        floors = ", ".join(f"{p['floor_ratio']:.2f}" for p in pairs if "floor_ratio" in p)
        loads = ", ".join(f"{p['load_average'][0]:.1f}" for p in pairs)
        met = "met" if r["ratio_median"] <= GOAL else "not met"
        if len(pairs) < 2:  # no spread, no error: no verdict
            met = "one repeat: no error estimate, no verdict"
        lines.append(
            f"| {r['model']} | {r['images']} × {r['size']}² | {r['batch']} | "
            f"{r.get('threads', '?')} | {fits} | {forwards} | **{r['ratio_median']:.2f}** "
            f"(median; {ratios}; {met}) | {floors or 'not measured'} | {loads} | "
            f"{r.get('date', '?')} |"
        )
    setups = _load("setup_*.json", results)
    if setups:
        first = setups[0]
        lines += ["", f"Fixed cost of one default call (goal ≤ 2 s for VGG16), from `perf.setup`: "
                  f"the call's parts timed one by one on {first['images']} image(s) at "
                  f"{first['size']}², {first['machine']['torch_threads']} threads, wall s per "
                  "repeat (CPU s in brackets); setup = every part but the statistics pass:", "",
                  "| model | part | " + " | ".join(f"repeat {i + 1}" for i in
                                                  range(max(len(s["runs"]) for s in setups)))
                  + " |", "|---|---|" + "---|" * max(len(s["runs"]) for s in setups)]
        for s in setups:
            names = list(s["runs"][0]["parts"]) + ["setup (all but the pass)", "load"]
            for name in names:
                cells = []
                for run in s["runs"]:
                    if name == "load":
                        cells.append(f"{run['load_average'][0]:.1f}")
                        continue
                    t = run["setup"] if name.startswith("setup (") else run["parts"][name]
                    cells.append(f"{t['wall']:.2f} ({t['cpu']:.2f})")
                label = f"**{name}**" if name.startswith("setup (") else name
                lines.append(f"| {s['model']} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    """``text`` with the part between the markers replaced by ``table``."""
    if START not in text or END not in text:
        raise ValueError(f"no {START} … {END} block to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def table_in(path: Path) -> str:
    """The table between the markers of ``path``."""
    text = path.read_text()
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def write_readmes(table: str) -> None:
    """Put ``table`` into every README (each written atomically)."""
    for path in READMES:
        text = replace_block(path.read_text(), table)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="also rewrite the READMEs")
    args = parser.parse_args()
    table = headline_table()
    print(table)
    if args.write:
        write_readmes(table)


if __name__ == "__main__":
    main()
