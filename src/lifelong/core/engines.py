"""Engines of offline batch jobs: one function mapped over shards, here or on Ray (docs/scaling.md,
"Offline jobs on Ray").

A job makes its per-shard work a pure function and hands it to an engine, :func:`map_local`
(this process) or :func:`map_ray` (one Ray task per shard); both yield the results in shard
order, so the job merges them the same way and writes the same bytes. Ray is the optional extra
``distributed``, imported only on the ray path (never by the local engine or on import).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

from lifelong.core.errors import ConfigError

# An engine maps a shard function over shards, yielding results in shard order: ``(fn, shared,
# shards)``, each call being ``fn(*shared, *shard)``. ``shared`` is what every shard reads.
ShardMap = Callable[[Callable[..., Any], tuple, list[tuple]], Iterator[Any]]


def map_local(fn: Callable[..., Any], shared: tuple, shards: list[tuple]) -> Iterator[Any]:
    """The single-process engine: shards one after the other, in this process."""
    for shard in shards:
        yield fn(*shared, *shard)


def map_ray(fn: Callable[..., Any], shared: tuple, shards: list[tuple]) -> Iterator[Any]:
    """The Ray engine: one Ray task per shard on the connected Ray (:func:`connect_ray`).

    ``shared`` goes to the object store once, not once per task; results are fetched in shard
    order, so the merge is the same as the local engine's.
    """
    import ray  # optional extra `distributed`: imported only on this path

    shared_refs = [ray.put(x) for x in shared]
    task = ray.remote(num_cpus=1)(fn)
    refs = [task.remote(*shared_refs, *shard) for shard in shards]
    for ref in refs:
        yield ray.get(ref)


ENGINES = ("local", "ray")


def connect_ray(address: str | None) -> bool:
    """Connect to Ray before anything is written: a local Ray (2 CPUs, no dashboard) when
    ``address`` is None, else the cluster at ``address`` (``HOST:PORT``, ``ray://HOST:PORT`` or
    ``auto``). A Ray this process already runs is reused.

    Returns:
        Whether this call started the connection (so the caller shuts it down).

    Raises:
        ConfigError: Ray is not installed, or the address does not answer.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'lifelong[distributed]'") from None
    if ray.is_initialized():
        return False
    if address is not None and address != "auto":
        # ray.init retries an unreachable cluster for a long time: probe it first, briefly.
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({exc})") from None
    try:
        if address is None:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray-address {address}: {exc}") from None
    return True


@contextlib.contextmanager
def open_engine(engine: str, ray_address: str | None = None) -> Iterator[ShardMap]:
    """The engine named ``engine`` (``local`` or ``ray``), connected for the block.

    Open it before writing anything: a bad name or an unreachable cluster fails here. With
    ``ray``, a Ray this call started is shut down when the block ends.

    Example::

        with open_engine("ray") as shard_map:
            results = list(shard_map(work, (shared_table,), [(0, 100), (100, 200)]))
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if ray_address is not None and engine != "ray":
        raise ConfigError("a Ray address needs the ray engine (--engine ray)")
    if engine == "local":
        yield map_local
        return
    owns_ray = connect_ray(ray_address)
    try:
        yield map_ray
    finally:
        if owns_ray:
            import ray

            ray.shutdown()
