"""Coding rate, compression term and learned-subspace SNR (fast paths against their literal references), and the
``compression`` / ``maps`` diagnostics on tiny trained runs."""
import json

import pytest
import torch

import unrollattn
from unrollattn.diagnostics import compression, maps
from unrollattn.diagnostics.coding_rate import (
    coding_rate, coding_rate_reference, compression_rate, compression_rate_reference, head_subspaces,
    learned_subspace_snr, learned_subspace_snr_reference, orthonormal_bases,
)
from unrollattn.diagnostics.runs import load_run
from unrollattn.registry import ATTENTIONS, get_attention


@pytest.mark.parametrize("n,d", [(5, 12), (20, 6)])  # both sides of the Sylvester switch
def test_fast_rates_match_the_literal_logdet(n, d):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, n, d, generator=gen)
    bases = torch.randn(3, 2, d, generator=gen)
    for b in range(3):
        assert coding_rate(z, 0.3)[b].item() == pytest.approx(coding_rate_reference(z[b], 0.3), rel=1e-10)
        assert compression_rate(z, bases, 0.3)[b].item() == pytest.approx(
            compression_rate_reference(z[b], bases, 0.3), rel=1e-10)


def test_rates_behave_as_the_definitions_say():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    bases = q.T.reshape(4, 2, 8)  # orthonormal U_1..U_4 spanning R^8
    on_one = torch.randn(40, 2, generator=gen, dtype=torch.float64) @ bases[0]  # tokens inside U_1
    spread = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    assert compression_rate(on_one, bases).item() < compression_rate(spread, bases).item()  # compressed: lower R^c
    assert coding_rate(on_one).item() < coding_rate(spread).item()
    assert coding_rate(torch.zeros(5, 8)).item() == 0.0
    assert learned_subspace_snr(on_one, bases)[0] > 1e6
    snr, share = learned_subspace_snr(spread, bases)
    assert snr == pytest.approx(learned_subspace_snr_reference(spread, bases), rel=1e-9)
    assert share.sum().item() == pytest.approx(1.0)
    # the SNR sees the span only: rescaled, non-orthonormal bases give the same value
    mixed = torch.randn(4, 2, 2, generator=gen, dtype=torch.float64) @ bases * 3
    assert learned_subspace_snr(spread, mixed)[0] == pytest.approx(snr, rel=1e-9)
    q2 = orthonormal_bases(mixed)
    torch.testing.assert_close(q2 @ q2.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(4, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, N, d\]"):
        coding_rate(torch.zeros(8))


def test_head_subspaces_for_every_registered_attention():
    for name in ATTENTIONS.names():
        layer = get_attention(name)(16, 2)
        bases, what = head_subspaces(layer)
        assert bases.shape == (2, 8, 16), name
        assert what == ("learned subspaces U_k (mssa)" if name == "mssa" else "value projections W_V^k"), name
    with pytest.raises(ValueError, match="do not apply"):
        head_subspaces(torch.nn.Linear(3, 3))


def test_layer_measures_see_ista_zeros_and_drop_the_class_token():
    model = unrollattn.build_model("crate_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                                   num_heads=2, num_classes=3).eval()
    rows = compression.layer_measures(model, torch.randn(6, 3, 16, 16), batch_size=4)
    assert [r["layer"] for r in rows] == [0, 1] and all(r["attention"] == "mssa" for r in rows)
    assert all(0.2 < r["sparsity_out"] < 1 for r in rows)  # ReLU(ISTA): exact zeros
    assert all(r["theory_gain"] is None for r in rows)
    aot = unrollattn.build_model("aot_mssa_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                                 num_heads=2, num_classes=3, attn_options={"tied_output": True, "step_size": 0.2,
                                                                           "nonlinearity": "thresholded_softmax",
                                                                           "threshold": 0.75}).eval()
    row = compression.layer_measures(aot, torch.randn(2, 3, 16, 16))[0]
    assert row["theory_gain"] == pytest.approx(1.15) and row["sparsity_out"] == 0


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    from unrollattn.recipes import classify

    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for variant in ("crate", "bilateral", "glr"):
        overrides = [f"model.variant={variant}", "loop.max_steps=2", "loop.eval_every=0", "robust.num_images=0",
                     f"loop.out_dir={root}", f"loop.run_name={variant}"]
        if variant == "glr":
            overrides[0:1] = ["model.attention=glr", "model.block=transformer"]
        assert classify.main(["--preset", "digits_debug", *overrides]) == 0
        dirs[variant] = root / variant
    return dirs


def test_compression_cli_overlays_runs(tiny_runs, tmp_path):
    out = tmp_path / "overlay"
    assert compression.main([str(tiny_runs["crate"]), str(tiny_runs["bilateral"]), "--images", "16",
                             "--out", str(out)]) == 0
    assert {"compression.md", "compression.csv", "compression.png"} <= {p.name for p in out.iterdir()}
    lines = (out / "compression.csv").read_text().splitlines()
    assert lines[0].startswith("run,layer,attention,subspaces,R_in,Rc_in") and len(lines) == 1 + 2 + 2
    text = (out / "compression.md").read_text()
    assert "value projections W_V^k" in text and "learned subspaces U_k" in text and "First → last layer" in text


def test_maps_cli_on_classification_runs(tiny_runs, tmp_path):
    assert maps.main([str(tiny_runs["bilateral"]), "--images", "8", "--patch", "1,0", "--out", str(tmp_path)]) == 0
    assert {"maps.png", "maps_bilateral.png", "maps.md", "maps.csv"} <= {p.name for p in tmp_path.iterdir()}
    header, *rows = (tmp_path / "maps.csv").read_text().splitlines()
    assert header.split(",")[:3] == ["layer", "head", "attention"] and len(rows) == 2 * 2  # depth 2 x 2 heads
    spatial = [float(r.split(",")[6]) for r in rows]
    assert all(s > 0 for s in spatial)  # bilateral's learned h_p
    graph_out = tmp_path / "graph"
    assert maps.main([str(tiny_runs["glr"]), "--images", "4", "--out", str(graph_out)]) == 0
    assert (graph_out / "maps_graph.png").is_file() and "glr" in (graph_out / "maps.md").read_text()
    with pytest.raises(ValueError, match="patch grid"):
        maps.main([str(tiny_runs["bilateral"]), "--patch", "9,9", "--out", str(tmp_path)])


def test_maps_on_a_restoration_run(tmp_path):
    from unrollattn.recipes import restore

    assert restore.main(["--preset", "tiny", "model.variant=uglr", f"loop.out_dir={tmp_path}",
                         "loop.run_name=uglr"]) == 0
    assert maps.main([str(tmp_path / "uglr"), "--out", str(tmp_path / "maps")]) == 0
    csv = (tmp_path / "maps" / "maps.csv").read_text().splitlines()
    assert (tmp_path / "maps" / "maps_restoration.png").is_file() and len(csv) == 1 + 1  # tiny: one block
    with pytest.raises(ValueError, match="restoration run has no tokens"):
        compression.main([str(tmp_path / "uglr"), "--out", str(tmp_path)])


def test_bad_run_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="not a finished run of classify, lm, restore"):
        maps.main([str(tmp_path)])


def test_snr_on_a_trained_run_reads_its_learned_subspaces(tiny_runs, tmp_path):
    from unrollattn.diagnostics import snr

    assert snr.main(["--run", str(tiny_runs["crate"]), "--images", "16", "--out", str(tmp_path)]) == 0
    header, *rows = (tmp_path / "snr.csv").read_text().splitlines()
    assert header.startswith("run,layer,attention,subspaces,snr_in,snr_out,snr_gain,theory_gain")
    assert len(rows) == 2 and all("learned subspaces U_k" in r and r.endswith("--eta/--tau") for r in rows)
    assert (tmp_path / "snr.png").is_file()
    assert snr.main(["--layers", "1", "--tokens", "64", "--subspace-dim", "16", "--deltas", "0.2", "--tau", "0.55",
                     "--out", str(tmp_path / "synthetic")]) == 0  # the synthetic path stays


def test_language_model_layers_are_measured_on_a_full_forward():
    model = unrollattn.build_model("aot_mssa_lm_tiny", n_layer=2, n_embd=32, n_head=2, vocab_size=50,
                                   n_positions=16).eval()
    ids = torch.randint(0, 50, (3, 12))
    from unrollattn.diagnostics.attention import attention_maps

    records = attention_maps(model, ids, use_cache=False)
    assert [r.attention for r in records] == ["mssa", "mssa"]
    w = records[0].tensors["weights"]
    assert torch.equal(w.triu(1), torch.zeros_like(w))  # causal
    rows = compression.layer_measures(model, ids, forward_kwargs={"use_cache": False})
    assert len(rows) == 2 and all(r["R_in"] > 0 for r in rows)
