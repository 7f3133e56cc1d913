"""The ``unrollattn`` command: list, train, ablate, diagnose, and its error handling."""
import csv
import json

import pytest

from unrollattn import cli


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_models_with_parameter_counts(capsys):
    code, out, _ = run_cli(capsys, "list", "crate_tiny", "--kind", "models")
    assert code == 0
    line = next(l for l in out.splitlines() if "crate_tiny_patch16_224" in l)
    assert "6.09M" in line  # the published CRATE-T size
    assert cli.model_params("aot_mssa_tiny_patch16_224") > 0


def test_list_attentions_and_blocks(capsys):
    code, out, _ = run_cli(capsys, "list", "--kind", "attentions")
    assert code == 0 and "mssa" in out and "mhsa" in out and "models:" not in out
    code, out, _ = run_cli(capsys, "list", "aot")
    assert code == 0 and "blocks:" in out and "aot_mssa_tiny_patch16_224" in out


def test_list_says_how_each_attention_decodes(capsys):
    code, out, _ = run_cli(capsys, "list", "--kind", "attentions")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    for name in ("mhsa", "mssa", "gaussian", "mahalanobis", "bilateral"):
        assert "decode: O(T d)/token" in rows[name], rows[name]
    for name in ("twicing", "glr", "gtv"):
        assert "decode: recomputes" in rows[name], rows[name]
    code, out, _ = run_cli(capsys, "list", "--kind", "blocks")
    assert "decode: recomputes" in next(line for line in out.splitlines() if line.split()[0] == "boost")


def test_list_without_match_exits_2(capsys):
    code, _, err = run_cli(capsys, "list", "zzz_no_such_thing")
    assert code == 2 and "error: no models or attentions or blocks match 'zzz_no_such_thing'" in err


def test_train_runs_the_recipe(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "classify", "--preset", "digits_debug", f"loop.out_dir={tmp_path}",
                           "loop.run_name=r", "loop.max_steps=4", "loop.eval_every=0", "data.max_test=64")
    assert code == 0
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 4 and (tmp_path / "r" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("argv, message", [
    (("train", "clasify", "--preset", "quick"), "unknown recipe 'clasify'; closest: classify"),
    (("train", "classify", "--preset", "quik"), "unknown classify preset 'quik'; closest: quick"),
    (("train", "classify", "--preset", "digits_debug", "optim.lrr=1"), "did you mean 'optim.lr'"),
    (("ablate", "classify", "--variants", "vit,crte", "--preset", "digits_debug"),
     "unknown variant(s) 'crte' for recipe 'classify'; did you mean crate? variants: aot_mhsa, aot_mssa, bilateral, crate"),
    (("ablate", "classify", "--variants", "vit", "--preset", "digits_debug", "model.variant=crate"),
     "ablate sets"),
    (("diagnose", "snrr"), "unknown diagnostic 'snrr'; closest: snr"),
])
def test_bad_names_exit_2_with_a_helpful_message(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_ablate_two_variants_writes_comparison(tmp_path, capsys):
    out_dir = tmp_path / "abl"
    code, out, _ = run_cli(capsys, "ablate", "classify", "--variants", "vit,aot_mssa", "--preset", "digits_debug",
                           "--out", str(out_dir), "loop.max_steps=3", "loop.eval_every=0", "data.max_test=100")
    assert code == 0
    for name in ("comparison.md", "comparison.csv", "comparison.png", "summaries.json"):
        assert (out_dir / name).is_file(), name
    assert (out_dir / "vit" / "config.json").is_file() and (out_dir / "aot_mssa" / "config.json").is_file()
    rows = list(csv.DictReader((out_dir / "comparison.csv").open()))
    assert [r["variant"] for r in rows] == ["vit", "aot_mssa"]
    assert {"params", "top1 %", "val_loss", "train img/s", "peak mem MB", "wall s"} <= set(rows[0])
    assert all(0 <= float(r["top1 %"]) <= 100 and int(r["params"]) > 0 for r in rows)
    assert "| variant | params | block params | reference blocks | depth | top1 % |" in out
    assert all(float(r["peak mem MB"]) > 0 for r in rows)
    config = json.loads((out_dir / "aot_mssa" / "config.json").read_text())
    assert config["model"]["variant"] == "aot_mssa" and config["loop"]["max_steps"] == 3


def test_budgets_compares_ablations_that_differ_in_budget(tmp_path, capsys):
    dirs = []
    for steps in (2, 4):
        dirs.append(str(tmp_path / f"steps{steps}"))
        assert run_cli(capsys, "ablate", "classify", "--variants", "vit,aot_mssa", "--preset", "digits_debug", "--out",
                       dirs[-1], f"loop.max_steps={steps}", "loop.eval_every=0", "data.max_test=32",
                       "robust.num_images=0")[0] == 0
    code, out, _ = run_cli(capsys, "budgets", *dirs, "--reference", "vit", "--metric", "top1", "--x", "steps",
                           "--out", str(tmp_path / "gaps"))
    assert code == 0 and "gap per doubling" in out
    rows = list(csv.DictReader((tmp_path / "gaps" / "gaps.csv").open()))
    assert [(r["variant"], r["steps"]) for r in rows] == [("vit", "2"), ("vit", "4"), ("aot_mssa", "2"), ("aot_mssa", "4")]
    for row in rows[2:]:
        vit = next(r for r in rows if r["variant"] == "vit" and r["steps"] == row["steps"])
        assert float(row["gap"]) == pytest.approx(float(row["top1"]) - float(vit["top1"]))
    assert (tmp_path / "gaps" / "gaps.png").is_file()
    code, _, err = run_cli(capsys, "budgets", *dirs, "--reference", "gpt2", "--out", str(tmp_path / "gaps"))
    assert code == 2 and "no finished run of the reference 'gpt2'" in err


def test_seeds_split_over_two_ablations_pool_in_budgets(tmp_path, capsys):
    """--seeds 2 next to loop.seed=2 --seeds 1, and the reference's runs in a directory of their own: budgets pools
    them as three seeds at one budget, each summary records its seed, and a seed held twice is refused."""
    common = ("--preset", "digits_debug", "loop.max_steps=2", "loop.eval_every=0", "data.max_test=32",
              "robust.num_images=0")
    first, second, ref = (str(tmp_path / name) for name in ("s01", "s2", "ref"))
    assert run_cli(capsys, "ablate", "classify", "--variants", "aot_mssa", "--seeds", "2", "--out", first, *common)[0] == 0
    assert run_cli(capsys, "ablate", "classify", "--variants", "aot_mssa", "--out", second, "loop.seed=2", *common)[0] == 0
    assert run_cli(capsys, "ablate", "classify", "--variants", "vit", "--seeds", "3", "--out", ref, *common)[0] == 0
    summaries = json.loads((tmp_path / "s01" / "summaries.json").read_text())
    assert {name: s["seed"] for name, s in summaries.items()} == {"aot_mssa-seed0": 0, "aot_mssa-seed1": 1}
    assert json.loads((tmp_path / "s01" / "aot_mssa-seed1" / "config.json").read_text())["loop"]["seed"] == 1
    assert json.loads((tmp_path / "s2" / "summaries.json").read_text())["aot_mssa"]["seed"] == 2
    code, out, err = run_cli(capsys, "budgets", first, second, ref, "--reference", "vit", "--metric", "top1", "--x",
                             "steps", "--out", str(tmp_path / "gaps"))
    assert code == 0, err
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "gaps" / "gaps.csv").open())}
    assert rows["aot_mssa"]["seeds"] == "3" and rows["vit"]["seeds"] == "3"
    code, _, err = run_cli(capsys, "budgets", first, first, ref, "--reference", "vit", "--metric", "top1", "--x",
                           "steps", "--out", str(tmp_path / "gaps2"))
    assert code == 2 and "both hold aot_mssa at steps=2 (seeds ['0', '1'] and ['0', '1'])" in err


def test_the_same_ablation_resumes_another_gets_a_new_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("ablate", "classify", "--variants", "vit", "--preset", "digits_debug", "loop.max_steps=2",
            "loop.eval_every=0", "data.max_test=32", "robust.num_images=0")
    first_dir = tmp_path / "runs" / "ablate-classify-digits_debug"
    assert run_cli(capsys, *args)[0] == 0
    first = (first_dir / "comparison.csv").read_text()
    code, out, _ = run_cli(capsys, *args)  # the same command: the finished run is read back, not retrained
    assert code == 0 and "vit finished earlier" in out and (first_dir / "comparison.csv").read_text() == first
    assert not (tmp_path / "runs" / "ablate-classify-digits_debug-2").exists()
    assert run_cli(capsys, *args, "optim.lr=1e-3")[0] == 0  # another ablation: never mixed into the first
    assert (tmp_path / "runs" / "ablate-classify-digits_debug-2" / "comparison.md").is_file()


def test_diagnose_delegates_to_the_snr_module(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "diagnose", "snr", "--layers", "2", "--deltas", "0.5", "--out", str(tmp_path))
    assert code == 0 and (tmp_path / "snr.md").is_file() and "snr.md" in out
    code, _, err = run_cli(capsys, "diagnose", "snr", "--deltas", "x")
    assert code == 2 and "error: --deltas: expected comma-separated numbers" in err


def test_ablate_keeps_other_variants_when_one_fails(tmp_path, capsys, monkeypatch):
    from unrollattn.recipes import classify

    real_run = classify.run

    def run_or_diverge(cfg):
        if cfg.model.variant == "aot_mssa":
            raise FloatingPointError("training loss is nan at step 2")
        return real_run(cfg)

    monkeypatch.setattr(classify, "run", run_or_diverge)
    out_dir = tmp_path / "abl"
    code, out, err = run_cli(capsys, "ablate", "classify", "--variants", "aot_mssa,vit", "--preset", "digits_debug",
                             "--out", str(out_dir), "loop.max_steps=2", "loop.eval_every=0", "data.max_test=32")
    assert code == 1
    assert "variant aot_mssa failed: FloatingPointError: training loss is nan" in err
    rows = {r["variant"]: r for r in csv.DictReader((out_dir / "comparison.csv").open())}
    assert rows["aot_mssa"]["top1 %"] == "" and float(rows["vit"]["top1 %"]) >= 0
    assert "error" in json.loads((out_dir / "summaries.json").read_text())["aot_mssa"]


# ----------------------------------------------------------------------------------------------- start-up and help

HEAVY = ("torch", "timm", "transformers")


def _command(tmp_path, *argv, via="script"):
    """Run the command in a fresh interpreter, as pip's console script (a file named ``unrollattn`` doing
    ``from unrollattn.cli import main``) or as ``python -m unrollattn.cli``, with ``-X importtime``."""
    import os
    import subprocess
    import sys

    if via == "script":
        script = tmp_path / "unrollattn"
        script.write_text("import sys\nfrom unrollattn.cli import main\nsys.exit(main())\n")
        cmd = [sys.executable, "-X", "importtime", str(script), *argv]
    else:
        cmd = [sys.executable, "-X", "importtime", "-m", "unrollattn.cli", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    errors = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("import time:"))
    return done.returncode, done.stdout, errors, imported


@pytest.mark.parametrize("via", ["script", "module"])
def test_help_does_not_import_torch_timm_or_transformers(tmp_path, via):
    for argv in (("--help",), ("ablate", "--help"), ("train", "--help"), ("list", "--help")):
        code, out, err, imported = _command(tmp_path, *argv, via=via)
        assert code == 0 and out.startswith("usage: unrollattn"), (argv, err)
        assert "unrollattn" in imported and not imported & set(HEAVY), (argv, sorted(imported & set(HEAVY)))
    code, out, _, _ = _command(tmp_path, "ablate", "--help", via=via)
    assert "recipe" in out and "classify, icl, lm, restore" in out and "unrollattn ablate <recipe> --help" in out


def test_a_subcommand_of_the_command_registers_everything(tmp_path):
    code, out, err, imported = _command(tmp_path, "list", "aot_mssa_tiny", "--kind", "models")
    assert code == 0, err
    assert "aot_mssa_tiny_patch16_224" in out and {"torch", "timm"} <= imported


def test_importing_the_package_registers_timm_and_hf_names():
    import subprocess
    import sys

    script = ("import unrollattn, timm\n"
              "from transformers import AutoConfig\n"
              "assert timm.is_model('aot_mssa_tiny_patch16_224')\n"
              "assert type(AutoConfig.for_model('unrollattn')).__name__ == 'UnrollAttnConfig'\n"
              "assert unrollattn.build_attention and unrollattn.set_finite_checks and 'aot_mssa_lm_tiny' in unrollattn.MODELS\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_ablate_help_shows_the_recipes_own_variants_and_presets(capsys):
    from unrollattn.recipes import classify, lm

    with pytest.raises(SystemExit) as exit_:
        cli.main(["ablate", "lm", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert f"from: {', '.join(lm.VARIANTS)}" in " ".join(out.split())
    assert "vit" not in out.split("options:")[1] and "default: quick" in " ".join(out.split()) and "gpt2_scale" in out
    assert f"unrollattn ablate lm --variants {','.join(lm.VARIANTS[:4])} --preset quick" in out
    assert "--attention mhsa,mssa,bilateral --block transformer,aot" in out
    with pytest.raises(SystemExit):
        cli.main(["ablate", "--preset", "digits_debug", "classify", "-h"])  # the recipe after options
    out = " ".join(capsys.readouterr().out.split())
    assert f"from: {', '.join(classify.VARIANTS)}" in out and "bilateral" in out and "digits_debug" in out
    with pytest.raises(SystemExit):
        cli.main(["ablate", "restore", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "uglr" in out and "demosaic_quick" in out and "(default: demosaic_quick)" in out


def test_ctrl_c_during_an_ablation_prints_the_resume_command(monkeypatch, tmp_path, capsys):
    from unrollattn.recipes import lm

    def run(cfg):
        if cfg.model.variant == "aot_mssa":
            raise KeyboardInterrupt
        return {"variant": cfg.model.variant, "run_dir": str(tmp_path / "abl" / cfg.model.variant)}

    monkeypatch.setattr(lm, "run", run)
    code, _, err = run_cli(capsys, "ablate", "lm", "--variants", "gpt2,aot_mssa", "--out", str(tmp_path / "abl"),
                           "loop.max_steps=3")
    assert code == 130
    (line,) = err.strip().splitlines()  # one line, no traceback
    assert line == (f"interrupted during variant aot_mssa; resume the ablation with: unrollattn ablate lm "
                    f"--variants=gpt2,aot_mssa --preset quick --out {tmp_path / 'abl'} loop.max_steps=3")


def test_ablate_without_preset_runs_the_recipes_default_or_names_the_presets(monkeypatch, tmp_path):
    from unrollattn.recipes import lm, restore

    assert cli.default_preset(lm) == lm.DEFAULT_PRESET == "quick"
    seen = []
    monkeypatch.setattr(lm, "run", lambda cfg: seen.append(cfg.preset) or {"variant": cfg.model.variant,
                                                                            "run_dir": cfg.loop.out_dir})
    cli.ablate("lm", ["gpt2"], out=tmp_path / "abl")
    assert seen == ["quick"]
    assert cli.default_preset(restore) == restore.DEFAULT_PRESET == "demosaic_quick"
    import types

    from unrollattn.registry import Registry

    presets = Registry("preset")
    for name in ("big", "small"):
        presets.register(name, lambda: None)
    no_default = types.ModuleType("unrollattn.recipes.mine")
    no_default.PRESETS = presets
    with pytest.raises(ValueError, match="recipe 'mine' has no default preset; choose one with --preset: big, small"):
        cli.default_preset(no_default)


# ----------------------------------------------------------------------------------------------- README snippets
# The commands and code of the README sections on your own data and on loading runs back, run as written; the tests
# only append budget overrides (a step or two, no adversarial evaluation) and replace the example paths.

FAST_CLASSIFY = ("loop.max_steps=2", "loop.batch_size=8", "robust.num_images=0", "loop.progress=false")


def _image_folder(root, size=20, per_class=6):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (size, size + 2 * i, 3)) + 120 * c  # sizes differ: img_size resizes
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_readme_own_images_then_loading_the_run_back(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "my_images")
    argv = "train classify --preset quick data.source=folder:my_images data.img_size=32 model.variant=crate".split()
    code, out, err = run_cli(capsys, *argv, *FAST_CLASSIFY, "loop.run_name=my-run")
    assert code == 0, err
    assert json.loads(out[out.index("{"):])["data"].startswith("folder:my_images: 10 train / 2 test, 2 classes, 3x32x32")
    argv = ("ablate classify --variants vit,aot_mssa,aot_mhsa,crate --preset quick data.source=folder:my_images "
            "data.img_size=32").split()
    code, out, err = run_cli(capsys, *argv, *FAST_CLASSIFY)
    assert code == 0, err
    assert (tmp_path / "runs" / "ablate-classify-quick" / "comparison.md").is_file()

    import torch
    from unrollattn.recipes import classify

    run = "runs/my-run"                                 # a classify run directory
    model, cfg = classify.load_model(run)               # config.json + the latest model.safetensors, in eval mode
    data = classify.ClassifyTask(cfg).data              # the run's data again: classes, image size, mean / std
    images = data.test_images[:8]                       # uint8 [B, C, H, W]
    with torch.no_grad():
        predicted = model(data.normalize(images)).argmax(-1)
    print([data.class_names[i] for i in predicted])

    assert set(capsys.readouterr().out.strip()[1:-1].replace("'", "").split(", ")) <= {"cat", "dog"}
    mean, std = data.channel_stats()
    x = images.float() / 255
    torch.testing.assert_close(data.normalize(images), (x - mean[:, None, None]) / std[:, None, None])
    torch.testing.assert_close(data.normalize(x), data.normalize(images))  # floats are taken as [0, 1]
    trained = classify.ClassifyTask(cfg).build_model()
    from safetensors.torch import load_file

    weights = sorted((tmp_path / run / "checkpoints").glob("step_*/model.safetensors"))[-1]
    trained.load_state_dict(load_file(weights))
    for key, value in trained.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key

    import timm
    from PIL import Image

    model, cfg = classify.load_model("runs/my-run")      # without the data: preprocessing.json has size, mean, std
    data_config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**data_config)  # PIL image -> resized, normalised tensor [C, H, W]
    image = Image.open("my_images/cat/0.png").convert("RGB")
    with torch.no_grad():
        label = model(transform(image)[None]).argmax(-1)

    assert data_config["input_size"] == (3, 32, 32) and transform(image).shape == (3, 32, 32) and label.shape == (1,)
    assert data_config["mean"] == pytest.approx(tuple(mean.tolist()))
    assert data_config["std"] == pytest.approx(tuple(std.tolist()))


def test_readme_loading_a_restoration_run_back(tmp_path, monkeypatch):
    from unrollattn.recipes import restore as restore_recipe

    monkeypatch.chdir(tmp_path)
    restore_recipe.run(restore_recipe.load_config("tiny", ["loop.run_name=my-restore-run", "loop.max_steps=2",
                                                           "loop.device=cpu"]))

    import torch
    from unrollattn.recipes import restore
    from unrollattn.vision.sampling import build_operator

    model, cfg = restore.load_model("runs/my-restore-run")
    x = torch.rand(1, 3, 64, 64)                        # an RGB image in [0, 1], even height and width
    y = build_operator(cfg.task)(x)                     # what the model sees: the Bayer mosaic or the x2 grid
    with torch.no_grad():
        restored = model(y).clamp(0, 1)                 # [1, 3, 64, 64]

    assert restored.shape == (1, 3, 64, 64) and cfg.task == "demosaic" and not model.training
