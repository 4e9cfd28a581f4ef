"""The ``patternnet`` command: one thin module per sub-command over the library's functions.

::

    patternnet fit --model torchvision:vgg16 --data ~/imagenet/train --limit 20000 \\
        --out vgg16.patterns.safetensors
    patternnet explain --model torchvision:vgg16 --patterns vgg16.patterns.safetensors \\
        --method pattern_net,pattern_attribution,gradient cat.jpg dog.jpg --out explained/
    patternnet evaluate --model torchvision:vgg16 --patterns vgg16.patterns.safetensors \\
        --data ~/imagenet/val --limit 2000 --out report/
    patternnet demo
    patternnet methods

========================  ==========================================================
:mod:`.common`            argument types, shared options, ``--model``/``--data``/
                          ``--patterns``/``--method`` turned into library objects
:mod:`.fit`               :func:`patternnet.fit_patterns` (torchrun: distributed)
:mod:`.explain`           the registry's methods, :func:`patternnet.viz.picture`
:mod:`.evaluate`          :func:`patternnet.evaluate.estimator_quality`,
                          :func:`patternnet.evaluate.compare`, :mod:`patternnet.report`
:mod:`.reproduce`         :func:`patternnet.reproduce` (the paper on ImageNet)
:mod:`.demo`              :func:`patternnet.demo.run_demo`
:mod:`.methods`           :func:`patternnet.methods.registry.methods`
========================  ==========================================================

A sub-command module has ``add_parser(commands)`` (which sets ``run`` as the parser's
default) and ``run(args) -> int``; adding one is a new module and one line in
:data:`COMMANDS`.

Exit status: 0 on success; 2 for a usage error — a bad argument (argparse) or a bad input
the command reports as :class:`~patternnet.cli.common.UsageError`, in one line on stderr.
``python -m patternnet`` and ``torchrun -m patternnet fit ...`` work too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from . import common, demo, evaluate, explain, fit, methods, reproduce
from .common import EXIT_USAGE, UsageError, load_model

__all__ = ["COMMANDS", "EXIT_USAGE", "UsageError", "build_parser", "load_model", "main"]

#: The sub-command modules, in the order ``patternnet --help`` lists them.
COMMANDS = (fit, explain, evaluate, reproduce, demo, methods)


def build_parser() -> argparse.ArgumentParser:
    """The ``patternnet`` argument parser (one sub-parser per module of :data:`COMMANDS`)."""
    parser = common.Parser(
        prog="patternnet",
        description="Learn how to explain neural networks: fit PatternNet/PatternAttribution "
        "patterns, explain images with them and the baselines, evaluate explanations.",
        epilog="Run 'patternnet COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"patternnet {__version__}")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=common.Parser, required=True
    )
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``patternnet`` command line; returns the exit status.

    Exit status: 0 on success, 2 for bad arguments or inputs (:class:`UsageError`: a
    one-line message on stderr; set ``PATTERNNET_DEBUG=1`` for the full traceback instead).
    Any other exception is a bug: it propagates with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        if os.environ.get("PATTERNNET_DEBUG"):
            raise
        print(f"patternnet {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
