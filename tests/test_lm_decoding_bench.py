"""benchmarks/lm_decoding.py runs end to end on a tiny shape for every registered LM variant (no timing asserted)."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks import lm_decoding
from benchmarks.common import counting_flops
from unrollattn.registry import model_variants


def test_a_row_per_variant_cache_and_batch_with_flops_and_the_decode_kind(tmp_path):
    assert lm_decoding.main(["--width", "32", "--heads", "2", "--depth", "1", "--prompt", "3", "--new-tokens", "4",
                             "--batches", "1,2", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "lm_decoding_cpu.md").read_text()
    rows = {(cells[1].strip(), cells[6].strip(), cells[7].strip()): cells for cells in
            (line.split("|") for line in text.splitlines()) if len(cells) > 7 and cells[7].strip() in ("1", "2")}
    variants = set(model_variants("causal-lm"))
    assert set(rows) == {(v, c, b) for v in variants for c in ("dynamic", "static") for b in ("1", "2")}
    assert all(float(cells[12].replace(",", "")) > 0 for cells in rows.values())  # ops_per_token
    assert all(float(cells[13].replace(",", "")) > 0 for cells in rows.values())  # mflop_per_token
    decode = {name: cells[5].strip() for (name, _, _), cells in rows.items()}
    assert decode["gpt2"] == decode["aot_mssa"] == decode["bilateral"] == "cached"
    assert decode["twicing"] == "recomputes"


def test_unknown_variants_and_caches_are_named(capsys):
    with pytest.raises(SystemExit):
        lm_decoding.main(["--variants", "gpt3", "--out", "/nonexistent"])
    with pytest.raises(SystemExit):
        lm_decoding.main(["--caches", "dynamic,sliding", "--out", "/nonexistent"])
    assert "--caches: expected a comma-separated subset of dynamic, static" in capsys.readouterr().err


def test_counted_flops_include_attention_on_cpu():
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with counting_flops() as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 8 * 8 * 4)  # scores and weighted sum, 2 FLOPs per multiply-add
