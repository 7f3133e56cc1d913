"""The training-throughput benchmark's utilisation columns: the 6N share and the share from counted FLOPs."""
import math

from benchmarks import lm_throughput


def _rows(table: str) -> list[dict]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_counted_share_of_the_peak_uses_the_counted_flops_and_is_zero_for_gpt2_against_itself(tmp_path):
    assert lm_throughput.main(["--variants", "gpt2,crate", "--width", "32", "--heads", "2", "--depth", "1",
                               "--seq-len", "16", "--batch", "2", "--repeats", "1", "--matmul-size", "256",
                               "--out", str(tmp_path)]) in (0, None)
    rows = {r["variant"]: r for r in _rows(next(tmp_path.glob("lm_throughput_*.md")).read_text())}
    for row in rows.values():
        share_6n, share_counted = _number(row["pct_of_matmul_peak"]), _number(row["pct_of_peak_counted"])
        ratio = _number(row["mflop_per_token_counted"]) / _number(row["mflop_per_token_6n"])
        assert math.isclose(share_counted / share_6n, ratio, rel_tol=1e-2), row
    assert _number(rows["gpt2"]["pct_vs_gpt2_counted"]) == 0
    gap = _number(rows["crate"]["pct_of_peak_counted"]) - _number(rows["gpt2"]["pct_of_peak_counted"])
    assert math.isclose(_number(rows["crate"]["pct_vs_gpt2_counted"]), gap, rel_tol=1e-2, abs_tol=1e-2)
    # CRATE's ISTA step applies its dictionary twice per token: more work than 6N counts
    assert _number(rows["crate"]["mflop_per_token_counted"]) > _number(rows["crate"]["mflop_per_token_6n"])
