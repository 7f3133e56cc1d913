"""Run directories and logging: config.json, env.json, metrics.jsonl, summary.csv, loss plots.

Layout of a run directory (written by rank 0 only)::

    <out_dir>/<run_name>/
        config.json      resolved config (re-loadable with config_from_dict); on resume the new one
        env.json         versions, git hash, host, device, world size, command line of the first launch
        metrics.jsonl    one JSON object per log / eval step: {"step": ..., "train_loss": ..., ...}
        summary.csv      one row per evaluation (header = union of all columns)
        resume_changes.json   one entry per resume: time, step, checkpoint, changed config keys, env
        metrics.rewound.jsonl, summary.rewound.csv   rows logged after the checkpoint a resume went back to
        checkpoints/step_XXXXXXXX/   see checkpoint.py
        curves.png       loss curves

Nothing written here is dropped: a resume moves the rows it replays into the ``*.rewound.*`` files and
keeps ``env.json``, and a run directory is only reused on request (``--resume``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..utils.io import atomic_write_json, atomic_write_text, to_jsonable
from ..utils.plots import new_figure, save_figure

__all__ = ["RunDir", "RunDirError", "curves_figure", "draw_curves", "env_info", "plot_curves", "progress_bar", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.csv"
CONFIG_FILE = "config.json"
ENV_FILE = "env.json"
RESUME_FILE = "resume_changes.json"
REWOUND_METRICS_FILE = "metrics.rewound.jsonl"
REWOUND_SUMMARY_FILE = "summary.rewound.csv"


class RunDirError(ValueError):
    """A run directory cannot be created or reused as asked."""


def _git_info() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[2]
    info: dict[str, Any] = {"git_hash": None, "git_dirty": None}
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            info["git_hash"] = out.stdout.strip()
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5)
            if status.returncode == 0:
                info["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def env_info(device: Any = None, world_size: int | None = None) -> dict[str, Any]:
    """Versions, git hash, host and device of this process, for reproducibility records."""
    import torch

    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(dev).index or 0
        device_name = torch.cuda.get_device_name(index)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "numpy": _version("numpy"),
        "unrollattn": _version("unrollattn"),
        **_git_info(),
        "hostname": socket.gethostname(),
        "device": dev,
        "device_name": device_name,
        "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "world_size": world_size,
        "torch_threads": torch.get_num_threads(),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (a run directory is accepted too); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class RunDir:
    """One run's output directory; on non-main ranks every write is a no-op."""

    def __init__(self, path: str | os.PathLike, *, is_main: bool = True):
        self.dir = Path(path)
        self.is_main = is_main

    @property
    def name(self) -> str:
        return self.dir.name

    def __repr__(self) -> str:
        return f"RunDir({str(self.dir)!r})"

    def __fspath__(self) -> str:
        return str(self.dir)

    @classmethod
    def create(cls, out_dir: str | os.PathLike, run_name: str, config: Any, *, is_main: bool = True,
               resume: bool = False, device: Any = None, world_size: int | None = None,
               resume_from: Mapping[str, Any] | None = None) -> "RunDir":
        """Create ``out_dir/run_name`` and record ``config.json`` and ``env.json`` in it.

        An existing non-empty directory is only reused with ``resume=True``. Resuming a run that has a config.json
        checks ``config`` against it (:func:`~unrollattn.train.config.resume_config_changes`: ConfigError for a key
        that may not change), keeps its env.json and appends ``{time, **resume_from, changes, env}`` to
        resume_changes.json before config.json is replaced.
        """
        if not run_name or any(sep in run_name for sep in ("/", "\\")) or run_name in (".", ".."):
            raise RunDirError(f"run_name: expected a plain, non-empty directory name, got {run_name!r}")
        run = cls(Path(out_dir) / run_name, is_main=is_main)
        if not is_main:
            return run
        if run.dir.exists() and not run.dir.is_dir():
            raise RunDirError(f"run directory {run.dir} exists and is not a directory")
        if run.dir.exists() and any(run.dir.iterdir()) and not resume:
            raise RunDirError(f"run directory {run.dir} already exists and is not empty; add --resume to continue that "
                              "run, or choose another name with loop.run_name=NAME")
        run.dir.mkdir(parents=True, exist_ok=True)
        from .config import config_to_dict, resume_config_changes

        config_dict = config_to_dict(config) if config is not None else {}
        env = env_info(device, world_size)
        previous = run._read_json(CONFIG_FILE) if resume else None
        if previous is not None:
            changes = resume_config_changes(previous, config if config is not None else {}, where=str(run.dir))
            entries = run.resume_changes()
            entries.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **to_jsonable(dict(resume_from or {})),
                            "changes": changes, "env": env})
            atomic_write_json(run.path(RESUME_FILE), entries)  # first: the old values are on record before they go
        atomic_write_json(run.path(CONFIG_FILE), config_dict)
        if previous is None or not run.path(ENV_FILE).exists():
            atomic_write_json(run.path(ENV_FILE), env)
        return run

    def _read_json(self, name: str) -> Any:
        """The parsed JSON file ``name`` of this run, None when it does not exist; RunDirError when unreadable."""
        path = self.path(name)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunDirError(f"cannot read {path}: {err}") from None

    def resume_changes(self) -> list[dict[str, Any]]:
        """The entries of resume_changes.json (one per resume of this run), oldest first."""
        entries = self._read_json(RESUME_FILE)
        if entries is None:
            return []
        if not isinstance(entries, list):
            raise RunDirError(f"{self.path(RESUME_FILE)}: expected a JSON list of resume entries")
        return entries

    def history(self) -> str | None:
        """What earlier training left in this directory (logged rows, evaluations, checkpoints, a result), as
        words for a message; None when there is nothing a new start could lose."""
        found = []
        rows = [r for r in self.metrics() if isinstance(r.get("step"), (int, float))]
        if rows:
            found.append(f"{len(rows)} row(s) in {METRICS_FILE} up to step {max(r['step'] for r in rows):g}")
        if self.summary_rows():
            found.append(f"{len(self.summary_rows())} evaluation row(s) in {SUMMARY_FILE}")
        checkpoints = self.dir / "checkpoints"
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            found.append(f"incomplete checkpoint(s) {', '.join(sorted(p.name for p in checkpoints.iterdir()))}")
        if self.path("result.json").exists():
            found.append("result.json")
        return "; ".join(found) or None

    def path(self, name: str) -> Path:
        return self.dir / name

    def log(self, step: int, **metrics: Any) -> None:
        """Append ``{"step": step, **metrics}`` as one line of metrics.jsonl."""
        if not self.is_main:
            return
        row = {"step": int(step), **{k: to_jsonable(v) for k, v in metrics.items()}}
        line = json.dumps(row, allow_nan=True)
        with open(self.path(METRICS_FILE), "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path(METRICS_FILE))

    def summary(self, row: Mapping[str, Any]) -> None:
        """Append a row to summary.csv; new columns rewrite the file with the union header."""
        if not self.is_main:
            return
        row = {str(k): _csv_value(v) for k, v in row.items()}
        path = self.path(SUMMARY_FILE)
        rows, header = _read_csv(path)
        new_cols = [k for k in row if k not in header]
        if path.exists() and not new_cols:
            with open(path, "a", encoding="utf-8", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerow(row)
                f.flush()
            return
        _write_csv(path, rows + [row], header + new_cols)

    def summary_rows(self) -> list[dict[str, str]]:
        return _read_csv(self.path(SUMMARY_FILE))[0]

    def rewind(self, step: int) -> None:
        """Move the metrics.jsonl lines and summary.csv rows logged after ``step`` (used on resume: those steps are
        trained again) to metrics.rewound.jsonl / summary.rewound.csv, verbatim; torn or unreadable lines go
        there too. The moved rows are on disk before the originals are rewritten."""
        if not self.is_main:
            return
        metrics_path = self.path(METRICS_FILE)
        if metrics_path.exists():
            kept, moved = [], []
            for line in metrics_path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                ok = isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] <= step
                (kept if ok else moved).append(line)
            if moved:
                archive = self.path(REWOUND_METRICS_FILE)
                before = archive.read_text(encoding="utf-8") if archive.exists() else ""
                atomic_write_text(archive, before + "".join(line + "\n" for line in moved))
                atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))
        summary_path = self.path(SUMMARY_FILE)
        if summary_path.exists():
            rows, header = _read_csv(summary_path)
            if "step" in header:
                kept_rows, moved_rows = [], []
                for r in rows:
                    (kept_rows if _row_step(r) is not None and _row_step(r) <= step else moved_rows).append(r)
                if moved_rows:
                    archive_rows, archive_header = _read_csv(self.path(REWOUND_SUMMARY_FILE))
                    _write_csv(self.path(REWOUND_SUMMARY_FILE), archive_rows + moved_rows,
                               archive_header + [k for k in header if k not in archive_header])
                    _write_csv(summary_path, kept_rows, header)

    def write_json(self, name: str, obj: Any) -> Path | None:
        return atomic_write_json(self.path(name), obj) if self.is_main else None


def _row_step(row: Mapping[str, str]) -> float | None:
    try:
        return float(row.get("step", ""))
    except ValueError:
        return None


def _csv_value(v: Any) -> Any:
    v = to_jsonable(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def _read_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    if not path.exists():
        return [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = [dict(r) for r in reader]
        return rows, list(reader.fieldnames or [])


def _write_csv(path: Path, rows: Iterable[Mapping[str, Any]], header: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in header})
    atomic_write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# plots


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


STEP_LABEL = "step (optimizer updates)"
DEFAULT_LOSS_LABEL = "loss (mean per item)"


def _is_loss(key: str) -> bool:
    return key == "loss" or key.endswith("_loss")


def _curve_style(key: str, n_points: int) -> dict[str, Any]:
    """Training curves: solid lines; evaluations (validation and other non-training keys): dashed, with markers,
    so that a run evaluated a few times still reads as points on a curve."""
    if key.startswith("train"):
        return {"linestyle": "-", "marker": "o" if n_points < 3 else None, "markersize": 3, "linewidth": 1.4}
    return {"linestyle": "--", "marker": "o", "markersize": 5, "linewidth": 1.2, "markeredgecolor": "white",
            "markeredgewidth": 0.7}


def _key_name(key: str) -> str:
    return {"train_loss": "training", "val_loss": "validation"}.get(key, key)


def draw_curves(ax: Any, runs: Mapping[str, list[dict[str, Any]]], keys: Sequence[str], *,
                ylabel: str = DEFAULT_LOSS_LABEL, run_title: str = "run", empty_text: str | None = None) -> bool:
    """Draw ``keys`` against step for each run (label -> metrics rows) on one matplotlib axes: one colour per run,
    training keys solid, evaluation keys dashed with markers; the legend names the runs (when several) and says
    which line style is which key. Each line's label is ``"<run> <key>"``. Returns whether anything was drawn."""
    from matplotlib.lines import Line2D

    drawn_runs, drawn_keys = [], {}
    for i, (label, rows) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                style = _curve_style(key, len(xs))
                ax.plot(xs, ys, color=colour, label=f"{label} {key}", **style)
                drawn_keys.setdefault(key, style)
                if label not in drawn_runs:
                    drawn_runs.append(label)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not drawn_runs:
        ax.text(0.5, 0.5, empty_text or f"no {' or '.join(map(repr, keys))} logged", ha="center", va="center",
                transform=ax.transAxes)
        return False
    handles = []
    if len(runs) > 1:
        handles += [Line2D([], [], color=f"C{list(runs).index(r) % 10}", linewidth=2.5, label=r) for r in drawn_runs]
    for key, style in drawn_keys.items():
        kind = "solid" if style["linestyle"] == "-" else "dashed, markers"
        handles.append(Line2D([], [], color="0.35", linestyle=style["linestyle"], marker=style["marker"] or "",
                              markersize=style["markersize"], label=f"{_key_name(key)} ({kind})"))
    ax.legend(handles=handles, fontsize=7, title=run_title if len(runs) > 1 else None, title_fontsize=7)
    return True


def curves_figure(metrics_jsonl_paths: Mapping[str, str | os.PathLike] | str | os.PathLike,
                  keys: Iterable[str] = ("train_loss", "val_loss"), *, ylabel: str = DEFAULT_LOSS_LABEL) -> Any:
    """The matplotlib Figure of :func:`plot_curves` (the caller closes it)."""
    if not isinstance(metrics_jsonl_paths, Mapping):
        p = Path(metrics_jsonl_paths)
        metrics_jsonl_paths = {(p if p.is_dir() else p.parent).name: p}
    if not metrics_jsonl_paths:
        raise ValueError("plot_curves: expected at least one label -> metrics.jsonl path")
    keys = [keys] if isinstance(keys, str) else list(keys)
    runs = {label: read_metrics(path) for label, path in metrics_jsonl_paths.items()}
    losses = [k for k in keys if _is_loss(k)]
    panels = ([losses] if losses else []) + [[k] for k in keys if not _is_loss(k)]

    fig, axes = new_figure(1, len(panels), figsize=(6 * len(panels), 4.2))
    for ax, panel in zip(axes[0], panels):
        draw_curves(ax, runs, panel, ylabel=ylabel if panel is losses else panel[0])
        ax.set_title("loss curves" if panel is losses else panel[0])
    fig.tight_layout()
    return fig


def plot_curves(metrics_jsonl_paths: Mapping[str, str | os.PathLike] | str | os.PathLike,
                keys: Iterable[str] = ("train_loss", "val_loss"), out_png: str | os.PathLike | None = None, *,
                ylabel: str = DEFAULT_LOSS_LABEL) -> Path:
    """Plot ``keys`` against step for one or many runs (label -> metrics.jsonl or run dir).

    The losses among ``keys`` (``train_loss``, ``val_loss``, ...) share one panel, labelled ``ylabel`` (e.g.
    ``"cross-entropy (nats/token)"``); every other key gets its own. See :func:`draw_curves` for the styles.
    ``out_png`` defaults to ``curves.png`` next to the first metrics file. Returns the png path.
    """
    if out_png is None and metrics_jsonl_paths:
        first = Path(next(iter(metrics_jsonl_paths.values())) if isinstance(metrics_jsonl_paths, Mapping)
                     else metrics_jsonl_paths)
        out_png = (first if first.is_dir() else first.parent) / "curves.png"
    fig = curves_figure(metrics_jsonl_paths, keys, ylabel=ylabel)
    return save_figure(fig, out_png)


# ----------------------------------------------------------------------------------------------
# progress


class _NullBar:
    def __init__(self, silent: bool = False):
        self.silent = silent

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def write(self, s: str) -> None:
        if not self.silent:
            print(s, flush=True)

    def close(self) -> None:
        pass


class _TqdmBar:
    def __init__(self, bar):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._bar.set_postfix_str(s, refresh=refresh)

    def write(self, s: str) -> None:
        self._bar.write(s)

    def close(self) -> None:
        self._bar.close()


def progress_bar(total: int, *, initial: int = 0, enabled: bool = True, is_main: bool = True, desc: str = "train"):
    """A tqdm bar on the main rank when ``enabled`` and stderr is a TTY; otherwise a silent stand-in.

    Both have ``update``, ``set_postfix_str``, ``write`` (prints a line; silent off the main rank)
    and ``close``.
    """
    if not is_main:
        return _NullBar(silent=True)
    if not (enabled and sys.stderr.isatty()):
        return _NullBar()
    from tqdm.auto import tqdm

    return _TqdmBar(tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True))
