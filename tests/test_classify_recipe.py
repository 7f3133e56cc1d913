"""The classify recipe: config and overrides, model choice, augmentation, and an end-to-end digits run."""
import json

import pytest
import torch

from recipes import classify
from unrollattn.train import ConfigError, DistState, read_metrics
from unrollattn.vision.datasets import load_classification_data


def test_presets_build_and_validate():
    assert {"quick", "digits_debug", "fmnist_tiny", "fmnist_small"} <= set(classify.PRESETS.names())
    for name in classify.PRESETS.names():
        cfg = classify.PRESETS.get(name)()
        assert cfg.preset == name and cfg.model.variant in classify.VARIANTS
    tiny = classify.load_config("fmnist_tiny")
    assert tiny.loop.max_steps == 30 * 235 and tiny.data.augment and tiny.loop.precision == "bf16"


def test_overrides_coerce_and_reject():
    cfg = classify.load_config("digits_debug", ["model.variant=crate", "optim.lr=1e-3", "max_steps=7",
                                                "data.max_train=none"], resume=True)
    assert (cfg.model.variant, cfg.optim.lr, cfg.loop.max_steps, cfg.data.max_train, cfg.loop.resume) == \
        ("crate", 1e-3, 7, None, True)
    with pytest.raises(ConfigError, match="did you mean 'model.depth'"):
        classify.load_config("digits_debug", ["model.dept=3"])
    with pytest.raises(ConfigError, match="variant: expected one of vit, aot_mssa, aot_mhsa, crate"):
        classify.load_config("digits_debug", ["model.variant=resnet"])
    with pytest.raises(ConfigError, match="model.embed_dim"):
        classify.load_config("digits_debug", ["model.embed_dim=abc"])
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        classify.load_config("digits_debug", ["model.embed_dim=30", "model.num_heads=4"])
    with pytest.raises(KeyError, match="closest: quick"):
        classify.load_config("quik")


@pytest.mark.parametrize("variant", classify.VARIANTS)
def test_each_variant_builds_the_requested_backbone(variant):
    model_cfg = classify.ModelConfig(variant=variant, embed_dim=32, depth=2, num_heads=2, patch_size=4)
    model = classify.build_classifier(model_cfg, num_classes=7, in_chans=1, img_size=(8, 8))
    assert classify.timm_name(model_cfg) == f"{variant}_tiny_patch16_224"
    assert len(model.blocks) == 2 and model.embed_dim == 32
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 7)


def test_model_config_errors():
    with pytest.raises(ValueError, match="no size 'huge'; available: base, small, tiny"):
        classify.timm_name(classify.ModelConfig(variant="aot_mssa", size="huge"))
    with pytest.raises(ValueError, match="not a timm model name"):
        classify.timm_name(classify.ModelConfig(arch="no_such_net"))
    with pytest.raises(ValueError, match="not divisible by model.patch_size=3"):
        classify.build_classifier(classify.ModelConfig(patch_size=3), num_classes=2, in_chans=1, img_size=(8, 8))


def test_random_translate_flip_matches_padded_crop():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    shift = torch.tensor([[1, -2], [0, 0]])
    out = classify.random_translate_flip(images, shift, torch.tensor([False, True]))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    assert torch.equal(out[0], padded[0, :, 3:8, 0:5])  # crop offset = padding + shift
    assert torch.equal(out[1], images[1].flip(-1))
    with pytest.raises(ValueError, match=r"shift \[B, 2\]"):
        classify.random_translate_flip(images, torch.zeros(2, 3, dtype=torch.long))


def test_batches_are_deterministic_and_sharded():
    cfg = classify.load_config("digits_debug", ["data.augment=true", "data.crop_padding=1", "loop.batch_size=8"])
    task = classify.ClassifyTask(cfg, load_classification_data("digits"))
    one = DistState()
    a, b = task.batch(3, 0, one), task.batch(3, 0, one)
    assert all(torch.equal(a[k], b[k]) for k in ("images", "labels", "shift", "flip"))
    assert not torch.equal(task.batch(4, 0, one)["shift"], a["shift"])
    r0, r1 = (task.batch(3, 0, DistState(rank=r, world_size=2)) for r in (0, 1))
    assert r0["labels"].shape == (4,)
    assert torch.equal(torch.cat([r0["images"], r1["images"]]), a["images"])  # the same global batch, split
    assert int(a["shift"].abs().max()) <= 1
    x = task.inputs(a)
    assert x.dtype == torch.float32 and x.shape == (8, 1, 8, 8)


def test_digits_debug_end_to_end(tmp_path):
    cfg = classify.load_config("digits_debug", [f"loop.out_dir={tmp_path}", "loop.run_name=vit", "loop.device=cpu"])
    summary = classify.run(cfg)
    for key in ("variant", "arch", "params", "top1", "val_loss", "train_loss", "train_items_per_s", "peak_mem_mb",
                "steps", "run_dir", "wall_s"):
        assert key in summary, key
    assert summary["steps"] == 20 and summary["variant"] == "vit"
    assert summary["top1"] > 30  # chance is 10 %
    run_dir = tmp_path / "vit"
    assert summary["run_dir"] == str(run_dir)
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.csv"):
        assert (run_dir / name).is_file(), name
    assert len(list(run_dir.glob("checkpoints/step_*/model.safetensors"))) == 1
    losses = [r["train_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.3
    assert json.loads((run_dir / "config.json").read_text())["model"]["variant"] == "vit"

    model, loaded_cfg = classify.load_model(run_dir)  # rebuilt from config.json + the last checkpoint
    assert loaded_cfg == cfg and not model.training
    task = classify.ClassifyTask(cfg)
    with torch.no_grad():
        metrics = task.evaluate(model, DistState())
    assert metrics["top1"] == pytest.approx(summary["top1"])


def test_main_prints_summary_and_rejects_bad_input(tmp_path, capsys):
    assert classify.main(["--preset", "digits_debug", f"loop.out_dir={tmp_path}", "loop.max_steps=3",
                          "loop.eval_every=0", "model.variant=aot_mssa", "data.max_test=50"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["variant"] == "aot_mssa" and summary["steps"] == 3
    with pytest.raises(ConfigError, match="expected the form key=value"):
        classify.main(["--preset", "digits_debug", "max_steps"])


def test_resume_continues_the_named_run(tmp_path):
    base = [f"loop.out_dir={tmp_path}", "loop.run_name=r", "loop.eval_every=0", "data.max_test=64"]
    first = classify.run(classify.load_config("digits_debug", [*base, "loop.max_steps=3"]))
    second = classify.run(classify.load_config("digits_debug", [*base, "loop.max_steps=5"], resume=True))
    assert (first["steps"], second["start_step"], second["steps"]) == (3, 3, 5)
    assert second["run_dir"] == first["run_dir"]
