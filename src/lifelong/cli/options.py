"""Help texts and helpers shared by the command groups."""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer

from lifelong.core.console import err
from lifelong.store.urls import STORE_HELP

__all__ = ["STORE_HELP", "int_list", "moved_alias"]  # STORE_HELP: the store URL help, kept with the URL parser


def moved_alias(app: typer.Typer, old: str, new: str, command: Callable[..., None]) -> None:
    """Keep ``lifelong OLD`` working for one release as a hidden command that says where it moved.

    The alias takes the same options as ``command`` (Typer reads the wrapped signature).
    """

    @functools.wraps(command)
    def alias(*args, **kwargs):
        err.print(f"[yellow]note:[/yellow] `lifelong {old}` moved to `lifelong {new}`; the old spelling goes in the "
                  "next release", highlight=False)
        return command(*args, **kwargs)

    app.command(old, hidden=True)(alias)


def int_list(text: str, option: str) -> tuple[int, ...]:
    """``"1,4,16"`` as ``(1, 4, 16)``; anything else is a usage error naming ``option`` (exit 2).

    Example::

        >>> int_list("32, 128", "--candidates")
        (32, 128)
    """
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"comma-separated integers, got {text!r}", param_hint=option) from None
