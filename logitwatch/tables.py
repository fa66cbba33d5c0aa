"""Tables that stay readable in an 80-column terminal: numbers and header words are never cut,
and when the columns cannot sit side by side each record is printed as a block of its own."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

from rich import box as boxes
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

__all__ = ["Col", "Records", "num", "render_text"]

Cell = str | Text


@dataclass(frozen=True)
class Col:
    """A column. ``num``: right-aligned and never narrower than its widest cell, so a figure is
    never wrapped or cut. A text column wraps at words down to ``readable`` characters (and its
    header's longest word); below that the table stacks rather than squeeze it."""

    header: str
    num: bool = False
    readable: int = 12


def num(header: str) -> Col:
    """A numeric column."""
    return Col(header, num=True)


def _lines(text: Text) -> list[str]:
    return text.plain.splitlines() or [""]


def _longest_word(text: Text) -> int:
    return max((cell_len(w) for line in _lines(text) for w in line.split()), default=0)


def _natural(text: Text) -> int:
    return max(cell_len(line) for line in _lines(text))


class Records:
    """Rows under named columns, laid out when printed, for the width there is: a table when the
    columns fit at their readable widths, else one block of ``header  value`` lines per row.

    Cells are plain strings (never parsed as markup: labels and tags may hold brackets) or
    :class:`rich.text.Text` for a styled cell; a newline in a cell or header stacks its lines.
    """

    def __init__(
        self,
        columns: Iterable[Col | str],
        *,
        title: str | None = None,
        caption: str | None = None,
        gap: int = 2,
    ) -> None:
        self.columns = [c if isinstance(c, Col) else Col(c) for c in columns]
        self.title, self.caption, self.gap = title, caption, gap
        self.rows: list[list[Text]] = []

    def add_row(self, *cells: Cell) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([c if isinstance(c, Text) else Text(str(c)) for c in cells])

    def _extra(self) -> int:
        """What the table adds to the widths of its columns: the gaps between them (no edges:
        at 80 columns every character goes to the content)."""
        return self.gap * (len(self.columns) - 1)

    def _bounds(self) -> tuple[list[int], list[int]]:
        """(narrowest readable, natural) content width of each column."""
        lows, highs = [], []
        for i, col in enumerate(self.columns):
            header = Text(col.header)
            cells = [row[i] for row in self.rows]
            high = max(_natural(t) for t in [header, *cells])
            word = _longest_word(header)
            if col.num:  # every cell whole; the header may wrap at its spaces
                low = max([word, *(_natural(t) for t in cells)])
            else:
                low = max(word, min(high, col.readable))
            lows.append(low)
            highs.append(max(high, low))
        return lows, highs

    def widths(self, width: int) -> list[int] | None:
        """Column widths for a table `width` wide, or None when only the stacked layout fits."""
        lows, widths = self._bounds()
        room = width - self._extra()
        if sum(lows) > room:
            return None
        excess = sum(widths) - room
        # Numeric columns give first (only their header wraps, one line for the whole table),
        # then text; each time the column furthest above its readable width, a character at a
        # time, so a column whose `readable` is its whole width (a run name) gives last.
        for kind in (True, False):
            cols = [i for i, c in enumerate(self.columns) if c.num is kind]
            while excess > 0 and cols:
                i = max(cols, key=lambda i: widths[i] - lows[i])
                if widths[i] <= lows[i]:
                    break
                widths[i] -= 1
                excess -= 1
        return widths

    def table(self, widths: list[int]) -> Table:
        # SIMPLE_HEAD's column rule is one space; the right padding makes up the rest of the gap.
        table = Table(
            title=self.title,
            caption=self.caption,
            box=boxes.SIMPLE_HEAD,
            padding=(0, self.gap - 1, 0, 0),
            show_edge=False,
            pad_edge=False,
        )
        for col, w in zip(self.columns, widths, strict=True):
            table.add_column(
                col.header, justify="right" if col.num else "left", width=w, overflow="fold"
            )
        for row in self.rows:
            table.add_row(*row)
        return table

    def stacked(self) -> Table:
        """One block per row: a line per column, header on the left, rows apart by a blank line."""
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        keys = [" ".join(c.header.split()) for c in self.columns]
        for n, row in enumerate(self.rows):
            if n:
                grid.add_row("", "")
            for key, cell in zip(keys, row, strict=True):
                grid.add_row(key, cell)
        return grid

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        widths = self.widths(options.max_width)
        if widths is not None:
            yield self.table(widths)
            return
        if self.title:
            yield Text(self.title, style="italic", justify="left")
        yield self.stacked()
        if self.caption:
            yield Text(self.caption, style="dim", justify="left")

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        lows, highs = self._bounds()
        stacked = max((len(c.header) for c in self.columns), default=0) + 1 + min(lows, default=1)
        natural = sum(highs) + self._extra()
        return Measurement(min(stacked, natural), natural).with_maximum(options.max_width)


def render_text(*renderables: RenderableType, width: int = 80) -> str:
    """What the renderables print as at `width` columns, as plain text (for print() and tests)."""
    console = Console(width=width, record=True, color_system=None, file=io.StringIO())
    for r in renderables:
        console.print(r)
    return console.export_text()
