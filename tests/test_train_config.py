"""Typed configs: key=value overrides, coercion, rejection of unknown keys / bad values, dict round-trip."""
import argparse
import dataclasses
import json
from typing import Optional

import pytest

from unrollattn.registry import Registry, UnknownNameError
from unrollattn.train import (
    ConfigError, LoopConfig, OptimConfig, add_config_arguments, apply_overrides, config_from_dict, config_to_dict,
    load_preset,
)


@dataclasses.dataclass
class ModelSection:
    depth: int = 2
    dropout: Optional[float] = None
    attention: str = "mssa"
    widths: list[int] = dataclasses.field(default_factory=lambda: [32, 64])


@dataclasses.dataclass
class RecipeConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    tag: str = "base"


def test_coercion_from_field_types():
    cfg = RecipeConfig()
    new = apply_overrides(cfg, [
        "optim.lr=3e-4", "optim.betas=(0.9, 0.95)", "optim.warmup_steps=10", "loop.compile=yes",
        "loop.progress=0", "loop.max_steps=1e3", "model.dropout=0.1", "model.widths=[8,16,24]", "tag=ablation",
    ])
    assert new.optim.lr == 3e-4 and isinstance(new.optim.lr, float)
    assert new.optim.betas == (0.9, 0.95) and isinstance(new.optim.betas, tuple)
    assert new.optim.warmup_steps == 10 and isinstance(new.optim.warmup_steps, int)
    assert new.loop.compile is True and new.loop.progress is False
    assert new.loop.max_steps == 1000 and isinstance(new.loop.max_steps, int)
    assert new.model.dropout == 0.1 and new.model.widths == [8, 16, 24]
    assert new.tag == "ablation"
    assert apply_overrides(new, ["model.dropout=none"]).model.dropout is None
    assert apply_overrides(cfg, ["optim.betas=0.8,0.9"]).optim.betas == (0.8, 0.9)
    assert apply_overrides(cfg, ["optim.lr=1"]).optim.lr == 1.0  # an int literal is a fine float


def test_overrides_return_new_config_and_leave_input_alone():
    cfg = RecipeConfig()
    before = config_to_dict(cfg)
    new = apply_overrides(cfg, {"optim": {"lr": 0.5}, "loop.seed": "7", "model.depth": 4})
    assert config_to_dict(cfg) == before
    assert new is not cfg and new.optim is not cfg.optim
    assert (new.optim.lr, new.loop.seed, new.model.depth) == (0.5, 7, 4)


def test_bare_key_resolves_to_the_unique_nested_field():
    cfg = apply_overrides(RecipeConfig(), ["max_steps=20", "device=cpu"])
    assert cfg.loop.max_steps == 20 and cfg.loop.device == "cpu"


def test_overrides_on_a_section_directly():
    loop = apply_overrides(LoopConfig(), ["batch_size=6", "grad_accum=3"])
    assert (loop.batch_size, loop.grad_accum) == (6, 3)
    # cross-field checks see the final values, so override order does not matter
    assert apply_overrides(LoopConfig(), ["grad_accum=3", "batch_size=6"]) == loop


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(RecipeConfig(), ["optim.lrr=0.1"])
    message = str(err.value)
    assert "optim.lrr" in message and "did you mean 'optim.lr'" in message
    for key in ("weight_decay", "betas", "warmup_steps", "grad_clip"):
        assert key in message
    with pytest.raises(ConfigError, match="valid keys of RecipeConfig: model, optim, loop, tag"):
        apply_overrides(RecipeConfig(), ["nonsense=1"])
    with pytest.raises(ConfigError, match="section"):
        apply_overrides(RecipeConfig(), ["optim=3"])
    assert issubclass(ConfigError, ValueError)


def test_mistyped_values_are_rejected_naming_key_type_and_value():
    cases = {
        "optim.lr=fast": ("optim.lr", "float", "fast"),
        "loop.max_steps=2.5": ("loop.max_steps", "int", "2.5"),
        "loop.compile=maybe": ("loop.compile", "bool", "maybe"),
        "optim.betas=(0.9,)": ("optim.betas", "tuple", "(0.9,)"),
        "model.widths=[1,'a']": ("model.widths", "int", "a"),
    }
    for override, (key, type_name, value) in cases.items():
        with pytest.raises(ConfigError) as err:
            apply_overrides(RecipeConfig(), [override])
        message = str(err.value)
        assert key in message and type_name in message and value in message, message


def test_invalid_choices_and_cross_field_rules():
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        apply_overrides(RecipeConfig(), ["optim.schedule=cosin"])
    with pytest.raises(ConfigError, match="precision"):
        apply_overrides(RecipeConfig(), ["loop.precision=fp8"])
    with pytest.raises(ConfigError, match="multiple of grad_accum=3"):
        apply_overrides(RecipeConfig(), ["loop.grad_accum=3"])  # 64 % 3 != 0
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(RecipeConfig(), ["optim.lr"])


def test_ambiguous_bare_key_is_rejected():
    @dataclasses.dataclass
    class Two:
        a: ModelSection = dataclasses.field(default_factory=ModelSection)
        b: ModelSection = dataclasses.field(default_factory=ModelSection)

    with pytest.raises(ConfigError, match="ambiguous.*a.depth.*b.depth"):
        apply_overrides(Two(), ["depth=3"])


def test_dict_round_trip_through_json():
    cfg = apply_overrides(RecipeConfig(), ["optim.betas=(0.8,0.9)", "model.dropout=0.25", "loop.run_name=x"])
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["optim"]["betas"] == [0.8, 0.9]
    back = config_from_dict(RecipeConfig, d)
    assert back == cfg and isinstance(back.optim.betas, tuple)
    assert config_from_dict(RecipeConfig, {"optim": {"lr": 0.2}}).optim.lr == 0.2  # missing keys -> defaults


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="loop.max_step.*max_steps"):
        config_from_dict(RecipeConfig, {"loop": {"max_step": 3}})
    with pytest.raises(ConfigError, match="surprise"):
        config_from_dict(RecipeConfig, {"surprise": 1})


def test_presets_and_argparse_helpers():
    presets = Registry("test preset")

    @presets.register("tiny")
    def tiny() -> RecipeConfig:
        return RecipeConfig(loop=LoopConfig(max_steps=5, batch_size=8))

    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--preset", "tiny", "--resume", "optim.lr=0.1", "loop.seed=3"])
    assert args.preset == "tiny" and args.resume and args.overrides == ["optim.lr=0.1", "loop.seed=3"]
    cfg = load_preset(presets, args.preset, args.overrides)
    assert (cfg.loop.max_steps, cfg.optim.lr, cfg.loop.seed) == (5, 0.1, 3)
    with pytest.raises(UnknownNameError, match="tiny"):
        load_preset(presets, "tinyy")


def test_path_and_enum_fields_round_trip():
    import enum
    from pathlib import Path

    class Mode(enum.Enum):
        FAST = "fast"
        EXACT = "exact"

    @dataclasses.dataclass
    class WithPath:
        data_dir: Path = Path("data")
        mode: Mode = Mode.FAST

    cfg = apply_overrides(WithPath(), ["data_dir=/tmp/digits", "mode=EXACT"])
    assert cfg.data_dir == Path("/tmp/digits") and cfg.mode is Mode.EXACT
    assert config_to_dict(cfg) == {"data_dir": "/tmp/digits", "mode": "EXACT"}
    assert config_from_dict(WithPath, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    with pytest.raises(ConfigError, match="mode: expected one of FAST, EXACT"):
        apply_overrides(WithPath(), ["mode=slow"])


@pytest.mark.parametrize("override, key", [
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.betas=0.9,inf", "optim.betas"),
    ("model.dropout=-inf", "model.dropout"),
    ("optim.grad_clip=1e999", "optim.grad_clip"),
])
def test_non_finite_floats_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"{key}.*finite"):
        apply_overrides(RecipeConfig(), [override])


def test_non_finite_floats_are_rejected_from_dicts_and_constructors():
    with pytest.raises(ConfigError, match="weight_decay.*finite"):
        OptimConfig(weight_decay=float("inf"))
    with pytest.raises(ConfigError, match="min_lr_ratio.*finite"):
        OptimConfig(min_lr_ratio=float("nan"))
    with pytest.raises(ConfigError, match="optim.lr.*finite"):
        config_from_dict(RecipeConfig, {"optim": {"lr": float("inf")}})
    # a recipe section without its own checks: caught when the config is validated (every override / preset load)
    broken = RecipeConfig(model=ModelSection(dropout=float("nan")))
    with pytest.raises(ConfigError, match="model.dropout.*finite"):
        apply_overrides(broken, [])
    with pytest.raises(ConfigError, match=r"optim.betas.*finite"):
        apply_overrides(RecipeConfig(), {"optim": {"betas": [0.9, float("inf")]}})
