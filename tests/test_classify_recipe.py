"""The classify recipe: config and overrides, model choice, augmentation, and an end-to-end digits run."""
import json

import pytest
import timm

import unrollattn
import torch

from unrollattn.recipes import classify
from unrollattn.train import ConfigError, read_metrics
from unrollattn.utils.dist import DistState
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
    with pytest.raises(ConfigError, match="variant: expected one of aot_mhsa, aot_mssa, bilateral, crate"):
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
    assert unrollattn.MODELS.meta(classify.timm_name(model_cfg))["variant"] == variant  # resolved by the registry
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


def test_batches_are_deterministic_and_sharded(global_batch):
    cfg = classify.load_config("digits_debug", ["data.augment=true", "data.crop_padding=1", "loop.batch_size=8"])
    task = classify.ClassifyTask(cfg, load_classification_data("digits"))
    one = DistState()
    a, b = task.batch(3, 0, one), task.batch(3, 0, one)
    assert all(torch.equal(a[k], b[k]) for k in ("images", "labels", "shift", "flip"))
    assert not torch.equal(task.batch(4, 0, one)["shift"], a["shift"])
    r0, r1 = (task.batch(3, 0, DistState(rank=r, world_size=2)) for r in (0, 1))
    assert r0["labels"].shape == (4,)
    assert torch.equal(torch.cat([r0["images"], r1["images"]]), a["images"])  # the same global batch, split
    accumulated = classify.ClassifyTask(classify.load_config("digits_debug", [
        "data.augment=true", "data.crop_padding=1", "loop.batch_size=8", "loop.grad_accum=2"]), task.data)
    for split in (global_batch(task, 3, 2), global_batch(accumulated, 3, 2)):  # with the same shifts and flips
        assert all(torch.equal(split[key], a[key]) for key in a)
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
    # digits_debug attacks 128 test images at 8/255 after training: both attacks lower the accuracy
    assert summary["pgd_top1@8/255"] < summary["adv_subset_top1"] and summary["fgsm_top1@8/255"] < summary["adv_subset_top1"]
    robust = json.loads((tmp_path / "vit" / "robustness.json").read_text())
    assert robust["num_images"] == 128 and robust["pgd_top1@8/255"] == summary["pgd_top1@8/255"]
    assert json.loads((tmp_path / "vit" / "result.json").read_text())["pgd_top1@8/255"] == summary["pgd_top1@8/255"]
    assert 0 < summary["final_eval_s"] < summary["wall_s"]  # the ablation's wall time includes the attacks
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
    prep = json.loads((run_dir / "preprocessing.json").read_text())  # a run loads back without its data
    mean, std = task.data.channel_stats()
    assert prep["mean"] == pytest.approx(mean.tolist()) and prep["std"] == pytest.approx(std.tolist())
    data_config = timm.data.resolve_model_data_config(model)  # timm's own view of the run's inputs
    assert data_config["input_size"] == (task.data.in_chans, *task.data.img_size)
    assert data_config["mean"] == pytest.approx(tuple(mean.tolist()))
    with torch.no_grad():
        metrics = task.evaluate(model, DistState())
    assert metrics["top1"] == pytest.approx(summary["top1"])
    subset = task.robust_subset()
    with torch.no_grad():
        clean = (model(task.data.normalize(task.data.test_images[subset])).argmax(-1) == task.data.test_labels[subset])
    assert summary["adv_subset_top1"] == pytest.approx(100.0 * clean.float().mean().item())


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


def test_kernel_short_names_resolve_to_the_kernel_vits():
    assert {"bilateral", "gaussian", "twicing", "mahalanobis"} <= set(classify.available_variants())
    assert classify.available_variants() == classify.VARIANTS
    for short in ("bilateral", "gaussian", "twicing", "mahalanobis"):
        cfg = classify.load_config("digits_debug", [f"model.variant={short}"])
        assert classify.timm_name(cfg.model) == f"vit_{short}_tiny_patch16_224" and cfg.model.label == short
    model = classify.build_classifier(classify.ModelConfig(variant="bilateral", embed_dim=32, depth=2, num_heads=2),
                                      num_classes=7, in_chans=1, img_size=(8, 8))
    assert type(model.blocks[0].attn).__name__ == "BilateralAttention" and model.pos_embed is None
    with pytest.raises(ConfigError, match="expected one of .*bilateral, crate"):
        classify.load_config("digits_debug", ["model.variant=bilaterl"])
    with pytest.raises(ValueError, match="'bilateral' has no size 'huge'; available: base, small, tiny"):
        classify.timm_name(classify.ModelConfig(variant="bilateral", size="huge"))


def test_ablate_accepts_the_short_kernel_names(tmp_path):
    from unrollattn.cli import ablate

    markdown, runs = ablate("classify", ["vit", "bilateral"], preset="digits_debug",
                            overrides=["loop.max_steps=2", "loop.eval_every=0", "data.max_test=40",
                                       "robust.num_images=16", "robust.pgd_steps=1"], out=tmp_path)
    assert runs["bilateral"]["arch"] == "vit_bilateral_tiny_patch16_224"
    header = markdown.splitlines()[0]
    for column in ("top1 %", "subset top1 %", "FGSM 8/255 %", "PGD 8/255 %", "train img/s"):
        assert column in header, column
    with pytest.raises(ValueError, match="unknown variant.*'bilaterl'.*did you mean bilateral"):
        ablate("classify", ["bilaterl"], preset="digits_debug", out=tmp_path / "x")


def test_robust_config_validation_and_columns():
    cfg = classify.load_config("quick")
    assert cfg.robust.eps == pytest.approx((1 / 255, 2 / 255, 4 / 255)) and cfg.robust.num_images == 1000
    assert list(classify.robust_keys(cfg.robust)) == [
        "adv_subset_top1", "fgsm_top1@1/255", "fgsm_top1@2/255", "fgsm_top1@4/255",
        "pgd_top1@1/255", "pgd_top1@2/255", "pgd_top1@4/255"]
    columns = list(classify.ablation_columns_for(cfg).values())
    assert columns.index("val_loss") < columns.index("PGD 2/255 %") < columns.index("train img/s")
    custom = classify.load_config("quick", ["robust.eps=0.01,0.03", "robust.attacks=pgd", "robust.pgd_steps=5"])
    assert list(classify.robust_keys(custom.robust)) == ["adv_subset_top1", "pgd_top1@0.01", "pgd_top1@0.03"]
    for off in ("robust.num_images=0", "robust.eps=()", "robust.attacks=()"):
        disabled = classify.load_config("quick", [off])
        assert not disabled.robust.enabled and classify.robust_keys(disabled.robust) == {}
        assert "PGD 2/255 %" not in classify.ablation_columns_for(disabled).values()
    for bad, match in (("robust.eps=2", r"eps: expected a number in \[0, 1\]"), ("robust.eps=-0.1", "eps"),
                       ("robust.eps=nan", "eps"), ("robust.eps=0.01,0.01", "distinct budgets"),
                       ("robust.attacks=cw", "attacks: expected distinct names from fgsm, pgd"),
                       ("robust.pgd_steps=0", "pgd_steps"), ("robust.num_images=-1", "num_images"),
                       ("robust.pgd_step_size=0", "pgd_step_size")):
        with pytest.raises(ConfigError, match=match):
            classify.load_config("quick", [bad])


def _trained_digits(tmp_path, *overrides):
    cfg = classify.load_config("digits_debug", [f"loop.out_dir={tmp_path}", "loop.run_name=r", "loop.eval_every=0",
                                                "loop.max_steps=30", *overrides])
    summary = classify.run(cfg)
    model, _ = classify.load_model(summary["run_dir"])
    return cfg, summary, model


def test_eps_zero_is_clean_and_sharded_evaluation_adds_up(tmp_path):
    cfg, summary, model = _trained_digits(tmp_path, "robust.eps=0,0.05", "robust.num_images=101")
    assert summary["fgsm_top1@0/255"] == summary["pgd_top1@0/255"] == summary["adv_subset_top1"]
    assert summary["fgsm_top1@0.05"] < summary["adv_subset_top1"]
    # two "ranks" without a process group: each reports its shard; weighted by shard size they give the whole
    fgsm_only = classify.load_config("digits_debug", ["robust.eps=0.05", "robust.attacks=fgsm", "robust.num_images=101"])
    task = classify.ClassifyTask(fgsm_only)
    whole = classify.evaluate_robustness(task, model, DistState())
    shards = [classify.evaluate_robustness(task, model, DistState(rank=r, world_size=2)) for r in (0, 1)]
    sizes = (51, 50)
    for key in ("adv_subset_top1", "fgsm_top1@0.05"):
        assert whole[key] == pytest.approx(sum(s[key] * n for s, n in zip(shards, sizes)) / 101)
    assert whole["fgsm_top1@0.05"] == summary["fgsm_top1@0.05"]


def test_patch_norm_eps_is_a_model_option():
    cfg = classify.load_config("digits_debug", ["model.variant=aot_mhsa", "model.patch_norm_eps=0.01"])
    model = classify.build_classifier(cfg.model, num_classes=10, in_chans=1, img_size=(8, 8))
    assert model.patch_embed.patch_norm.eps == 0.01
    default = classify.build_classifier(classify.load_config("digits_debug", ["model.variant=aot_mhsa"]).model,
                                        num_classes=10, in_chans=1, img_size=(8, 8))
    assert default.patch_embed.patch_norm.eps == 1e-5
    with pytest.raises(ValueError, match="vit_tiny_patch16_224 has no per-patch LayerNorm"):
        classify.build_classifier(classify.load_config("digits_debug", ["model.variant=vit", "model.patch_norm_eps=0.01"])
                                  .model, num_classes=10, in_chans=1, img_size=(8, 8))
    with pytest.raises(ValueError, match="patch_norm_eps: expected a positive float"):
        classify.load_config("digits_debug", ["model.patch_norm_eps=-1"])
