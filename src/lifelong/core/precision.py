"""Numeric precision of a training step: float32, or bfloat16 autocast for the forward pass.

``bf16`` runs the forward pass under :func:`torch.autocast` with bfloat16: matrix products and
attention read bfloat16 inputs and accumulate in float32, while parameters, their gradients and
the optimizer state stay float32 (mixed precision, no loss scaling: bfloat16 has float32's
exponent range). On a CPU with AMX or AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4)
those products run on the bfloat16 units; elsewhere they are emulated and slower than float32.
:func:`bf16_native` says which. Losses are computed outside the context, in float32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from lifelong.core.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def check_precision(name: str) -> str:
    """``name`` if it is one of :data:`PRECISIONS`.

    Raises:
        ConfigError: any other name.

    Example::

        >>> check_precision("bf16")
        'bf16'
        >>> check_precision("fp16")
        Traceback (most recent call last):
        ...
        lifelong.core.errors.ConfigError: precision must be one of fp32, bf16; got 'fp16'
    """
    if name not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {name!r}")
    return name


@contextlib.contextmanager
def forward_precision(name: str, device: torch.device | str = "cpu") -> Iterator[None]:
    """The context a forward pass of precision ``name`` runs in (nothing for ``fp32``).

    Example::

        >>> layer = torch.nn.Linear(4, 2)
        >>> with forward_precision("bf16"):
        ...     layer(torch.randn(3, 4)).dtype
        torch.bfloat16
        >>> with forward_precision("fp32"):
        ...     layer(torch.randn(3, 4)).dtype
        torch.float32
    """
    check_precision(name)
    if name == "fp32":
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        yield


@functools.cache
def bf16_native() -> bool:
    """Whether this CPU has bfloat16 matrix units (AMX-BF16 or AVX512-BF16), read from ``/proc/cpuinfo``."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
