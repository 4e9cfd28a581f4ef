"""Benchmarks of patternnet, run as modules from the repository root: ``python -m perf.run``.

Each module is one benchmark (``python -m perf.fit``, ``python -m perf.explain`` …); results are
JSON files in ``perf/results/`` and ``perf/README.md`` discusses them.
"""
