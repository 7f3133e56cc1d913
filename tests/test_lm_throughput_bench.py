"""The training-throughput benchmark's utilisation columns: the 6N share and the share from counted FLOPs."""
import math

from benchmarks import lm_throughput


def test_counted_share_of_the_peak_uses_the_counted_flops_and_is_zero_for_gpt2_against_itself(monkeypatch, tmp_path):
    published = {}
    publish = lm_throughput.publish_table

    def keep_rows(rows, columns, **kwargs):
        published.update({row["variant"]: row for row in rows})
        return publish(rows, columns, **kwargs)

    monkeypatch.setattr(lm_throughput, "publish_table", keep_rows)
    assert lm_throughput.main(["--variants", "gpt2,crate", "--width", "32", "--heads", "2", "--depth", "1",
                               "--seq-len", "16", "--batch", "2", "--repeats", "1", "--matmul-size", "256",
                               "--out", str(tmp_path)]) in (0, None)
    for row in published.values():
        ratio = row["mflop_per_token_counted"] / row["mflop_per_token_6n"]
        assert math.isclose(row["pct_of_peak_counted"] / row["pct_of_matmul_peak"], ratio, rel_tol=1e-9), row
    gpt2, crate = published["gpt2"], published["crate"]
    assert gpt2["pct_vs_gpt2_counted"] == 0
    assert math.isclose(crate["pct_vs_gpt2_counted"], crate["pct_of_peak_counted"] - gpt2["pct_of_peak_counted"])
    # CRATE's ISTA step applies its dictionary twice per token: more work than 6N counts
    assert crate["mflop_per_token_counted"] > crate["mflop_per_token_6n"]
    assert "pct_of_peak_counted" in next(tmp_path.glob("lm_throughput_*.md")).read_text()
