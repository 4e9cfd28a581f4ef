"""``patternnet methods``: every registered method, its kind and what it does."""

from __future__ import annotations

import argparse
from typing import Any

from ..methods.registry import method_info, methods

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add ``methods`` to the sub-commands."""
    parser = commands.add_parser(
        "methods",
        help="list the available methods",
        description="Every method name, its kind (signal: drawn grey-centred; attribution: "
        "drawn as a heatmap), whether it needs --patterns, and what it does.",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """List method names, kinds and descriptions."""
    del args  # no options
    for name, description in sorted(methods().items()):
        info = method_info(name)
        kind = info.kind + (" (patterns)" if info.needs_patterns else "")
        print(f"{name:28s} {kind:24s} {description}")
    return 0
