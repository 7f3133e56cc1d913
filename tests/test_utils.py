"""The bottom floor: the one table writer, the plot helper, atomic writes and the single-process dist helpers."""
import csv
import io
import math
import os

import pytest
import torch
from torch import nn

import unrollattn.utils.io as atomic_io
from unrollattn.utils.dist import (
    DistState, all_reduce_mean, all_reduce_sum, all_reduce_tensor, barrier, broadcast_object, env_int, group_active,
    global_batch_seed, is_main_process, micro_batch_size, micro_batch_slice, run_on_main, step_seed, unwrap_model,
)
from unrollattn.utils.io import atomic_write_json, atomic_write_text, to_jsonable
from unrollattn.utils.plots import Series, series_figure
from unrollattn.utils.tables import SeedStats, csv_table, format_value, markdown_table, write_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_one_number_format():
    assert [format_value(v) for v in (12345678, 0.5, 2 / 3, 123.456, 12345.6, 1e-5, 0.0, 3e20)] == [
        "12,345,678", "0.5", "0.6667", "123.5", "12,346", "1.000e-05", "0", "3.000e+20"]
    assert format_value(None) == format_value(math.nan) == "-"
    assert format_value(True) == "True" and format_value(math.inf) == "inf" and format_value("gpt2") == "gpt2"
    assert format_value(SeedStats((1.0, 2.0, 3.0))) == "2 ± 1"
    assert format_value(SeedStats((1.0, 2.0, 3.0), differs=True)) == "2 ± 1 *"
    assert format_value(SeedStats((7,))) == "7" and format_value(SeedStats((4, 4))) == "4"


def test_markdown_and_csv_come_from_the_same_rows(tmp_path):
    rows = [{"name": "a|b", "acc": SeedStats((80.0, 82.0)), "params": 1000, "loss": math.nan},
            {"name": "c", "acc": 70.0, "params": None}]  # "loss" absent from the second row: a missing cell
    columns = ["name", "acc", "params", "loss"]
    document = write_table(rows, columns, tmp_path / "t.md", tmp_path / "t.csv", headers={"acc": "top-1 %"},
                           heading="# title", note="a note")
    assert (tmp_path / "t.md").read_text() == document
    lines = document.splitlines()
    assert lines[0] == "# title" and lines[-1] == "a note"
    assert "| name | top-1 % | params | loss |" in lines and "|---|---:|---:|---:|" in lines
    assert "| a\\|b | 81 ± 1.414 | 1,000 | - |" in lines and "| c | 70 | - | - |" in lines
    table = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert list(table[0]) == ["name", "acc", "acc std", "params", "loss"]  # CSV keeps the column names
    assert table[0] == {"name": "a|b", "acc": "81.0", "acc std": str(math.sqrt(2)), "params": "1000", "loss": "nan"}
    assert table[1] == {"name": "c", "acc": "70.0", "acc std": "", "params": "", "loss": ""}
    assert csv_table(rows, columns) == (tmp_path / "t.csv").read_text()
    assert markdown_table(rows, columns, headers={"acc": "top-1 %"}) in document


def test_newlines_in_cells_stay_on_one_row_and_values_are_not_rounded_in_csv():
    rows = [{"text": "two\nlines", "x": 0.123456789, "shape": (2, 3)}]
    assert "| two lines | 0.1235 | (2, 3) |" in markdown_table(rows, ["text", "x", "shape"])
    parsed = next(csv.DictReader(io.StringIO(csv_table(rows, ["text", "x", "shape"]))))
    assert parsed == {"text": "two\nlines", "x": "0.123456789", "shape": "[2, 3]"}


def test_bad_tables_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="columns: expected a non-empty sequence"):
        markdown_table([{"a": 1}], [])
    with pytest.raises(ValueError, match="columns: expected a non-empty sequence"):
        csv_table([{"a": 1}], "a")
    with pytest.raises(ValueError, match=r"rows\[1\]: expected a mapping"):
        write_table([{"a": 1}, [1]], ["a"], tmp_path / "t.md")
    assert not (tmp_path / "t.md").exists()


def test_a_failing_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "t.md"
    write_table([{"a": 1}], ["a"], target)
    old = target.read_text()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic_io.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_table([{"a": 2}], ["a"], target)
    assert target.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["t.md"]  # no temporary left


def test_atomic_write_helpers(tmp_path):
    atomic_write_text(tmp_path / "deep" / "x.txt", "hello")
    assert (tmp_path / "deep" / "x.txt").read_text() == "hello"
    atomic_write_json(tmp_path / "x.json", {"path": tmp_path, "t": torch.tensor([1, 2]), "s": {3, 1}})
    assert (tmp_path / "x.json").read_text().startswith("{\n")
    assert to_jsonable({"a": (1, 2.5), 3: None}) == {"a": [1, 2.5], "3": None}


def test_series_figure_lines_points_and_bars_with_error_bars(tmp_path):
    series = [Series([0, 1, 2], [1.0, 2.0, 4.0], label="line"),
              Series([0, 1, 2], [1.5, 2.5, 3.0], label="points", kind="points", yerr=[0.1, 0.2, 0.1]),
              Series([0, 1, 2], [1.0, 1.0, 2.0], label="bars", kind="bar", yerr=[0.1, 0.1, 0.3])]
    png = series_figure(series, tmp_path / "plot.png", xlabel="x", ylabel="y", log_y=True)
    assert png.read_bytes()[:8] == PNG_MAGIC and [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    with pytest.raises(ValueError, match="kind: expected one of"):
        Series([0], [1], kind="pie")
    with pytest.raises(ValueError, match="yerr has 1 values"):
        Series([0, 1], [1, 2], yerr=[0.1])
    with pytest.raises(ValueError, match="x has 2 values but y has 1"):
        Series([0, 1], [1])


def test_single_process_dist_helpers(monkeypatch):
    state = DistState()
    assert state.is_main and not state.distributed and not group_active(state)
    assert all_reduce_sum(torch.tensor(2.5), state) == 2.5 and all_reduce_mean(4, state) == 4.0
    assert torch.equal(all_reduce_tensor(torch.tensor([1.0, 2.0]), state, "mean"), torch.tensor([1.0, 2.0],
                                                                                              dtype=torch.float64))
    with pytest.raises(ValueError, match="op: expected 'sum' or 'mean'"):
        all_reduce_tensor(torch.ones(2), state, "max")
    with pytest.raises(ValueError, match="expected a scalar"):
        all_reduce_sum(torch.ones(2), state)
    assert broadcast_object({"a": 1}, state) == {"a": 1}
    barrier(state)  # no process group: returns at once
    calls = []
    assert run_on_main(state, lambda: calls.append(1) or "done") == "done" and calls == [1]  # once on rank 0
    with pytest.raises(KeyError):
        run_on_main(state, lambda: {}["missing"])


def test_is_main_process_reads_the_state_or_the_torchrun_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process() and env_int("RANK") is None
    monkeypatch.setenv("RANK", "")
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process() and is_main_process(DistState(rank=0, world_size=2))
    assert not is_main_process(DistState(rank=1, world_size=2))
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="environment variable RANK must be an integer, got 'one'"):
        is_main_process()


def test_micro_batches_and_seeds():
    assert micro_batch_size(32, 2, 4) == 4
    with pytest.raises(ValueError, match="must be divisible by world_size \\* grad_accum"):
        micro_batch_size(30, 2, 4)
    with pytest.raises(ValueError, match="grad_accum: expected an int >= 1"):
        micro_batch_size(32, 0, 1)
    assert micro_batch_slice(32, 2, 4, 1, 2) == slice(24, 28)  # chunk micro * world + rank of 4 items
    assert [micro_batch_slice(8, 2, 2, m, r) for m in (0, 1) for r in (0, 1)] == [slice(i, i + 2) for i in (0, 2, 4, 6)]
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size=2"):
        micro_batch_slice(8, 1, 2, 0, 2)
    with pytest.raises(ValueError, match="micro: expected 0 <= micro < grad_accum=2"):
        micro_batch_slice(8, 2, 1, 2, 0)
    assert global_batch_seed(0, 7) == step_seed(0, 7, 0) != step_seed(0, 7, 1) != global_batch_seed(0, 8)
    assert 0 <= step_seed(123, 4, 5) < 2 ** 63


def test_unwrap_model_strips_compile_wrappers():
    model = nn.Linear(2, 2)

    class Wrapped(nn.Module):  # what torch.compile returns: the module under ``_orig_mod``
        def __init__(self):
            super().__init__()
            self._orig_mod = model

    assert unwrap_model(model) is model and unwrap_model(Wrapped()) is model


def test_no_temporary_file_is_left_by_a_failed_write_callback(tmp_path):
    def half_write(path):
        path.write_text("partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_io.atomic_write(tmp_path / "x.txt", half_write)
    assert os.listdir(tmp_path) == []
