"""Benchmarks of lifelong's hot paths, each a ``run(...) -> list[dict]`` plus a ``render(rows)``.

- :mod:`lifelong.bench.ops`: the serving ops, naive vs reference vs optimized.
- :mod:`lifelong.bench.serve`: closed-loop HTTP load against the serving paths.
"""
