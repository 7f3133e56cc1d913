"""Seeded ablation tables: mean ± std per variant, a mark where a mean differs from the first variant's by more than
two standard errors, std columns in the CSV, error bars in the plot."""
import csv
import math

import pytest

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


def _write_ablation(directory, runs):
    import json

    directory.mkdir(parents=True)
    (directory / "summaries.json").write_text(json.dumps(runs))
    return directory


def test_budget_study_gaps_their_errors_and_the_rate_per_doubling(tmp_path):
    from unrollattn.train.ablate import gap_rates, gaps_against_budget, write_budget_study

    def run(variant, loss, tokens, width=64):
        return {"variant": variant, "val_loss": loss, "tokens_seen": tokens, "n_embd": width}

    small = _write_ablation(tmp_path / "b1", {
        "ref-seed0": run("ref", 3.0, 1000), "ref-seed1": run("ref", 3.2, 1000),
        "deep-seed0": run("deep", 3.5, 1000), "deep-seed1": run("deep", 3.7, 1000),
        "broken-seed0": {"variant": "broken", "error": "FloatingPointError: diverged"}})
    large = _write_ablation(tmp_path / "b4", {"ref": run("ref", 2.0, 4000), "deep": run("deep", 2.2, 4000)})
    rows = gaps_against_budget([large, small], reference="ref")
    assert [(r["variant"], r["tokens_seen"]) for r in rows] == [("ref", 1000), ("ref", 4000), ("deep", 1000),
                                                                ("deep", 4000)]
    deep_small = rows[2]
    assert math.isclose(deep_small["gap"], 0.5) and deep_small["seeds"] == 2
    assert math.isclose(deep_small["gap_se"], math.sqrt(0.1 ** 2 + 0.1 ** 2))  # sem 0.1414 / sqrt(2) for each
    assert rows[3]["gap_se"] == 0.0 and math.isclose(rows[3]["gap"], 0.2)
    rate = gap_rates(rows)[("deep",)]
    assert math.isclose(rate, (0.2 - 0.5) / 2)  # two doublings from 1000 to 4000 tokens
    markdown = write_budget_study([small, large], tmp_path / "out", reference="ref")
    assert "| deep | 1,000 | 2 | 3.6 ± 0.1414 | 0.5 |" in markdown and "-0.15" in markdown
    assert (tmp_path / "out" / "gaps.png").stat().st_size > 0
    table = list(csv.DictReader((tmp_path / "out" / "gaps.csv").open()))
    assert [row["val_loss"] for row in table] == ["3.1", "2.0", "3.6", "2.2"]

    wide = _write_ablation(tmp_path / "w", {"ref": run("ref", 1.5, 1000, 128), "deep": run("deep", 1.6, 1000, 128)})
    rows = gaps_against_budget([small, large, wide], reference="ref", by=["n_embd"])
    assert {(r["n_embd"], r["variant"]) for r in rows if r["tokens_seen"] == 1000} == {
        (64, "ref"), (64, "deep"), (128, "ref"), (128, "deep")}
    import pytest

    with pytest.raises(ValueError, match="both hold ref at tokens_seen=1000"):
        gaps_against_budget([small, wide], reference="ref")
    with pytest.raises(ValueError, match="no finished run of the reference 'gpt2'"):
        gaps_against_budget([small], reference="gpt2")
    with pytest.raises(FileNotFoundError, match="finished `unrollattn ablate`"):
        gaps_against_budget([tmp_path / "nowhere"], reference="ref")
    uneven = _write_ablation(tmp_path / "u", {"ref": run("ref", 1.0, 1000), "deep": run("deep", 1.0, 2000)})
    with pytest.raises(ValueError, match="deep saw tokens_seen=2000, the reference 1000"):
        gaps_against_budget([uneven], reference="ref")


def test_budget_study_pools_seeds_and_takes_the_reference_from_a_sibling(tmp_path):
    """Runs of one budget split over directories (by seed; the reference in its own) pool into one cell; a budget
    whose reference ran nowhere is named."""
    from unrollattn.train.ablate import gaps_against_budget

    def run(variant, loss, tokens, seed):
        return {"variant": variant, "val_loss": loss, "tokens_seen": tokens, "seed": seed}

    ref = _write_ablation(tmp_path / "ref", {"ref-seed0": run("ref", 3.0, 1000, 0), "ref-seed1": run("ref", 3.2, 1000, 1)})
    deep0 = _write_ablation(tmp_path / "d0", {"deep": run("deep", 3.5, 1000, 0)})
    deep1 = _write_ablation(tmp_path / "d1", {"deep": run("deep", 3.9, 1000, 1)})
    rows = {r["variant"]: r for r in gaps_against_budget([deep0, ref, deep1], reference="ref")}
    assert rows["deep"]["seeds"] == 2 and math.isclose(rows["deep"]["gap"], 0.6)
    assert rows["deep"]["ablation"] == f"{deep0}, {deep1}"
    lone = _write_ablation(tmp_path / "lone", {"deep": run("deep", 2.0, 4000, 0)})
    with pytest.raises(ValueError, match="no finished run of the reference 'ref' at tokens_seen=4000"):
        gaps_against_budget([ref, lone], reference="ref")


def test_budget_study_by_seed_gives_paired_gaps_within_one_directory(tmp_path):
    """``by=["seed"]`` splits one ablation's seeds into studies: each gap is a variant's run minus the reference's
    run of the same seed, pooled with another directory's runs of that seed; a run without the field is refused."""
    from unrollattn.train.ablate import gap_rates, gaps_against_budget

    def run(variant, loss, tokens, seed):
        return {"variant": variant, "val_loss": loss, "tokens_seen": tokens, "seed": seed}

    small = _write_ablation(tmp_path / "s", {"ref-seed0": run("ref", 3.0, 1000, 0), "ref-seed1": run("ref", 3.4, 1000, 1),
                                             "deep-seed0": run("deep", 3.5, 1000, 0),
                                             "deep-seed1": run("deep", 3.6, 1000, 1)})
    large = _write_ablation(tmp_path / "l", {"ref": run("ref", 2.0, 4000, 0), "deep": run("deep", 2.1, 4000, 0)})
    rows = gaps_against_budget([small, large], reference="ref", by=["seed"])
    gaps = {(r["seed"], r["tokens_seen"]): r["gap"] for r in rows if r["variant"] == "deep"}
    assert gaps.keys() == {(0, 1000), (1, 1000), (0, 4000)}
    assert math.isclose(gaps[(0, 1000)], 0.5) and math.isclose(gaps[(1, 1000)], 0.2)
    assert all(r["seeds"] == 1 and r["gap_se"] == 0 for r in rows)
    assert math.isclose(gap_rates(rows, by=["seed"])[(0, "deep")], (0.1 - 0.5) / 2)
    assert (1, "deep") not in gap_rates(rows, by=["seed"])  # one budget only
    unseeded = _write_ablation(tmp_path / "u", {"ref": {"variant": "ref", "val_loss": 1.0, "tokens_seen": 1000}})
    with pytest.raises(ValueError, match="ref: a run records no 'seed'"):
        gaps_against_budget([unseeded], reference="ref", by=["seed"])
