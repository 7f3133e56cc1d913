"""The icl recipe: in-context linear regression with the lm recipe's backbones, its command line and ablation."""
import json
import math

import pytest
import torch

from unrollattn import cli
from unrollattn.language import evaluation as ev
from unrollattn.recipes import icl
from unrollattn.train import ConfigError

SMALL = ["model.n_embd=32", "model.depth=1", "loop.max_steps=8", "loop.eval_every=0", "loop.batch_size=16",
         "data.eval_prompts=64", "loop.device=cpu"]


def test_least_squares_baseline_is_exact_from_d_examples():
    data = ev.ICLData(dim=4, n_points=8, eval_prompts=50)
    xs, ys, _ = ev.icl_batch(50, data, torch.Generator().manual_seed(0))
    curve = ev.least_squares_curve(xs, ys)
    assert curve[0] == pytest.approx((ys[:, 0].double() ** 2).mean().item() / 4)  # no example: predict 0
    assert torch.all(curve[1:4] > 1e-3) and torch.all(curve[4:] < 1e-12)


def test_presets_and_config_validation():
    assert icl.PRESETS.names() == ["quick"] and icl.DEFAULT_PRESET == "quick"
    cfg = icl.load_config("quick", ["dim=5", "model.variant=aot_mssa"], resume=True)
    assert (cfg.data.dim, cfg.data.n_points, cfg.model.variant, cfg.loop.resume) == (5, 12, "aot_mssa", True)
    with pytest.raises(ConfigError, match=r"2 \* data.n_points = 24 tokens exceeds the model's context "
                                          r"model.n_positions=16"):
        icl.load_config("quick", ["model.n_positions=16"])
    with pytest.raises(ValueError, match="variant"):
        icl.load_config("quick", ["model.variant=not_a_model"])


@pytest.mark.parametrize("variant", ["gpt2", "aot_mssa"])
def test_icl_prediction_never_sees_its_own_label(variant):
    task = icl.ICLTask(icl.load_config("quick", [f"model.variant={variant}", "model.n_embd=32", "model.depth=1",
                                                 "data.eval_prompts=8"]))
    model = task.build_model().eval()
    xs, ys, _ = ev.icl_batch(2, task.data, torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(xs, ys)
        ys2 = ys.clone()
        ys2[:, 7] += 10.0
        moved = model(xs, ys2)
    assert torch.allclose(base[:, :8], moved[:, :8]) and not torch.allclose(base[:, 8:], moved[:, 8:])


def test_icl_recipe_writes_the_error_curve(tmp_path):
    summary = icl.run(icl.load_config("quick", [*SMALL, f"loop.out_dir={tmp_path}", "loop.run_name=icl"]))
    rows = (tmp_path / "icl" / "icl_curve.csv").read_text().splitlines()
    assert rows[0] == "k,gpt2,least_squares,zero" and len(rows) == 1 + 12
    assert (tmp_path / "icl_curves.md").is_file() and (tmp_path / "icl_curves.png").is_file()
    assert "| 3 |" in (tmp_path / "icl" / "icl_curve.md").read_text()
    assert math.isfinite(summary["val_loss"]) and summary["icl_err_kd"] == summary["icl_err_k3"]
    assert summary["icl_err_klast"] == summary["icl_err_k11"] and summary["icl_curves"] == str(tmp_path / "icl_curves.md")
    assert 0 < summary["params_non_embedding"] <= summary["params"] and summary["n_layer"] == 1
    assert json.loads((tmp_path / "icl" / "result.json").read_text())["icl_err_kd"] == summary["icl_err_kd"]


def test_train_and_ablate_icl_through_the_cli(tmp_path, capsys):
    assert cli.main(["train", "icl", "--preset", "quick", *SMALL, f"loop.out_dir={tmp_path / 'one'}",
                     "loop.run_name=run"]) == 0
    assert '"icl_err_kd"' in capsys.readouterr().out and (tmp_path / "one" / "run" / "icl_curve.csv").is_file()
    markdown, runs = cli.ablate("icl", ["gpt2", "aot_mhsa"], out=tmp_path / "ablate", overrides=SMALL)
    assert set(runs) == {"gpt2", "aot_mhsa"} and all(math.isfinite(r["icl_err_kd"]) for r in runs.values())
    header = markdown.splitlines()[0]
    for column in ("val loss (err/d)", "err k=d", "err k=max", "non-emb params"):
        assert column in header
    curves = (tmp_path / "ablate" / "icl_curves.csv").read_text().splitlines()
    assert curves[0] == "k,aot_mhsa,gpt2,least_squares,zero"
