"""Comparison tables and plots over finished runs (the training itself is :func:`fit`'s job).

An ablation runs one recipe per variant and hands the per-variant summaries (``fit``'s return
values, or any dicts) to :func:`compare` and :func:`plot_comparison`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..utils.plots import Series, draw_series, new_figure, save_figure
from ..utils.tables import SeedStats, write_table
from .runlog import DEFAULT_LOSS_LABEL, METRICS_FILE, draw_curves, read_metrics

__all__ = ["compare", "comparison_figure", "gap_rates", "gaps_against_budget", "plot_comparison", "read_ablation",
           "summarize_seeds", "write_budget_study"]


def summarize_seeds(runs: Mapping[str, Sequence[Mapping[str, Any]]], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{variant: [summary per seed]} -> {variant: {column: SeedStats (numbers) or the first seed's value}}; cells
    of later variants whose mean differs from the first variant's by more than 2 * sqrt(sem_a^2 + sem_b^2) are
    marked (``differs``), in the columns the seeds change."""
    rows: dict[str, dict[str, Any]] = {}
    for label, summaries in runs.items():
        row = {}
        for column in columns:
            values = [s.get(column) for s in summaries]
            numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
            row[column] = SeedStats(tuple(numbers)) if numbers and len(numbers) == len(values) else next(
                (v for v in values if v is not None), None)
        rows[label] = row
    first = next(iter(rows), None)
    for label, row in rows.items():
        if label == first:
            continue
        for column, cell in row.items():
            base = rows[first].get(column)
            if isinstance(cell, SeedStats) and isinstance(base, SeedStats) and cell.n > 1 and base.n > 1 and \
                    (cell.std > 0 or base.std > 0):  # not for what seeds do not change (parameter counts)
                bound = 2 * math.sqrt(cell.sem ** 2 + base.sem ** 2)
                row[column] = dataclasses.replace(cell, differs=abs(cell.mean - base.mean) > bound)
    return rows


def compare(runs: Mapping[str, Mapping[str, Any]], columns: Sequence[str], out_dir: str | os.PathLike,
            *, label: str = "variant") -> str:
    """Write ``comparison.md`` and ``comparison.csv`` (one row per run, the given columns) to ``out_dir``.

    Missing values show as ``-`` in markdown and empty cells in CSV. Returns the markdown table.
    """
    if not runs:
        raise ValueError("compare: expected at least one run (label -> summary dict)")
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise ValueError("compare: expected at least one column name")
    for name, summary in runs.items():
        if not isinstance(summary, Mapping):
            raise ValueError(f"compare: run {name!r} should map to a summary dict, got {type(summary).__name__}")
    absent = [c for c in columns if not any(c in s for s in runs.values())]
    if absent:
        known = sorted({k for s in runs.values() for k in s})
        raise ValueError(f"compare: column(s) {', '.join(map(repr, absent))} appear in no run; available: {', '.join(known)}")

    seeded = any(isinstance(s.get(c), SeedStats) and s[c].n > 1 for s in runs.values() for c in columns)
    note = (f"mean ± std over seeds; * = differs from {next(iter(runs))} by more than two standard errors"
            if seeded else None)
    rows = [{**summary, label: name} for name, summary in runs.items()]
    out_dir = Path(out_dir)
    return write_table(rows, [label, *columns], out_dir / "comparison.md", out_dir / "comparison.csv", note=note)


def _metrics_path(summary: Mapping[str, Any]) -> Path | None:
    for key in ("metrics", "run_dir"):
        value = summary.get(key)
        if value:
            path = Path(value)
            path = path / METRICS_FILE if path.is_dir() else path
            if path.exists():
                return path
    return None


def comparison_figure(runs: Mapping[str, Mapping[str, Any]], *, metric: str = "top1", params_key: str = "params",
                      loss_keys: Sequence[str] = ("train_loss", "val_loss"), title: str | None = None,
                      ylabel: str | None = None) -> Any:
    """The matplotlib Figure of :func:`plot_comparison` (the caller closes it)."""
    if not runs:
        raise ValueError("plot_comparison: expected at least one run (label -> summary dict)")
    fig, axes = new_figure(1, 2, figsize=(13, 4.8))
    ax_metric, ax_loss = axes[0]
    mean = lambda v: v.mean if isinstance(v, SeedStats) else v  # noqa: E731
    points = [(name, mean(s.get(params_key)), mean(s.get(metric))) for name, s in runs.items()]
    points = [(n, p, m) for n, p, m in points if isinstance(p, (int, float)) and isinstance(m, (int, float))
              and math.isfinite(p) and math.isfinite(m)]
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}  # a variant has one colour in both panels
    series = []
    for name, p, m in points:
        spread = runs[name].get(metric)  # error bar: one standard deviation over seeds
        yerr = [spread.std] if isinstance(spread, SeedStats) and spread.n > 1 else None
        series.append(Series([p], [m], kind="points", yerr=yerr, style={"color": colours[name]}))
    log_x = bool(points) and max(p for _, p, _ in points) > 50 * max(1, min(p for _, p, _ in points))
    params_name = "parameters" if params_key == "params" else params_key
    draw_series(ax_metric, series, xlabel=f"{params_name}{' (log scale)' if log_x else ''}", ylabel=metric,
                log_x=log_x, legend=False)
    ax_metric.set_title(f"{metric} vs {params_name}")
    for name, p, m in points:
        ax_metric.annotate(str(name), (p, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not points:
        ax_metric.text(0.5, 0.5, f"no run has both {params_key!r} and {metric!r}", ha="center", va="center",
                       transform=ax_metric.transAxes)

    curves = {}
    for name, summary in runs.items():
        path = _metrics_path(summary)
        curves[name] = read_metrics(path) if path is not None else []
    if ylabel is None:  # the runs' own loss label when they agree (a Task's ``loss_label``)
        labels = {summary.get("loss_label") for summary in runs.values()} - {None}
        ylabel = labels.pop() if len(labels) == 1 else DEFAULT_LOSS_LABEL
    draw_curves(ax_loss, curves, loss_keys, ylabel=ylabel, run_title="variant",
                empty_text="no metrics.jsonl found for these runs")
    ax_loss.set_title("loss curves")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_comparison(runs: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike, *, metric: str = "top1",
                    params_key: str = "params", loss_keys: Sequence[str] = ("train_loss", "val_loss"),
                    title: str | None = None, ylabel: str | None = None) -> Path:
    """Write ``comparison.png``: ``metric`` vs parameter count (labelled scatter) and the loss curves read from each
    run's metrics.jsonl (``summary["run_dir"]`` or ``summary["metrics"]``): one colour per variant, training loss
    solid, validation dashed with markers (see :func:`~unrollattn.train.runlog.draw_curves`)."""
    fig = comparison_figure(runs, metric=metric, params_key=params_key, loss_keys=loss_keys, title=title, ylabel=ylabel)
    return save_figure(fig, Path(out_dir) / "comparison.png")


# ----------------------------------------------------------------------------------------------------- budgets


def read_ablation(directory: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """{variant: [summary per seed]} of a finished ablation directory (its summaries.json), failed runs left out."""
    import json

    path = Path(directory) / "summaries.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the directory of a finished `unrollattn ablate` run")
    runs = json.loads(path.read_text())
    if not isinstance(runs, dict) or not all(isinstance(s, dict) and "variant" in s for s in runs.values()):
        raise ValueError(f"{path}: expected {{run name: summary with a 'variant'}}, as `unrollattn ablate` writes it")
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for summary in runs.values():
        if "error" not in summary:
            by_variant.setdefault(summary["variant"], []).append(summary)
    return by_variant


def _one_value(summaries: Sequence[Mapping[str, Any]], key: str, where: str) -> Any:
    values = {s.get(key) for s in summaries}
    if len(values) != 1 or None in values:
        raise ValueError(f"{where}: expected one value of {key!r} for all its runs, got {sorted(map(str, values))}")
    return values.pop()


def _split_by(by_variant: Mapping[str, Sequence[Mapping[str, Any]]], by: Sequence[str], where
              ) -> dict[tuple[str, tuple], list[Mapping[str, Any]]]:
    """{(variant, values of the ``by`` fields): its runs} of one ablation; a run without one of the fields is refused."""
    studies: dict[tuple[str, tuple], list[Mapping[str, Any]]] = {}
    for variant, summaries in by_variant.items():
        for summary in summaries:
            missing = [field for field in by if summary.get(field) is None]
            if missing:
                raise ValueError(f"{where} {variant}: a run records no {missing[0]!r} (the fields that split the study "
                                 f"must be in every run's summary)")
            key = tuple(summary[field] for field in by)
            if not all(isinstance(value, (str, int, float, bool)) for value in key):
                raise ValueError(f"{where} {variant}: the fields that split the study must hold single values, got "
                                 f"{dict(zip(by, key))}")
            studies.setdefault((variant, key), []).append(summary)
    return studies


def gaps_against_budget(ablations: Sequence[str | os.PathLike], *, reference: str, metric: str = "val_loss",
                        x: str = "tokens_seen", by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of the budget study: for every budget (``x``, a summary field) and every variant, ``metric`` over its
    seeds (:class:`SeedStats`), the gap to ``reference`` (difference of the means) and its standard error
    sqrt(sem_v^2 + sem_ref^2). The ``by`` fields split the runs into studies (``n_embd``: one per model size; with
    ``seed`` too, one per seed: paired gaps); within a study of an ablation ``x`` has one value per variant, and
    where the study holds the reference every variant must have the reference's ``x``. Ablations at the same budget
    are pooled: one variant's runs from several directories are its seeds (their recorded seeds must differ), and
    the reference may sit in another directory than the variants (seeds split over processes). Rows are sorted by
    ``by``, variant, x."""
    cells: dict[tuple, dict[str, list[dict[str, Any]]]] = {}  # (*by, budget) -> variant -> runs
    sources: dict[tuple, list[str]] = {}  # (*by, budget, variant) -> directories
    read = [(directory, read_ablation(directory)) for directory in ablations]
    if not any(reference in by_variant for _, by_variant in read):
        held = sorted({v for _, by_variant in read for v in by_variant})
        raise ValueError(f"{', '.join(map(str, ablations))}: no finished run of the reference {reference!r} "
                         f"(variants: {', '.join(held)})")
    for directory, by_variant in read:
        studies = _split_by(by_variant, by, directory)
        for (variant, key), summaries in studies.items():
            budget = _one_value(summaries, x, f"{directory} {variant}")
            if (reference, key) in studies:
                ref_budget = _one_value(studies[(reference, key)], x, f"{directory} {reference}")
                if budget != ref_budget:
                    raise ValueError(f"{directory}: {variant} saw {x}={budget}, the reference {ref_budget}")
            cell = cells.setdefault((*key, budget), {})
            where = sources.setdefault((*key, budget, variant), [])
            if variant in cell:
                before, now = [s.get("seed") for s in cell[variant]], [s.get("seed") for s in summaries]
                if None in before + now or set(before) & set(now):
                    raise ValueError(f"{directory} and {', '.join(where)} both hold {variant} at {x}={budget} "
                                     f"(seeds {sorted(map(str, now))} and {sorted(map(str, before))}): pool only "
                                     f"ablations whose runs recorded different seeds")
            cell.setdefault(variant, []).extend(summaries)
            where.append(str(directory))
    rows = []
    for (*key, budget), variants in cells.items():
        if reference not in variants:
            held = sorted({d for v in variants for d in sources[(*key, budget, v)]})
            raise ValueError(f"{', '.join(held)}: no finished run of the reference {reference!r} at {x}={budget} "
                             f"(variants: {', '.join(variants)})")
        stats = {}
        for variant, summaries in variants.items():
            values = [s.get(metric) for s in summaries]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                raise ValueError(f"{', '.join(sources[(*key, budget, variant)])} {variant}: {metric!r} missing or "
                                 f"not finite in {values}")
            stats[variant] = SeedStats(tuple(float(v) for v in values))
        ref = stats[reference]
        for variant in variants:
            rows.append({**dict(zip(by, key)), "variant": variant, x: budget, "seeds": stats[variant].n,
                         metric: stats[variant], "gap": stats[variant].mean - ref.mean,
                         "gap_se": math.sqrt(stats[variant].sem ** 2 + ref.sem ** 2),
                         "ablation": ", ".join(sources[(*key, budget, variant)])})
    return sorted(rows, key=lambda r: (*(str(r[f]) for f in by), r["variant"] != reference, r["variant"], r[x]))


def gap_rates(rows: Sequence[Mapping[str, Any]], *, x: str = "tokens_seen", by: Sequence[str] = ()
              ) -> dict[tuple, float]:
    """{(*by values, variant): least-squares slope of the gap against log2(x)}: the change of the gap per doubling
    of the budget (negative: the gap shrinks), for every variant with at least two budgets."""
    points: dict[tuple, list[tuple[float, float]]] = {}
    for row in rows:
        points.setdefault((*(row[f] for f in by), row["variant"]), []).append((math.log2(row[x]), row["gap"]))
    rates = {}
    for key, xy in points.items():
        if len({p[0] for p in xy}) < 2:
            continue
        mx, my = sum(p[0] for p in xy) / len(xy), sum(p[1] for p in xy) / len(xy)
        rates[key] = sum((px - mx) * (py - my) for px, py in xy) / sum((px - mx) ** 2 for px, _ in xy)
    return rates


def write_budget_study(ablations: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, reference: str,
                       metric: str = "val_loss", x: str = "tokens_seen", by: Sequence[str] = ()) -> str:
    """``gaps.md`` / ``gaps.csv`` (:func:`gaps_against_budget`, with the gap per doubling of :func:`gap_rates`) and
    ``gaps.png`` (the gap to ``reference`` against ``x`` on a log axis, error bars of one standard error; one panel
    per ``by`` group) in ``out_dir``; returns the markdown table."""
    rows = gaps_against_budget(ablations, reference=reference, metric=metric, x=x, by=by)
    rates = gap_rates(rows, x=x, by=by)
    table = [{**row, "gap per doubling": rates.get((*(row[f] for f in by), row["variant"]))
              if row["variant"] != reference else None} for row in rows]
    columns = [*by, "variant", x, "seeds", metric, "gap", "gap_se", "gap per doubling"]
    out_dir = Path(out_dir)
    markdown = write_table(table, columns, out_dir / "gaps.md", out_dir / "gaps.csv",
                           note=f"gap = {metric} minus {reference}'s at the same {x}; gap_se = its standard error "
                                f"over seeds (0 with one seed each); gap per doubling = least-squares slope of the "
                                f"gap against log2({x})")
    groups = sorted({tuple(r[f] for f in by) for r in rows}, key=str)
    fig, axes = new_figure(1, len(groups), figsize=(6 * len(groups), 4.2))
    for ax, group in zip(axes[0], groups):
        series = []
        variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != reference]
        for i, variant in enumerate(variants):
            mine = sorted((r for r in rows if r["variant"] == variant and tuple(r[f] for f in by) == group),
                          key=lambda r: r[x])
            if mine:
                series.append(Series([r[x] for r in mine], [r["gap"] for r in mine], label=variant,
                                     yerr=[r["gap_se"] for r in mine], style={"color": f"C{i % 10}", "marker": "o"}))
        draw_series(ax, series, xlabel=f"{x} (log scale)", ylabel=f"{metric} gap to {reference}", log_x=True,
                    title=", ".join(f"{f}={v}" for f, v in zip(by, group)) or None)
        ax.axhline(0.0, color="k", linewidth=0.8)
    fig.tight_layout()
    save_figure(fig, out_dir / "gaps.png")
    return markdown
