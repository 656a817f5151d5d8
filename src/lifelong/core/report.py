"""One report harness for every experiment command: markdown tables, the JSON data and the plots.

A :class:`Report` is a named document: an optional ``### title``, then blocks (paragraphs and
:class:`Table` s) separated by blank lines, the data it was made from and its figures.
:meth:`Report.write` puts ``NAME.json`` (the data, sorted and indented), ``NAME.md`` and one PNG
per figure into a directory, each atomically (a temporary file, then a rename), so a reader
never sees half a report. A table is rendered from rows of dicts and a list of :class:`Column`
s, each naming its key and its format, so every command's tables look alike.

Example::

    >>> t = Table([Column("row", "label"), Column("AUC", "auc", "{:.3f}", right=True)],
    ...           [{"label": "base", "auc": 0.61234}, {"label": "oracle"}])
    >>> print(Report("demo", data={"auc": 0.61234}, blocks=["Two rows.", t]).markdown(), end="")
    Two rows.
    <BLANKLINE>
    | row | AUC |
    |---|---:|
    | base | 0.612 |
    | oracle | |
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lifelong.core.atomic import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as MplFigure

__all__ = ["Column", "Figure", "Report", "Table", "hbars", "pyplot", "write_atomic"]


@dataclass(frozen=True)
class Column:
    """One column of a :class:`Table`.

    Args:
        header: the header cell.
        key: the row's entry shown in this column; None passes the whole row to ``fmt``.
        fmt: a ``str.format`` pattern (``"{:.4f}"``) or a function of the value, giving the cell.
        right: right-align the column (``---:``).

    A row without ``key`` leaves the cell empty, and a ``str`` value is the cell as it is
    (``fmt`` is not applied), so a row may carry cells formatted its own way (an oracle row).
    """

    header: str
    key: str | None = None
    fmt: str | Callable[[Any], str] = "{}"
    right: bool = False

    def cell(self, row: Mapping[str, Any]) -> str:
        if self.key is None:
            value = row
        elif self.key not in row:
            return ""
        else:
            value = row[self.key]
            if isinstance(value, str):
                return value
        return self.fmt.format(value) if isinstance(self.fmt, str) else self.fmt(value)


@dataclass(frozen=True)
class Table:
    """A markdown table: one line per row of ``rows``, one cell per column."""

    columns: Sequence[Column]
    rows: Sequence[Mapping[str, Any]]

    def lines(self) -> list[str]:
        def line(cells: Sequence[str]) -> str:
            return "|" + "".join(f" {c} |" if c else " |" for c in cells)

        return [line([c.header for c in self.columns]),
                "|" + "".join("---:|" if c.right else "---|" for c in self.columns),
                *(line([c.cell(r) for c in self.columns]) for r in self.rows)]

    def markdown(self) -> str:
        return "\n".join(self.lines())


@dataclass(frozen=True)
class Figure:
    """A plot of a report: ``draw()`` makes a matplotlib figure, written as ``NAME.png``.

    Args:
        draw: makes the figure (use :func:`pyplot`); it is saved and closed by the report.
        name: the file's stem; None: the report's name.
        dpi: the resolution it is saved at.
    """

    draw: Callable[[], MplFigure]
    name: str | None = None
    dpi: int = 110


@dataclass
class Report:
    """A report: markdown blocks, the data behind them and figures; see the module docstring.

    Args:
        name: the stem of ``NAME.json`` and ``NAME.md`` (and of an unnamed figure's PNG).
        data: what ``NAME.json`` holds (JSON-serialisable).
        blocks: the markdown, in order: paragraphs (``str``) and tables.
        title: a ``### title`` line before the blocks.
        figures: the plots, one PNG each.
    """

    name: str
    data: Any = None
    blocks: list[str | Table] = field(default_factory=list)
    title: str | None = None
    figures: list[Figure] = field(default_factory=list)

    def markdown(self) -> str:
        """The document: the title and the blocks separated by blank lines, one final newline."""
        parts = ([f"### {self.title}"] if self.title else []) + [
            b.markdown() if isinstance(b, Table) else b for b in self.blocks]
        return "\n\n".join(parts) + "\n"

    def write(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write ``NAME.json``, ``NAME.md`` and the figures into ``out_dir`` (created); returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{self.name}.json", out / f"{self.name}.md"]
        write_atomic(paths[0], json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        write_atomic(paths[1], self.markdown())
        for figure in self.figures:
            paths.append(out / f"{figure.name or self.name}.png")
            fig = figure.draw()
            try:
                write_atomic(paths[-1], functools.partial(fig.savefig, dpi=figure.dpi, format="png"))
            finally:
                pyplot().close(fig)
        return paths


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def hbars(ax: Axes, labels: Sequence[str], values: Sequence[float], errors: Sequence[float],
          color: str | Sequence[str], fontsize: float | None = None) -> None:
    """Horizontal bars with error bars, the first label at the top."""
    import numpy as np

    y = np.arange(len(labels))[::-1]
    ax.barh(y, values, xerr=errors, color=color, capsize=3)
    ax.set_yticks(y, labels, fontsize=fontsize)
