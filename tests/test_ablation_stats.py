"""Seeded ablation tables: mean ± std per variant, a mark where a mean differs from the first variant's by more than
two standard errors, std columns in the CSV, error bars in the plot."""
import csv
import math

from unrollattn.train.ablate import compare, comparison_figure, summarize_seeds
from unrollattn.utils.tables import SeedStats, format_value


def test_mean_std_and_the_two_standard_error_mark(tmp_path):
    runs = {"base": [{"acc": 80.0, "params": 10}, {"acc": 81.0, "params": 10}, {"acc": 79.0, "params": 10}],
            "close": [{"acc": 80.5, "params": 7}, {"acc": 79.5, "params": 7}, {"acc": 81.5, "params": 7}],
            "far": [{"acc": 60.0, "params": 7}, {"acc": 61.0, "params": 7}, {"acc": 59.0, "params": 7}],
            "zero": [{"acc": 0.0, "params": 7}] * 3}
    rows = summarize_seeds(runs, ["acc", "params"])
    base, close, far = rows["base"]["acc"], rows["close"]["acc"], rows["far"]["acc"]
    assert (base.mean, base.std, base.n) == (80.0, 1.0, 3) and math.isclose(base.sem, 1 / math.sqrt(3))
    assert not close.differs and far.differs and rows["zero"]["acc"].differs  # |80 - 0| > 2 se even with std 0
    assert format_value(base) == "80 ± 1" and format_value(far) == "60 ± 1 *" and format_value(rows["zero"]["acc"]) == "0 *"
    assert format_value(rows["base"]["params"]) == "10" and rows["base"]["params"].mean == 10  # equal ints stay ints
    markdown = compare(rows, ["acc", "params"], tmp_path)
    assert "| far | 60 ± 1 * | 7 |" in markdown and "two standard errors" in markdown
    table = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert table[2]["acc"] == "60.0" and table[2]["acc std"] == "1.0" and table[2]["params"] == "7"
    fig = comparison_figure({k: {**v, "run_dir": None} for k, v in rows.items()}, metric="acc")
    assert len(fig.axes[0].containers) == 4  # one error bar per variant with seeds


def test_one_seed_is_a_plain_value():
    rows = summarize_seeds({"a": [{"acc": 80.0}], "b": [{"acc": 70.0}]}, ["acc"])
    assert format_value(rows["b"]["acc"]) == "70" and isinstance(rows["b"]["acc"], SeedStats)
