"""Run every benchmark (each in its own process) and print a summary table in Markdown.

Usage: python -m perf.run            (everything: about an hour on 2 busy CPU cores)
       python -m perf.run --quick    (smaller models and inputs: a few minutes)
       python -m perf.run --only explain fit
       python -m perf.run --summary  (only print the summary of stored results)

Results are JSON files in ``perf/results/``; ``perf/README.md`` discusses them.
Every benchmark runs with ``--threads 1`` by default: on a machine shared with other work,
two OpenMP threads on two busy cores measured 5-10× slower than one thread, and only ratios
measured within one run (same process, interleaved) are meaningful there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from .table import headline_table

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def plan(quick: bool, threads: int) -> dict[str, list[list[str]]]:
    t = ["--threads", str(threads)]
    if quick:
        return {
            "explain": [["explain.py", "--model", "resnet18", "--size", "112", "--rounds", "2",
                         *t]],
            "fit": [["fit.py", "--model", "resnet18", "--size", "112", "--batches", "3", *t,
                     *extra] for extra in (["--no-negative"], ["--estimator", "linear"], [])],
            "precision": [["precision.py", "--model", "resnet18", "--size", "64", *t]],
            "scaling": [["scaling.py", "--model", "resnet18", "--size", "32", "--sizes", "32",
                         "128", "--images", "64"]],
            "checkpoint": [["checkpoint.py", "--model", "resnet18", "--repeat", "1", *t]],
            "vit": [["vit.py", "--blocks", "2", "--images", "8", "--repeats", "1",
                     "--rounds", "1", *t]],
        }
    fits = []
    for extra in (["--no-negative"], ["--estimator", "linear"], []):
        fits.append(["fit.py", "--model", "vgg16", "--batches", "9", *t, *extra])
    for extra in (["--no-negative"], ["--estimator", "linear"], []):
        fits.append(["fit.py", "--model", "vgg16", "--batches", "2", "--precision", "float64",
                     *t, *extra])
    fits.append(["fit.py", "--model", "resnet50", "--batches", "4", "--no-negative", *t])
    return {
        "explain": [["explain.py", "--model", m, "--rounds", "3", *t]
                    for m in ("vgg16", "resnet50")],
        "fit": fits,
        "precision": [["precision.py", "--model", "vgg16", "--batches", "2", *t]],
        "scaling": [["scaling.py", "--model", "resnet18", "--size", "64"]],
        "checkpoint": [["checkpoint.py", "--model", "vgg16", *t]],
        "vit": [["vit.py", "--images", "32", "--repeats", "2", "--rounds", "3", *t]],
    }


def summary() -> str:
    lines = ["### The headline: the whole default fit (README.md shows the same table)", "",
             headline_table()]
    for path in sorted(RESULTS.glob("explain_*.json")):
        r = json.loads(path.read_text())
        where = (r["machine"].get("cuda") or "CPU") if r.get("device", "cpu") != "cpu" else "CPU"
        lines += [f"\n### Explain: {r['model']}, batch {r['batch']}, {r['size']}², "
                  f"{r['rounds']} rounds, {where} ({path.name})", "",
                  "| method | median ms | × gradient |", "|---|---|---|"]
        lines += [f"| {row['method']} | {1000 * row['median_s']:.1f} | "
                  f"{row['ratio_to_gradient']:.2f} |" for row in r["rows"]]
    fits = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("fit_*.json"))
            if not p.name.startswith("fit_whole_")]
    if fits:
        lines += ["\n### Fit", "", "| model | device | estimator | precision | fit s/batch | "
                  "forward s/batch | × forward | peak RSS GB | RSS goal GB | peak GPU GB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in fits:
            est = r["estimator"] + ("" if r["estimator"] == "linear" or r["negative"] else " (a₊)")
            gpu = r.get("peak_gpu_gb")
            lines.append(f"| {r['model']} {r['size']}² b{r['batch']} | {r.get('device', 'cpu')} | "
                         f"{est} | {r['precision']} | {r['fit_batch_s']:.3f} | "
                         f"{r['forward_batch_s']:.3f} | {r['ratio_to_forward']:.2f} | "
                         f"{r['peak_rss_gb']:.2f} | {r['rss_goal_gb']:.2f} | "
                         f"{'' if gpu is None else f'{gpu:.2f}'} |")
    for path in sorted(RESULTS.glob("precision_*.json")):
        r = json.loads(path.read_text())
        lines += [f"\n### float32 vs float64: {r['model']}, {r['images']} images at "
                  f"{r['size']}², {r.get('device', 'cpu')}", ""]
        lines += [f"- {k}: median {v['median']:.1e}, max {v['max']:.1e}"
                  for k, v in r["summary"].items()]
        error = r["pattern_attribution_relative_error"]
        lines.append(f"- PatternAttribution heat map: {error:.1e}")
    for path in sorted(RESULTS.glob("scaling_*.json")):
        r = json.loads(path.read_text())
        if "growth" not in r:
            continue
        lines += [f"\n### Scaling: {r['model']} {r['size']}², batch {r['batch']}", "",
                  "| images | ms/image | × forward |", "|---|---|---|"]
        lines += [f"| {g['images']} | {1000 * g['fit_per_image_s']:.1f} | "
                  f"{g['ratio_to_forward']:.2f} |" for g in r["growth"]]
        p = r["processes"]
        lines += [""] + [f"- {k}: fit {v['fit_s']:.1f} s" for k, v in p["runs"].items()]
        lines.append(f"- speed-up {p['speedup']:.2f}, patterns differ by "
                     f"{p['max_relative_pattern_difference']:.1e} (relative)")
    checkpoints = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("checkpoint_*.json"))]
    if checkpoints:
        lines += ["\n### Checkpoints (CPU s / wall s; peak RSS above what is held, GB)", "",
                  "| statistics | format | checksum | write | save | load | resume | peak "
                  "save / load / resume |", "|---|---|---|---|---|---|---|---|"]
        for r in checkpoints:
            s, load, resume = r["save"], r["load"], r["resume"]

            def cell(t: dict) -> str:
                return f"{t['cpu']:.2f} / {t['wall']:.2f}"

            lines.append(
                f"| {r['model']} {r['estimator']} {s['statistics_gb']:.2f} GB | "
                f"v{r.get('format_version', '?')} | {cell(s['checksum_s'])} | "
                f"{cell(s['write_s'])} | {cell(s['save_s'])} | {cell(load['load_checkpoint_s'])} | "
                f"{resume['resume_s'][1]:.2f} / {resume['resume_s'][0]:.2f} | "
                f"{s['peak_above_sums_gb']:.2f} / {load['peak_above_loaded_gb']:.2f} / "
                f"{resume['peak_above_model_and_sums_gb']:.2f} |"
            )
    for path in sorted(RESULTS.glob("vit_b_16_*blocks.json")):
        r = json.loads(path.read_text())
        lines += [f"\n### ViT-B/16 ({r['blocks']} blocks), batch {r['batch']}, {r['size']}², "
                  f"{r['threads']} thread(s) ({path.name}; load {r['load_before'][0]:.1f} → "
                  f"{r['load_after'][0]:.1f})", "",
                  "| measure | ratio per repeat (wall; CPU) |", "|---|---|"]
        if r["fit"]:
            cells = ", ".join(f"{f['ratio_wall']:.2f}; {f['ratio_cpu']:.2f}" for f in r["fit"])
            lines.append(f"| default fit ÷ forward, {r['images']} images | {cells} |")
        for name, row in r["explain"].items():
            cells = ", ".join(f"{v:.2f}" for v in row["all"])
            lines.append(f"| {name} ({row['dtype']}) ÷ gradient (CPU) | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=["explain", "fit", "precision", "scaling",
                                                       "checkpoint", "vit"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    if not args.summary:
        for group, commands in plan(args.quick, args.threads).items():
            if args.only and group not in args.only:
                continue
            for command in commands:
                module = "perf." + command[0].removesuffix(".py")
                print(f"$ python -m {module} " + " ".join(command[1:]), flush=True)
                subprocess.run([sys.executable, "-m", module, *command[1:]], check=True,
                               cwd=HERE.parent)
    print(summary())


if __name__ == "__main__":
    main()
