"""One dispatcher for the serving ops: each op registers an implementation per backend.

Backends (docs/design.md, "Serving"):

- ``reference``: plain PyTorch, written to be obviously right; the others must agree with it.
- ``cpu``: the optimized CPU path.
- ``triton``: GPU kernels (:mod:`lifelong.ops.triton_nn_search`, :mod:`lifelong.ops.triton_encoder`),
  usable where ``triton`` imports and CUDA is available (or ``TRITON_INTERPRET=1``, which runs
  them on the CPU for tests). Their modules are imported the first time ``triton`` is asked
  for, so a process that never uses it never imports :mod:`triton`.

``None`` picks the backend named by the environment variable ``LIFELONG_OPS_BACKEND``, else
:func:`default_backend`: ``triton`` where CUDA is present and ``triton`` imports, else ``cpu``.
Asking for a backend that cannot run, or that an op does not implement, is a
:class:`~lifelong.core.errors.ConfigError` saying why.

Example::

    >>> resolve_backend("reference")
    'reference'
    >>> resolve_backend("gpu")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lifelong.core.errors.ConfigError: unknown ops backend 'gpu'; backends are reference, cpu, triton
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from lifelong.core.errors import ConfigError

BACKENDS: tuple[str, ...] = ("reference", "cpu", "triton")
ENV_VAR = "LIFELONG_OPS_BACKEND"
TRITON_MODULES = ("lifelong.ops.triton_nn_search", "lifelong.ops.triton_encoder")
"""Modules registering the ``triton`` implementations (they import :mod:`triton` at the top)."""

F = TypeVar("F", bound=Callable[..., object])
_REGISTRY: dict[str, dict[str, Callable[..., object]]] = {}


def register(op: str, backend: str) -> Callable[[F], F]:
    """Decorator: ``fn`` is ``op``'s implementation on ``backend``.

    Example::

        @register("nn_search", "cpu")
        def _nn_search_cpu(values, starts, lengths, cand_user, cand, k, scale): ...
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; backends are {', '.join(BACKENDS)}")

    def add(fn: F) -> F:
        impls = _REGISTRY.setdefault(op, {})
        if backend in impls:
            raise ValueError(f"op {op!r} already has a {backend} implementation")
        impls[backend] = fn
        return fn

    return add


def triton_unavailable_reason() -> str | None:
    """Why the ``triton`` backend cannot run here, or None when it can."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # noqa: BLE001 - a broken install fails in many ways; say which
        if isinstance(exc, ModuleNotFoundError) and exc.name == "triton":
            return "the triton package is not installed (pip install 'lifelong[gpu]')"
        return f"triton does not import ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA device is available (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    return None


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_device() -> torch.device:
    """Where the Triton kernels' tensors live: the CPU when interpreted, else the current CUDA device."""
    return torch.device("cpu") if interpreting() else torch.device("cuda", torch.cuda.current_device())


def default_backend() -> str:
    """``triton`` where a CUDA device is present and ``triton`` imports, else ``cpu``.

    The interpreter never makes ``triton`` the default: it is for tests, far slower than ``cpu``.
    """
    return "triton" if torch.cuda.is_available() and triton_unavailable_reason() is None else "cpu"


def resolve_backend(name: str | None = None) -> str:
    """The backend to use: ``name``, else ``$LIFELONG_OPS_BACKEND``, else :func:`default_backend`.

    Raises:
        ConfigError: the name is unknown, or ``triton`` cannot run here.
    """
    if name is None:
        name = os.environ.get(ENV_VAR) or default_backend()
    if name not in BACKENDS:
        raise ConfigError(f"unknown ops backend {name!r}; backends are {', '.join(BACKENDS)}")
    if name == "triton" and (reason := triton_unavailable_reason()) is not None:
        raise ConfigError(f"ops backend 'triton' is unavailable: {reason}")
    return name


def implementation(op: str, backend: str | None = None) -> Callable[..., object]:
    """``op``'s implementation on the resolved ``backend``.

    Raises:
        ConfigError: as :func:`resolve_backend`, or ``op`` has no implementation there.

    Example::

        >>> import lifelong.ops  # registers the ops
        >>> implementation("nn_search", "reference").__name__
        '_nn_search_reference'
    """
    name = resolve_backend(backend)
    if name == "triton":
        for module in TRITON_MODULES:
            importlib.import_module(module)
    impls = _REGISTRY.get(op, {})
    if name not in impls:
        have = ", ".join(b for b in BACKENDS if b in impls) or "none"
        raise ConfigError(f"op {op!r} has no {name} implementation (available: {have})")
    return impls[name]
