"""Child processes of lifelong's own commands: a free local port, a ``lifelong serve`` started and
stopped by pid.

Shared by the benchmarks (``lifelong bench serve``), the A/B test (``lifelong abtest`` starts one
service per run arm) and the tests.

Example::

    port = free_port()
    proc = start_server(port, ["--run", "RUN", "--store", "stores/small"])
    try:
        ...  # POST http://127.0.0.1:{port}/rank
    finally:
        stop_process(proc)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["free_port", "start_server", "stop_process"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, serve_args: list[str], timeout_s: float = 120.0,
                 log: str | os.PathLike[str] | None = None) -> subprocess.Popen:
    """A ``lifelong serve --port PORT *serve_args`` process, returned once ``/healthz`` answers.

    Args:
        port: the port to serve on (127.0.0.1).
        serve_args: the rest of the ``lifelong serve`` command line.
        timeout_s: how long to wait for ``/healthz``.
        log: write the server's stderr to this file (use it for long-lived servers: a pipe
            nobody reads fills up); default a pipe, read when the server fails to start.

    Raises:
        RuntimeError: the server exited or did not answer in time (naming its last stderr).
    """
    cmd = [sys.executable, "-c", "from lifelong.cli import main; main()", "serve", "--port", str(port), *serve_args]
    log_file = open(log, "w") if log is not None else None  # noqa: SIM115 - closed when the child is started or dies
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_file or subprocess.PIPE, text=True)
    finally:
        if log_file is not None:
            log_file.close()

    def stderr() -> str:
        text = Path(log).read_text() if log is not None else proc.stderr.read()
        return text[-2000:]

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lifelong serve exited with {proc.returncode}: {stderr()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"lifelong serve did not answer /healthz within {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a child process by pid, killing it if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
