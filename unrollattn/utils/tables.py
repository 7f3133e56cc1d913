"""The one table writer: markdown and CSV from the same rows, one number format, atomic writes.

Rows are mappings from column name to cell value. A cell may be a number, text, None or NaN (missing: ``-`` in
markdown; in CSV None is an empty cell and NaN stays ``nan``) or a :class:`SeedStats` (``mean ± std`` over seeds in
markdown; in CSV the mean, and the std in a ``<column> std`` column next to it).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

from .io import atomic_write_text, to_jsonable

__all__ = ["SeedStats", "csv_table", "format_value", "markdown_table", "write_table"]


@dataclasses.dataclass(frozen=True)
class SeedStats:
    """One table cell over seeds: the values, and whether the mean differs from the first variant's by more than
    two standard errors of the difference."""

    values: tuple[float, ...]
    differs: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        if all(v == self.values[0] for v in self.values):  # e.g. a parameter count: keep it as it is
            return self.values[0]
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(self.n)


def format_value(value: Any) -> str:
    """Compact text for a table cell: ints with thousands separators; floats to 4 significant digits (from 10,000
    on, rounded to a whole number with separators; below 0.001 or from 1e15 on, in scientific notation); ``-`` for
    None and NaN; ``mean ± std`` over seeds (``*``: differs from the first variant by more than two standard errors).
    """
    if isinstance(value, SeedStats):
        if value.n == 1:
            return format_value(value.values[0])
        text = format_value(value.mean) if value.std == 0 else f"{format_value(value.mean)} ± {format_value(value.std)}"
        return text + (" *" if value.differs else "")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        magnitude = abs(value)
        if math.isinf(value) or value == 0:
            return f"{value:g}"
        if magnitude < 1e-3 or magnitude >= 1e15:
            return f"{value:.3e}"
        if magnitude >= 1e4:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    return str(value)


def _check_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    if isinstance(columns, str) or not columns or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"columns: expected a non-empty sequence of column names, got {columns!r}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}]: expected a mapping from column name to value, got {type(row).__name__}")
    return list(columns)


def _escape_markdown(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, SeedStats)) and not isinstance(value, bool)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *,
                   headers: Mapping[str, str] | None = None) -> str:
    """A markdown table of ``columns`` (in order) over ``rows``, cells by :func:`format_value`, pipes escaped.

    ``headers`` renames columns in the header line; a column whose present cells are all numbers is right-aligned.
    A column a row lacks is a missing cell.
    """
    columns = _check_table(rows, columns)
    headers = headers or {}
    numeric = [any(row.get(c) is not None for row in rows)
               and all(row.get(c) is None or _is_number(row.get(c)) for row in rows) for c in columns]
    lines = ["| " + " | ".join(_escape_markdown(str(headers.get(c, c))) for c in columns) + " |",
             "|" + "|".join("---:" if right else "---" for right in numeric) + "|"]
    lines += ["| " + " | ".join(_escape_markdown(format_value(row.get(c))) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, SeedStats):
        return value.mean
    value = to_jsonable(value)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def csv_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text of ``columns`` over ``rows``: values as they are (not rounded), None as an empty cell; a column with
    a :class:`SeedStats` of several seeds gets a ``<column> std`` column after it."""
    columns = _check_table(rows, columns)
    seeded = {c for c in columns if any(isinstance(row.get(c), SeedStats) and row[c].n > 1 for row in rows)}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([h for c in columns for h in ((c, f"{c} std") if c in seeded else (c,))])
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cells.append(_csv_cell(value))
            if c in seeded:
                cells.append(value.std if isinstance(value, SeedStats) else "")
        writer.writerow(cells)
    return buf.getvalue()


def write_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], markdown_path: str | os.PathLike,
                csv_path: str | os.PathLike | None = None, *, headers: Mapping[str, str] | None = None,
                heading: str | None = None, note: str | None = None) -> str:
    """Write :func:`markdown_table` to ``markdown_path`` (``heading`` above it, ``note`` below) and, when given,
    :func:`csv_table` to ``csv_path`` (the column names, not ``headers``), each atomically. Returns the markdown
    document as written."""
    parts = ([heading] if heading else []) + [markdown_table(rows, columns, headers=headers)] + ([note] if note else [])
    document = "\n\n".join(parts) + "\n"
    if csv_path is not None:
        atomic_write_text(Path(csv_path), csv_table(rows, columns))
    atomic_write_text(Path(markdown_path), document)
    return document
