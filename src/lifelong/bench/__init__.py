"""Benchmarks of lifelong's hot paths, each a ``run(...) -> list[dict]`` plus a ``render(rows)``.

- :mod:`lifelong.bench.ops`: the serving ops, naive vs reference vs optimized.
- :mod:`lifelong.bench.serve`: closed-loop HTTP load against the serving paths.
- :mod:`lifelong.bench.serve_features`: the serving cost of TransAct V2's features (DV365 user
  tokens, parameter pushes under load), side by side against the plain run.
"""
