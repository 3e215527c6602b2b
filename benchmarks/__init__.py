"""Speed and quality benchmarks of lightning_fastif; ``python -m benchmarks.run_all`` runs them all.

Each ``benchmarks/bench_*.py`` module exposes ``run(*, smoke: bool = False, threads: int = 1) -> dict`` (the
contract is described in :mod:`benchmarks.common`) and can be run on its own with ``python -m benchmarks.bench_<x>``.
Peers (Captum, Kronfluence, dattri) are imported lazily: the package never needs them.
"""
