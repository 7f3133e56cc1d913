"""The command line every recipe shares (recipe_main): --help contents, Ctrl-C with its resume command."""
import dataclasses
import shlex

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unrollattn.registry import Registry
from unrollattn.train import LoopConfig, OptimConfig, fit, latest_checkpoint, read_metrics, recipe_main
from unrollattn.train.entry import INTERRUPTED_EXIT

VARIANTS = ("small", "wide")  # read by recipe_main's --help like a recipe module's VARIANTS
VARIANT_KEY = "model.variant"


@dataclasses.dataclass
class ToyModel:
    variant: str = "small"
    width: int = 8


@dataclasses.dataclass
class ToyConfig:
    model: ToyModel = dataclasses.field(default_factory=ToyModel)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    interrupt_at: int = -1


PRESETS = Registry("toy preset")


@PRESETS.register("tiny")
def tiny() -> ToyConfig:
    """Seconds: a linear model on random points. Second sentence is not shown."""
    return ToyConfig(loop=LoopConfig(max_steps=6, batch_size=8, eval_every=0, log_every=1, device="cpu", progress=False),
                     optim=OptimConfig(lr=0.05, warmup_steps=0))


class ToyTask:
    def __init__(self, cfg):
        self.cfg = cfg
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g)

    def build_model(self):
        return nn.Linear(4, 2)

    def batch(self, step, micro, state):
        if step == self.cfg.interrupt_at and not self.cfg.loop.resume:
            raise KeyboardInterrupt  # what Ctrl-C raises in the middle of a step
        idx = torch.arange(step * 8, step * 8 + 8) % 64
        return self.x[idx], self.y[idx]

    def loss(self, model, batch):
        return F.cross_entropy(model(batch[0]), batch[1]), {}

    def evaluate(self, model, state):
        return {"val_loss": F.cross_entropy(model(self.x), self.y).item()}


def load_config(preset, overrides, *, resume=False):
    from unrollattn.train import apply_overrides

    cfg = apply_overrides(PRESETS.get(preset)(), list(overrides))
    return apply_overrides(cfg, ["loop.resume=true"]) if resume else cfg


def run(cfg):
    return fit(ToyTask(cfg), cfg.loop, cfg.optim, run_name_prefix="toy", config_for_log=cfg)


def _main(argv):
    return recipe_main(argv, prog="python -m unrollattn.recipes.toy", description="toy recipe", presets=PRESETS,
                       default_preset="tiny", load_config=load_config, run=run)


def test_help_lists_presets_variants_and_every_config_key(capsys):
    with pytest.raises(SystemExit) as stop:
        _main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "tiny  Seconds: a linear model on random points." in out and "Second sentence" not in out
    assert "variants (set one with model.variant=NAME" in out and "small, wide" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert lines["loop.max_steps"][:4] == ["loop.max_steps", "int", "100", "tiny:"] and lines["loop.max_steps"][4] == "6"
    assert lines["optim.lr"][:3] == ["optim.lr", "float", "0.001"]
    assert lines["model.width"] == ["model.width", "int", "8"]  # the preset keeps the default: nothing more shown
    assert "  tuple[float, float]  (0.9, 0.999)" in out
    assert "keys that may change on resume: loop.ckpt_every" in out


def test_ctrl_c_prints_one_line_with_the_exact_resume_command(tmp_path, capsys):
    argv = ["--preset", "tiny", f"loop.out_dir={tmp_path}", "interrupt_at=3", "optim.lr=0.1"]
    assert _main(argv) == INTERRUPTED_EXIT == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("interrupted at step 3; resume with: unrollattn train toy --preset tiny --resume ")
    command = shlex.split(err.split("resume with: ", 1)[1])
    (run_dir,) = tmp_path.iterdir()
    assert command[-1] == f"loop.run_name={run_dir.name}" and latest_checkpoint(run_dir).name == "step_00000003"

    assert _main(command[3:]) == 0  # the printed command, as typed after `unrollattn train toy`
    assert [r["step"] for r in read_metrics(run_dir) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_command_under_torchrun(monkeypatch):
    from unrollattn.train.entry import resume_command

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command("python -m unrollattn.recipes.lm", "quick", ["optim.lr=3e-4", "data.text=a b"], "lm-run") == (
        "torchrun --standalone --nproc_per_node=2 -m unrollattn.recipes.lm --preset quick --resume optim.lr=3e-4 'data.text=a b' "
        "loop.run_name=lm-run")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resume_command("python -m unrollattn.recipes.lm", "quick", ["run_name=mine"], "mine") == (
        "unrollattn train lm --preset quick --resume run_name=mine")


main = _main  # what `unrollattn train <name>` calls on a registered recipe module


def test_a_recipe_of_your_own_runs_by_name_through_the_registry(tmp_path):
    import importlib.util

    from unrollattn import cli
    from unrollattn.registry import RECIPES, register_recipe

    assert {"classify", "lm", "restore"} <= set(cli.list_recipes())  # the package's own entry points
    assert importlib.util.find_spec("recipes") is None  # no top-level package named `recipes` is installed
    register_recipe("toy", __name__)
    try:
        assert "toy" in cli.list_recipes()
        assert cli.main(["train", "toy", "--preset", "tiny", f"loop.out_dir={tmp_path}"]) == 0
    finally:
        RECIPES.unregister("toy")
    assert "toy" not in cli.list_recipes()
    register_recipe("broken", "no_such_package.recipe")
    try:
        with pytest.raises(ValueError, match="recipe 'broken' is registered as module 'no_such_package.recipe'"):
            cli.import_recipe("broken")
    finally:
        RECIPES.unregister("broken")
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "result.json").is_file()
