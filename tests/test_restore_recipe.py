"""The restore recipe: metrics, the training task, end-to-end runs, the ablation table and figure."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import unrollattn
from unrollattn.recipes import restore
from unrollattn.cli import ablate
from unrollattn.train import read_metrics
from unrollattn.utils.dist import DistState
from unrollattn.vision.photos import load_photos


def test_metrics_known_values():
    target = torch.full((3, 20, 20), 0.5, dtype=torch.float64)
    target[:, :, 10:] = 0.25
    psnr, ssim = restore.image_metrics(target + 0.01, target, border=0)
    assert psnr == pytest.approx(40.0, abs=1e-9)  # MSE = 1e-4, data range 1
    assert restore.image_metrics(target, target, border=2)[1] == pytest.approx(1.0)
    noisy = target.clone()
    noisy[:, :2] = 1.0  # errors only inside a 2-pixel border
    assert math.isinf(restore.image_metrics(noisy, target, border=2)[0])
    assert restore.image_metrics(noisy, target, border=0)[1] < 0.99
    clipped = restore.image_metrics(target + 5.0, target, border=0)[0]  # outputs are clipped to [0, 1]
    assert clipped == pytest.approx(-10 * math.log10((0.5 ** 2 + 0.75 ** 2) / 2), abs=1e-9)


def test_luma_metrics_follow_the_bt601_formula_and_the_long_presets_follow_the_field():
    torch.manual_seed(0)
    target = torch.rand(3, 24, 24, dtype=torch.float64)
    output = (target + 0.05 * torch.randn_like(target)).clamp(0, 1)
    luma = lambda im: (16 + 65.481 * im[0] + 128.553 * im[1] + 24.966 * im[2]) / 255  # noqa: E731  (Y of 0..1 RGB)
    mse = ((luma(output) - luma(target))[2:-2, 2:-2] ** 2).mean().item()
    psnr, ssim = restore.image_metrics(output, target, border=2, channels="y")
    assert psnr == pytest.approx(-10 * math.log10(mse), abs=1e-6)
    assert psnr > restore.image_metrics(output, target, border=2)[0]  # luma averages the channel errors
    with pytest.raises(ValueError, match="channels='y' needs RGB images, got 1"):
        restore.image_metrics(output[:1], target[:1], channels="y")
    with pytest.raises(ValueError, match="metric_channels: expected one of rgb, y, got 'luma'"):
        restore.load_config("sr2_quick", ["data.metric_channels=luma"])
    demosaic, sr2 = restore.load_config("demosaic").data, restore.load_config("sr2").data
    assert (demosaic.border, demosaic.metric_channels) == (0, "rgb")
    assert (sr2.border, sr2.metric_channels) == (2, "y")


def test_config_validation():
    with pytest.raises(ValueError, match="variant 'malvar' has no task 'sr2'; available: demosaic"):
        restore.load_config("sr2_quick", ["model.variant=malvar"])
    with pytest.raises(ValueError, match="variant"):
        restore.load_config("tiny", ["model.variant=swinir"])
    assert restore.load_config("tiny", ["model.variant=ugtv"]).model.options("demosaic")["iters"] == 1  # admm_iters
    assert restore.model_name("sr2", "transformer") == "swin_sr2"
    assert restore.load_config("tiny", ["model.fidelity=2.0"]).model.options("demosaic")["fidelity"] == 2.0
    assert "fidelity" not in restore.load_config("tiny").model.options("demosaic")  # default: the hard constraint
    # each variant takes the fields its registration declares; the others belong to other variants of an ablation
    ugtv = restore.load_config("tiny", ["model.variant=ugtv", "model.iters=7", "model.admm_iters=2", "model.cg_iters=5",
                                        "model.embed_dim=48"]).model.options("sr2")
    assert (ugtv["iters"], ugtv["cg_iters"]) == (2, 5) and "embed_dim" not in ugtv
    uglr = restore.load_config("tiny", ["model.iters=7", "model.admm_iters=2"]).model.options("demosaic")
    assert uglr["iters"] == 7 and "cg_iters" not in uglr
    swin = restore.load_config("tiny", ["model.variant=transformer", "model.embed_dim=48", "model.blocks=3"])
    assert swin.model.options("sr2")["embed_dim"] == 48 and "blocks" not in swin.model.options("sr2")
    assert restore.load_config("tiny", ["model.variant=bicubic", "model.blocks=3"]).model.options("sr2") == {}


def test_task_batches_are_deterministic_and_loss_decreases(tiny_photos, global_batch):
    cfg = restore.load_config("tiny")
    task = restore.RestoreTask(cfg, photos=tiny_photos)
    state = DistState()
    a, b = task.batch(3, 0, state), task.batch(3, 0, state)
    assert torch.equal(a["x"], b["x"]) and not torch.equal(a["x"], task.batch(4, 0, state)["x"])
    accumulated = restore.RestoreTask(restore.load_config("tiny", ["loop.grad_accum=2"]), photos=tiny_photos)
    for split in (global_batch(task, 3, 2), global_batch(accumulated, 3, 1)):
        assert torch.equal(split["x"], a["x"]) and torch.equal(split["y"], a["y"])  # the same crops on any split
    assert torch.equal(task.operator(a["x"]), a["y"])
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = task.loss(model, a)[0].item()
    for _ in range(30):
        opt.zero_grad()
        task.loss(model, a)[0].backward()
        opt.step()
    assert task.loss(model, a)[0].item() < 0.98 * first  # seeded: 0.0115 -> 0.0111


def test_run_end_to_end_and_ablation(tmp_path):
    summary = restore.run(restore.load_config("tiny", [f"loop.out_dir={tmp_path}", "loop.run_name=uglr"]))
    run_dir = tmp_path / "uglr"
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.csv", "result.json", "curves.png",
                 "restoration_samples.npz"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "checkpoints").glob("step_*/model.safetensors"))
    assert summary["params"] > 0 and summary["steps"] == 6 and "skimage photos" in summary["data"]
    for key in ("psnr", "ssim", "s_per_mp", "psnr_sigma10", "psnr_drop_sigma10"):
        assert math.isfinite(summary[key]), key
    assert summary["psnr_drop_sigma10"] == pytest.approx(summary["psnr"] - summary["psnr_sigma10"])
    rows = read_metrics(run_dir)
    assert any("train_loss" in r for r in rows) and any("psnr" in r for r in rows)
    model, cfg = restore.load_model(run_dir)
    assert cfg.task == "demosaic" and sum(p.numel() for p in model.parameters()) == summary["params"]

    # no-parameter baselines: fit with loop.max_steps=0, evaluated once by the same evaluate(), no checkpoint
    base_cfg = restore.load_config("tiny", [f"loop.out_dir={tmp_path}", "loop.run_name=bicubic", "model.variant=bicubic"])
    base = restore.run(base_cfg)
    assert base["params"] == 0 and base["steps"] == 0 and math.isfinite(base["psnr"]) and base["checkpoint"] is None
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.csv", "result.json"):
        assert (tmp_path / "bicubic" / name).is_file(), name
    assert not (tmp_path / "bicubic" / "checkpoints").exists()
    assert json.loads((tmp_path / "bicubic" / "config.json").read_text())["loop"]["max_steps"] == 0
    assert [r["step"] for r in read_metrics(tmp_path / "bicubic")] == [0]
    result = json.loads((tmp_path / "bicubic" / "result.json").read_text())
    assert result["psnr"] == pytest.approx(base["psnr"]) and result["model"] == "bicubic_demosaic"
    resumed = restore.run(dataclasses.replace(base_cfg, loop=dataclasses.replace(base_cfg.loop, resume=True)))
    assert resumed == result and [r["step"] for r in read_metrics(tmp_path / "bicubic")] == [0]
    with np.load(tmp_path / "bicubic" / "restoration_samples.npz") as z:
        assert z["target"].shape == z["output"].shape == (24, 24, 3)
    assert (tmp_path / "restorations_demosaic_tiny.png").stat().st_size > 0

    # noise analysis: bicubic copies the samples (gain 1 there, up to the noise's sample variance) and
    # averages them elsewhere (gain < 1)
    gain = restore.RestoreTask(restore.load_config("tiny")).noise_gain(unrollattn.build_model("bicubic_demosaic"))
    assert abs(gain["gain_observed"] - 1) < 0.2 and 0 < gain["gain_unobserved"] < 1
    table = restore.noise_gain_table([tmp_path / "uglr", tmp_path / "bicubic"])
    assert "| uglr |" in table and "| bicubic | 0 | " in table


def test_ablation_command_writes_table_and_figure(tmp_path):
    markdown, runs = ablate("restore", ["uglr", "bilinear"], preset="tiny", out=tmp_path / "abl",
                            overrides=["loop.max_steps=2"])
    assert "PSNR dB" in markdown and "| uglr |" in markdown and "| bilinear |" in markdown
    for name in ("comparison.md", "comparison.csv", "comparison.png", "summaries.json", "restorations_demosaic_tiny.png"):
        assert (tmp_path / "abl" / name).is_file(), name
    assert runs["bilinear"]["params"] == 0 and runs["uglr"]["params"] > 0


def test_resume_is_exact(tmp_path):
    common = [f"loop.out_dir={tmp_path}", "loop.max_steps=4", "data.noise_sigmas=[]"]
    full = restore.run(restore.load_config("tiny", common + ["loop.run_name=full"]))
    restore.run(restore.load_config("tiny", common + ["loop.run_name=part", "loop.max_steps=2"]))
    resumed = restore.run(restore.load_config("tiny", common + ["loop.run_name=part"], resume=True))
    assert resumed["start_step"] == 2 and resumed["psnr"] == pytest.approx(full["psnr"], abs=1e-9)


def test_x2_evaluation_of_an_odd_sized_photo_pads_and_crops():
    """An odd eval crop (33x33): the x2 samples need even sizes, so the photo is padded and the output cropped back."""
    photos = load_photos(eval_crop=33, test_names=("chelsea",), train_names=("rocket",))
    cfg = restore.load_config("tiny", ["task=sr2", "model.variant=bicubic", "data.eval_crop=33"])
    task = restore.RestoreTask(cfg, photos=photos)
    y, size = task.observe(photos.test_images()[0])
    assert size == (33, 33) and y.shape[-2:] == (17, 17)
    metrics = task.evaluate(task.build_model(), DistState())
    assert math.isfinite(metrics["psnr"]) and metrics["psnr"] > 20


def test_a_registered_option_without_a_config_field_is_a_clear_error():
    from unrollattn.registry import MODELS, register_model
    from unrollattn.vision.restoration_baselines import Interpolator

    register_model("typo_net_demosaic", family="interpolation", task="restoration", variant="typo_net",
                   size="demosaic", learned=False, config_options={"blokcs": "blocks"})(lambda **o: Interpolator(**o))
    try:
        with pytest.raises(ValueError, match=r"'typo_net_demosaic' declares config_options \['blokcs'\]"):
            restore.load_config("tiny", ["model.variant=typo_net"]).model.options("demosaic")
    finally:
        MODELS.unregister("typo_net_demosaic")
