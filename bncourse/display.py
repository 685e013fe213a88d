"""Numbers shown to people: small tables rendered as real tables on the book's pages.

A notebook cell that ends with ``show_table(...)`` displays an HTML table on the website (and in
Jupyter), and a Markdown table wherever HTML is not rendered. Numbers are formatted by column, so a
reader sees ``0.974`` or ``97.4 %`` rather than ``0.97412345``, and a wide table scrolls inside its
own box on a phone instead of widening the page.

Example
-------
>>> table = show_table(
...     [("BN", 0.974, 12.5), ("no BN", 0.912, 11.0)],
...     headers=("model", "test accuracy", "time (s)"),
...     formats=(None, "{:.1%}", "{:.1f}"),
... )
>>> print(table.to_markdown())
| model | test accuracy | time (s) |
|:---|---:|---:|
| BN | 97.4% | 12.5 |
| no BN | 91.2% | 11.0 |
"""

from __future__ import annotations

import html
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Table", "show_table", "format_value"]


def format_value(value: object, fmt: str | None = None) -> str:
    """Format one cell: ``fmt`` (a ``str.format`` pattern) if given, else a readable default.

    The default prints integers as they are, other real numbers with four significant digits, and
    anything else with ``str``.
    """
    if fmt is not None:
        return fmt.format(value)
    if isinstance(value, bool) or isinstance(value, numbers.Integral):
        return str(value)
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    return str(value)


@dataclass(frozen=True)
class Table:
    """A formatted table: ``headers`` and ``rows`` of strings, and each column's alignment."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]
    caption: str | None = None

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured Markdown (numbers right-aligned)."""
        rule = ["---:" if numeric else ":---" for numeric in self.numeric]
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "|".join(rule) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_html(self) -> str:
        """The table as HTML inside a box that scrolls sideways when the table is too wide."""

        def cell(tag: str, text: str, numeric: bool) -> str:
            align = "right" if numeric else "left"
            return f'<{tag} style="text-align: {align}">{html.escape(text)}</{tag}>'

        head = "".join(cell("th", h, n) for h, n in zip(self.headers, self.numeric, strict=True))
        body = "".join(
            "<tr>"
            + "".join(cell("td", v, n) for v, n in zip(row, self.numeric, strict=True))
            + "</tr>"
            for row in self.rows
        )
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return (
            '<div class="bncourse-table" style="overflow-x: auto; max-width: 100%">'
            f'<table class="table">{caption}<thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return self.to_markdown()


def show_table(
    rows: Sequence[Sequence[object]] | Mapping[object, Sequence[object]],
    headers: Sequence[str],
    formats: Sequence[str | None] | None = None,
    caption: str | None = None,
) -> Table:
    """Build a :class:`Table` to display as the last expression of a notebook cell.

    Parameters
    ----------
    rows : sequence of rows, or mapping from the first column's value to the remaining cells
        Each row has ``len(headers)`` cells.
    headers : sequence of str
        Column titles.
    formats : sequence of (str or None), optional
        One ``str.format`` pattern per column (``"{:.3f}"``, ``"{:.1%}"``); ``None`` for the
        default of :func:`format_value`.
    caption : str, optional
        A caption shown above the table.

    Returns
    -------
    Table
        Rendered as HTML in Jupyter and on the website, as Markdown in plain text.

    Raises
    ------
    ValueError
        If a row or ``formats`` does not have one entry per header.
    """
    headers = tuple(str(h) for h in headers)
    if isinstance(rows, Mapping):
        rows = [(key, *values) for key, values in rows.items()]
    rows = [tuple(row) for row in rows]
    if formats is None:
        formats = (None,) * len(headers)
    if len(formats) != len(headers):
        raise ValueError(
            f"formats must have one entry per header ({len(headers)}), got {len(formats)}"
        )
    for index, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(
                f"rows[{index}] must have {len(headers)} cells (one per header), got {len(row)}"
            )
    numeric = tuple(
        all(isinstance(row[col], numbers.Real) and not isinstance(row[col], bool) for row in rows)
        and bool(rows)
        for col in range(len(headers))
    )
    text_rows = tuple(
        tuple(format_value(value, fmt) for value, fmt in zip(row, formats, strict=True))
        for row in rows
    )
    return Table(headers=headers, rows=text_rows, numeric=numeric, caption=caption)
