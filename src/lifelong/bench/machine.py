"""What a benchmark ran on, for the header every benchmark prints."""

from __future__ import annotations

import platform


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (else what ``platform`` knows).

    Example::

        >>> isinstance(cpu_model(), str)
        True
    """
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
