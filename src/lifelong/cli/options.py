"""Help texts and helpers shared by the command groups."""

from __future__ import annotations

import functools
from collections.abc import Callable

import typer

from lifelong.core.console import err
from lifelong.store.urls import STORE_HELP

__all__ = ["PROTOCOL_HELP", "STORE_HELP", "int_list", "moved_alias", "protocol_days"]  # STORE_HELP: the store URL help, kept with the URL parser


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


PROTOCOL_HELP = "TRAIN_DAYS,GAP_DAYS,EVAL_DAYS placed at the end of the data [default: the dataset's dates]."


def protocol_days(text: str | None) -> tuple[float, float, float] | None:
    """``--protocol "730,0,365"`` as ``(730.0, 0.0, 365.0)`` (None stays None); anything else is a
    :class:`~lifelong.core.errors.ConfigError` (one line, exit 2).

    Example::

        >>> protocol_days("14,1,1")
        (14.0, 1.0, 1.0)
    """
    from lifelong.core.errors import ConfigError

    if text is None:
        return None
    try:
        days = tuple(float(x) for x in text.split(","))
    except ValueError:
        days = ()
    if len(days) != 3 or min(days) < 0 or days[0] <= 0 or days[2] <= 0:
        raise ConfigError(f"--protocol expects TRAIN_DAYS,GAP_DAYS,EVAL_DAYS (positive train/eval), got {text!r}")
    return days
