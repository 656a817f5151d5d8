"""Data-parallel plumbing shared by the trainers: ranks from the environment, the process group,
shards of a global batch, collectives, rank-0-only writes and a launcher of N local processes.

A trainer is one function that every rank runs whole. It learns who it is from the variables
torchrun sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; :func:`ranks_from_env`),
so the same entry point runs under ``torchrun --nproc-per-node N …`` and under :func:`launch`,
which starts N local processes with those variables set. Without them it is one process and
nothing here changes what it computes.

Every rank draws the same seeded permutation of the example indices (indices only: no data is
read for it) and cuts it into the same global batches; a rank takes rows ``rank::size`` of each
(:func:`shard`), so the global batch, and with :func:`loss_share` the gradient averaged by DDP,
is the single-process one. Only the main rank (rank 0) writes run outputs (:attr:`Ranks.main`).

Example::

    ranks = ranks_from_env()                 # Ranks(rank=0, size=1) outside torchrun/launch
    with process_group(ranks):
        for glob in global_batches:
            idx = shard(glob, ranks)         # this rank's rows of the global batch
            ...
            if ranks.main:
                save_atomic(state, out / "checkpoint.pt")

    launch(train, (data_dir, out, cfg), nproc=2)   # the same function in 2 local processes
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lifelong.core.errors import ConfigError, LifelongError
from lifelong.core.processes import free_port

__all__ = ["FAIL_ENV", "Ranks", "all_reduce_sum", "barrier", "check_split", "fault_point", "launch",
           "loss_share", "process_group", "ranks_from_env", "shard", "started_as_rank"]

FAIL_ENV = "LIFELONG_FAIL_RANK"
"""Test hook: ``RANK:STEPS`` makes that rank exit with :data:`FAIL_EXIT` after its STEPS-th
optimizer step (:func:`fault_point`), as a crashed or killed worker would."""

FAIL_EXIT = 3


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run.

    Args:
        rank: 0 … size - 1; rank 0 is the main rank, the one that logs and writes.
        size: processes in the run (1: a plain single-process run).
    """

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def started_as_rank() -> bool:
    """Whether this process was started as a rank (by torchrun or :func:`launch`): ``WORLD_SIZE`` is set."""
    return "WORLD_SIZE" in os.environ


def ranks_from_env() -> Ranks:
    """The :class:`Ranks` torchrun's variables describe; ``Ranks()`` when ``WORLD_SIZE`` is unset.

    Raises:
        ConfigError: the variables are malformed or incomplete.
    """
    if not started_as_rank():
        return Ranks()
    try:
        ranks = Ranks(rank=int(os.environ.get("RANK", "0")), size=int(os.environ["WORLD_SIZE"]))
    except ValueError:
        raise ConfigError(f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} "
                          "must be integers") from None
    if ranks.size < 1 or not 0 <= ranks.rank < ranks.size:
        raise ConfigError(f"RANK {ranks.rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {ranks.size})")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if ranks.parallel and k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE {ranks.size} needs {' and '.join(missing)} (torchrun sets them)")
    return ranks


@contextlib.contextmanager
def process_group(ranks: Ranks) -> Iterator[None]:
    """The default process group of ``ranks`` for the duration of the block (nothing for one process).

    gloo, because the trainers compute on CPU (NCCL moves CUDA tensors only). Ranks other than
    the main one set ``LIFELONG_QUIET`` so that one progress bar is drawn, not ``size``.
    """
    if not ranks.parallel:
        yield
        return
    if not ranks.main:
        os.environ["LIFELONG_QUIET"] = "1"
    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.size, timeout=timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_split(value: int, size: int, key: str) -> None:
    """Refuse a global batch ``value`` (the config key ``key``) that ``size`` processes cannot split evenly."""
    if value % size:
        raise ConfigError(f"{key} {value} does not split over {size} processes: each takes {key} / {size}; "
                          f"choose a multiple of {size}")


def shard(global_batch: np.ndarray, ranks: Ranks) -> np.ndarray:
    """This rank's part of a global batch: its rows ``rank::size`` (all of it for one process)."""
    return global_batch[ranks.rank::ranks.size]


def all_reduce_sum(values: Sequence[float] | np.ndarray, ranks: Ranks) -> np.ndarray:
    """The sum over ranks of ``values`` (float64), element-wise; ``values`` themselves for one process."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if ranks.parallel:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.numpy()


def loss_share(local: float, total: float, ranks: Ranks) -> float:
    """The factor on a rank's mean loss that makes DDP's gradient average the global batch's mean.

    A rank's loss is the mean over its ``local`` part (rows, or their weights) of a global batch of
    ``total``; DDP averages gradients over the ranks, so scaling each rank's mean by
    ``size * local / total`` turns that average into the mean over the whole batch, also when the
    parts differ (the last batch of an epoch, weighted rows). Equal parts get 1.0.
    """
    return ranks.size * local / total


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (nothing for one process)."""
    if ranks.parallel:
        dist.barrier()


def fault_point(ranks: Ranks, steps: int) -> None:
    """The :data:`FAIL_ENV` test hook: exit at once when it names this rank and ``steps`` steps are done."""
    spec = os.environ.get(FAIL_ENV)
    if spec is None:
        return
    rank, _, after = spec.partition(":")
    if int(rank) == ranks.rank and steps == int(after):
        os._exit(FAIL_EXIT)


def _worker() -> None:
    """A rank started by :func:`launch`: run the pickled function; report a failure in the error file."""
    fn, args, error_path = pickle.load(sys.stdin.buffer)
    try:
        fn(*args)
    except LifelongError as exc:
        Path(error_path).write_text(f"user\n{exc}")
        sys.exit(2)
    except BaseException:
        Path(error_path).write_text(f"bug\n{traceback.format_exc()}")
        sys.exit(1)


def launch(fn: Callable[..., Any], args: tuple, nproc: int, *, batches: Mapping[str, int] | None = None,
           threads: int = 1, hint: str = "") -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes, the ranks of one run (gloo on 127.0.0.1).

    Everything is checked before a process starts: ``nproc``, that this process is not a rank
    already (torchrun starts the ranks itself), and that each global batch of ``batches``
    (config key -> size) splits over the ranks (:func:`check_split`).

    ``fn`` and ``args`` must pickle (a module-level function and plain values). Each process gets
    ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and a free ``MASTER_PORT``, as from
    torchrun, and ``OMP_NUM_THREADS=threads`` unless it is set (torchrun's default is 1 too: N
    processes each using every core only contend). One process runs ``fn`` here.

    When a rank fails, the others are stopped and the first to fail is reported: its own
    :class:`LifelongError` as is (e.g. a bad setting every rank refused), or one line naming it
    and its exit status, ending with ``hint`` (what to do next; a crash's traceback is printed
    above that line).

    Raises:
        ConfigError: ``nproc`` < 1, ``WORLD_SIZE`` set, or a batch that does not split.
        LifelongError: a rank failed.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if started_as_rank():
        raise ConfigError("--nproc starts local processes; under torchrun (WORLD_SIZE is set), which starts the "
                          "ranks itself, leave it out")
    for key, value in (batches or {}).items():
        check_split(value, nproc, key)
    if nproc == 1:
        fn(*args)
        return
    port = str(free_port())
    with tempfile.TemporaryDirectory(prefix="lifelong-ranks-") as tmp:
        procs = []
        exits: queue.Queue[tuple[int, int]] = queue.Queue()
        try:
            for rank in range(nproc):
                env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                env.setdefault("OMP_NUM_THREADS", str(threads))
                proc = subprocess.Popen([sys.executable, "-c", "from lifelong.core.distributed import _worker; _worker()"],
                                        stdin=subprocess.PIPE, env=env)
                procs.append(proc)
                proc.stdin.write(pickle.dumps((fn, args, str(Path(tmp) / f"rank{rank}.err"))))
                proc.stdin.close()
                # A thread per rank waits for its exit, so the queue holds exits in the order they
                # happened: the rank that failed first, not a peer that failed because it was gone.
                threading.Thread(target=lambda r, p: exits.put((r, p.wait())), args=(rank, proc), daemon=True).start()
            failed = None
            for _ in range(nproc):
                rank, code = exits.get()
                if code != 0:
                    failed = (rank, code)
                    break
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                proc.wait()
        if failed is not None:
            rank, code = failed
            error = Path(tmp) / f"rank{rank}.err"
            kind, _, text = error.read_text().partition("\n") if error.exists() else ("", "", "")
            if kind == "user":
                raise LifelongError(text)
            if kind == "bug":
                sys.stderr.write(text)
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise LifelongError(f"rank {rank} of {nproc} {how}; the other ranks were stopped" + (hint and f"; {hint}"))
