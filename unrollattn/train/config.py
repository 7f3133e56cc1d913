"""Typed run configuration: dataclass sections, ``key=value`` overrides, JSON round-trip.

Every recipe describes its run as a ``@dataclass`` (usually with ``optim: OptimConfig`` and
``loop: LoopConfig`` sections plus its own ``model`` / ``data`` sections). Presets are plain
functions returning such a config, kept in a :class:`unrollattn.registry.Registry`. Command-line
overrides are ``key=value`` or ``section.key=value`` strings whose values are coerced from the
declared field types; unknown keys, mistyped values and non-finite floats (inf, nan: in any field
of any section) raise :class:`ConfigError`. :data:`RESUME_MUTABLE_KEYS` are the keys a run may change
when it is resumed. The command line built on these configs is :mod:`unrollattn.train.entry`.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import enum
import json
import math
import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, Union

__all__ = [
    "RESUME_MUTABLE_KEYS", "ConfigError", "LoopConfig", "OptimConfig", "apply_overrides", "config_from_dict",
    "config_to_dict", "load_preset", "read_run_config", "resume_config_changes",
]

OPTIMIZERS = ("adamw", "sgd", "lion")
SCHEDULES = ("cosine", "constant", "linear")
PRECISIONS = ("fp32", "bf16")
PARALLEL_MODES = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and what was expected."""


@dataclasses.dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule, shared by all recipes.

    ``sgd`` uses ``betas[0]`` as its momentum. The schedule is a linear warm-up over
    ``warmup_steps`` followed by cosine / linear decay to ``lr * min_lr_ratio`` at the last step
    (or a constant rate). ``grad_clip`` is the max global gradient norm (0 disables clipping).
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        _check_finite_fields(self)
        _check_choice("name", self.name, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check(self.lr >= 0, "lr", "a non-negative float", self.lr)
        _check(self.weight_decay >= 0, "weight_decay", "a non-negative float", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
               "two floats in [0, 1)", self.betas)
        _check(self.warmup_steps >= 0, "warmup_steps", "an int >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a float in [0, 1]", self.min_lr_ratio)
        _check(self.grad_clip >= 0, "grad_clip", "a float >= 0 (0 disables clipping)", self.grad_clip)
        self.betas = tuple(self.betas)


@dataclasses.dataclass
class LoopConfig:
    """The training loop: steps, batch, evaluation/checkpoint cadence, device and run directory.

    ``batch_size`` is the global batch of one optimizer step; each of the ``world_size`` ranks runs
    ``grad_accum`` micro-batches of ``batch_size // (world_size * grad_accum)`` items.
    ``eval_every`` / ``ckpt_every`` = 0 mean "only at the end". ``keep_checkpoints`` is how many
    step checkpoints stay in the run directory (older ones are deleted once a newer one is complete).
    ``max_steps`` = 0 trains nothing: the model is evaluated once, as step 0, and no checkpoint is written (how
    models without parameters run).

    ``parallel`` is how torchrun ranks share the model: ``"ddp"`` (each rank holds all of it; also the plain
    single-process run) or ``"fsdp"`` (FSDP2: each block of the layer stack and the rest of the model sharded
    over the ranks, checkpoints sharded through ``torch.distributed.checkpoint``; needs torchrun, and a run
    resumes only with the mode it started with). On CUDA with ``precision="bf16"``, fsdp keeps the parameters in
    bf16 for compute and reduces the gradients in fp32.

    ``data_workers`` > 0 builds the micro-batches (``Task.batch``) ahead of the steps in that many
    ``torch.utils.data.DataLoader`` worker processes per rank, in step order: since a batch is a function of (step,
    micro, rank), the batches, and so an exact resume, are the same as with 0 (in the training process).
    """

    max_steps: int = 100
    batch_size: int = 64
    grad_accum: int = 1
    eval_every: int = 50
    log_every: int = 10
    ckpt_every: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    out_dir: str = "runs"
    run_name: str = ""
    resume: bool = False
    progress: bool = True
    keep_checkpoints: int = 1
    parallel: str = "ddp"
    data_workers: int = 0

    def __post_init__(self):
        _check_finite_fields(self)
        _check(self.max_steps >= 0, "max_steps", "an int >= 0 (0 = evaluate only)", self.max_steps)
        _check(self.batch_size >= 1, "batch_size", "an int >= 1", self.batch_size)
        _check(self.grad_accum >= 1, "grad_accum", "an int >= 1", self.grad_accum)
        _check(self.batch_size % self.grad_accum == 0, "batch_size",
               f"a multiple of grad_accum={self.grad_accum}", self.batch_size)
        _check(self.eval_every >= 0, "eval_every", "an int >= 0 (0 = only at the end)", self.eval_every)
        _check(self.log_every >= 1, "log_every", "an int >= 1", self.log_every)
        _check(self.ckpt_every >= 0, "ckpt_every", "an int >= 0 (0 = only at the end)", self.ckpt_every)
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "an int >= 1", self.keep_checkpoints)
        _check(isinstance(self.data_workers, int) and not isinstance(self.data_workers, bool) and self.data_workers >= 0,
               "data_workers", "an int >= 0 (0 = batches built in the training process)", self.data_workers)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("parallel", self.parallel, PARALLEL_MODES)
        _check("/" not in self.run_name and "\\" not in self.run_name and self.run_name not in (".", ".."),
               "run_name", "a plain directory name (no path separators)", self.run_name)


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


class _NonFiniteError(ConfigError):
    """A float field got inf or nan (kept apart so that a union type reports it rather than a type mismatch)."""


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False


def _check_finite_fields(cfg: Any, section: str = "") -> None:
    """ConfigError naming the first leaf field of ``cfg`` that holds inf or nan (also inside lists, tuples, dicts):
    no hyperparameter of a run is meaningfully infinite, and one that is trains a NaN model."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(value) and _has_non_finite(value):
            raise _NonFiniteError(f"{section}{f.name}: expected finite numbers (no inf or nan), got {value!r}")


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}{hint}")


# ----------------------------------------------------------------------------------------------
# field types


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type of every dataclass field; ``None`` where an annotation cannot be resolved."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a class defined in a function scope: resolve field by field
        module_ns = vars(sys.modules.get(cls.__module__, types.ModuleType("_")))
        resolved = {}
        for f in dataclasses.fields(cls):
            tp = f.type
            if isinstance(tp, str):
                try:
                    tp = eval(tp, dict(module_ns), dict(vars(typing)))  # noqa: S307 (annotation text)
                except Exception:
                    tp = None
            resolved[f.name] = tp
        return resolved


def _type_name(tp: Any) -> str:
    if tp is None:
        return "any"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NONE = {"none", "null", "~"}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a CLI string or a Python/JSON value) to the field type ``tp``."""

    def fail() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")

    is_text = isinstance(value, str)
    if tp is None or tp is Any:
        return _literal(value) if is_text else value
    if tp is type(None):
        if value is None or (is_text and value.strip().lower() in _NONE):
            return None
        raise fail()
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (is_text and value.strip().lower() in _NONE)):
            return None
        # Try the non-string members first so "3" becomes 3 for ``int | str``.
        non_finite = None
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(value, arg, key)
            except _NonFiniteError as err:
                non_finite = err
            except ConfigError:
                continue
        raise non_finite or fail()
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (is_text and not isinstance(choice, str) and _literal(value) == choice):
                return choice
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if is_text and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise fail()
    if tp is int:
        parsed = _literal(value.strip().replace("_", "")) if is_text else value
        if isinstance(parsed, bool):
            raise fail()
        if isinstance(parsed, int):
            return parsed
        if isinstance(parsed, float) and parsed.is_integer():  # e.g. max_steps=1e4
            return int(parsed)
        raise fail()
    if tp is float:
        if is_text:
            try:
                number = float(value)
            except ValueError:
                raise fail() from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        else:
            number = float(value)
        if not math.isfinite(number):
            raise _NonFiniteError(f"{key}: expected a finite float (no inf or nan), got {value!r}")
        return number
    if tp is str:
        if is_text:
            parsed = _literal(value)
            return parsed if isinstance(parsed, str) else value
        raise fail()
    if origin in (tuple, list) or tp in (tuple, list):
        seq = value
        if is_text:
            seq = _literal(value)
            if isinstance(seq, str) or not isinstance(seq, (list, tuple)):
                # bare comma-separated form: betas=0.9,0.95
                seq = [s for s in value.split(",") if s.strip()] if "," in value else [value]
        if not isinstance(seq, (list, tuple)):
            raise fail()
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(seq) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            items = [_coerce(v, a, key) for v, a in zip(seq, args)]
        else:
            item_tp = args[0] if args else None
            items = [_coerce(v, item_tp, key) for v in seq]
        return tuple(items) if (origin or tp) is tuple else list(items)
    if origin is dict or tp is dict:
        parsed = _literal(value) if is_text else value
        if not isinstance(parsed, dict):
            raise fail()
        return dict(parsed)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if value in (member.name, member.value):
                return member
        raise ConfigError(f"{key}: expected one of {', '.join(m.name for m in tp)}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise fail()
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if is_text:
            parsed = _literal(value)
            if isinstance(parsed, tp):
                return parsed
        raise fail()
    return _literal(value) if is_text else value


# ----------------------------------------------------------------------------------------------
# overrides


def _split_override(item: str) -> tuple[str, str]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r}: expected the form key=value or section.key=value")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    return key, value


def _flatten(mapping: Mapping[str, Any], cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten ``{"optim": {"lr": 1}}`` into ``[("optim.lr", 1)]`` where ``optim`` is a section."""
    out = []
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        sub = getattr(cfg, key, None) if cfg is not None and "." not in key else None
        if isinstance(value, Mapping) and dataclasses.is_dataclass(sub):
            out.extend(_flatten(value, sub, full + "."))
        else:
            out.append((full, value))
    return out


def _find_field(cfg: Any, name: str, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """All dotted paths of leaf fields called ``name`` in nested sections of ``cfg``."""
    found = []
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if f.name == name and not dataclasses.is_dataclass(sub):
            found.append(path + (f.name,))
        elif dataclasses.is_dataclass(sub):
            found.extend(_find_field(sub, name, path + (f.name,)))
    return found


def _unknown_key(cfg: Any, part: str, section: str, full_key: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cfg)]
    close = difflib.get_close_matches(part, valid, n=1)
    hint = f" (did you mean {(section + '.' if section else '') + close[0]!r}?)" if close else ""
    where = f"section {section!r}" if section else f"{type(cfg).__name__}"
    return ConfigError(f"unknown config key {full_key!r}; valid keys of {where}: {', '.join(valid)}{hint}")


def _set(cfg: Any, parts: tuple[str, ...], value: Any, full_key: str, section: str = "") -> Any:
    name = parts[0]
    names = {f.name for f in dataclasses.fields(cfg)}
    if name not in names:
        raise _unknown_key(cfg, name, section, full_key)
    current = getattr(cfg, name)
    where = f"{section}.{name}" if section else name
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{full_key}: {where!r} is a value, not a section with keys")
        new_value = _set(current, parts[1:], value, full_key, where)
    elif dataclasses.is_dataclass(current):
        if isinstance(value, Mapping):
            new_value = current
            for sub_key, sub_value in _flatten(value, current):
                new_value = _set(new_value, tuple(sub_key.split(".")), sub_value, f"{where}.{sub_key}", where)
        else:
            keys = ", ".join(f"{where}.{f.name}" for f in dataclasses.fields(current))
            raise ConfigError(f"{full_key}: {where!r} is a section; set one of its keys: {keys}")
    else:
        new_value = _coerce(value, _field_types(type(cfg)).get(name), full_key)
    # Shallow copy without validation: cross-field checks run once all overrides are in
    # (see _validate), so their order does not matter.
    new_cfg = copy.copy(cfg)
    object.__setattr__(new_cfg, name, new_value)
    return new_cfg


def _validate(cfg: Any, section: str = "") -> Any:
    """Rebuild ``cfg`` bottom-up through its constructor so every ``__post_init__`` check runs (and no field of any
    section, checked or not, holds inf or nan)."""
    _check_finite_fields(cfg, section)
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.init and dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes[f.name] = _validate(value, f"{section}{f.name}.")
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError as err:
        raise ConfigError(f"{section}{err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{section or type(cfg).__name__ + ': '}{err}") from None


def apply_overrides(cfg: Any, overrides: Sequence[str] | Mapping[str, Any] | None) -> Any:
    """Return a new config with ``overrides`` applied (the input is not modified).

    ``overrides`` is a list of ``"key=value"`` strings or a dict (nested dicts address sections).
    Keys are ``field`` or ``section.field`` (any depth). A bare ``field`` that is not a top-level
    key but names exactly one field of a nested section is applied there (``max_steps=20`` ->
    ``loop.max_steps``); an ambiguous bare name is an error. String values are coerced from the
    declared field type (bool accepts true/false/1/0/yes/no, tuples and lists take Python
    literals or ``a,b``, ``none`` sets an Optional field to None).
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ConfigError(f"apply_overrides expects a dataclass config instance, got {type(cfg).__name__}")
    if overrides is None:
        return cfg
    if isinstance(overrides, Mapping):
        pairs = _flatten(overrides, cfg)
    elif isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of key=value strings or a dict, got the string {overrides!r}")
    else:
        pairs = [_split_override(item) for item in overrides]
    top_level = {f.name for f in dataclasses.fields(cfg)}
    for key, value in pairs:
        parts = tuple(key.split("."))
        if any(not p for p in parts):
            raise ConfigError(f"override key {key!r}: empty section or field name")
        if len(parts) == 1 and parts[0] not in top_level:
            matches = _find_field(cfg, parts[0])
            if len(matches) == 1:
                parts = matches[0]
            elif len(matches) > 1:
                options = ", ".join(".".join(m) for m in matches)
                raise ConfigError(f"config key {key!r} is ambiguous; use one of: {options}")
        cfg = _set(cfg, parts, value, key)
    return _validate(cfg)


# ----------------------------------------------------------------------------------------------
# dict round-trip


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-safe dict (tuples become lists, nested sections nested dicts)."""
    if isinstance(cfg, Mapping):
        return {str(k): _jsonable(v) for k, v in cfg.items()}
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ConfigError(f"config_to_dict expects a dataclass config instance, got {type(cfg).__name__}")
    return {f.name: _jsonable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    from ..utils.io import to_jsonable

    return to_jsonable(value)


def config_from_dict(cls: type, d: Mapping[str, Any], *, _path: str = "") -> Any:
    """Rebuild a config of dataclass ``cls`` from :func:`config_to_dict` output.

    Unknown keys raise :class:`ConfigError`; missing keys take the field defaults.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"config_from_dict expects a dataclass type, got {cls!r}")
    if not isinstance(d, Mapping):
        raise ConfigError(f"{_path or cls.__name__}: expected a dict of config keys, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {_path + close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {_path + unknown[0]!r}; valid keys of {cls.__name__}: "
                          f"{', '.join(fields)}{hint}")
    types_ = _field_types(cls)
    kwargs = {}
    for name, value in d.items():
        tp = types_.get(name)
        section_cls = _dataclass_type(tp, fields[name])
        if section_cls is not None and isinstance(value, Mapping):
            kwargs[name] = config_from_dict(section_cls, value, _path=f"{_path}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, _path + name)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{_path or cls.__name__ + ': '}{err}") from None
    except TypeError as err:
        raise ConfigError(f"cannot build {cls.__name__} from dict: {err}") from None


# ----------------------------------------------------------------------------------------------
# resume: which keys may differ from the run's config.json

#: Config keys that may differ between a run's ``config.json`` and the config it is resumed with: they change
#: how long the run goes on, what it reports and where, but not what the steps already taken computed.
#: ``loop.max_steps`` lets a run train longer (or stop earlier); the learning-rate schedule then follows the new
#: length from the resumed step on. ``loop.run_name`` names an auto-named run explicitly, ``loop.out_dir`` finds a
#: moved run. Every other key (learning rate, model, data, batch, seed, precision, ...) must match, and a
#: changed one is refused; the allowed changes are recorded in the run's ``resume_changes.json``.
RESUME_MUTABLE_KEYS = frozenset({
    "loop.max_steps", "loop.eval_every", "loop.log_every", "loop.ckpt_every", "loop.keep_checkpoints",
    "loop.progress", "loop.resume", "loop.run_name", "loop.out_dir", "loop.device", "loop.compile",
    "loop.data_workers",
})


def _flat_items(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_ABSENT = "<absent>"


def resume_config_changes(previous: Mapping[str, Any], config: Any, *, where: str = "the run") -> dict[str, dict]:
    """The keys in which ``config`` differs from ``previous`` (a run's config.json), as
    ``{"loop.max_steps": {"old": 100, "new": 200}}``; ConfigError when any of them is not in
    :data:`RESUME_MUTABLE_KEYS`, naming each refused key with its old and new value.

    When ``config`` is a dataclass, ``previous`` is first read through it, so a key added to the config class since
    the run started counts as its default rather than as a change.
    """
    new = config_to_dict(config)
    old: Mapping[str, Any] = previous
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        try:
            old = config_to_dict(config_from_dict(type(config), previous))
        except ConfigError:  # a key since removed, or a rule since tightened: compare the raw values
            old = previous
    flat_old, flat_new = _flat_items(old), _flat_items(new)
    changes = {}
    for key in list(flat_old) + [k for k in flat_new if k not in flat_old]:
        a, b = flat_old.get(key, _ABSENT), flat_new.get(key, _ABSENT)
        if a != b:
            changes[key] = {"old": a, "new": b}
    refused = [k for k in changes if k not in RESUME_MUTABLE_KEYS]
    if refused:
        listed = "; ".join(f"{k}: {changes[k]['old']!r} -> {changes[k]['new']!r}" for k in refused)
        raise ConfigError(f"--resume: the config differs from the one {where} was started with in {len(refused)} "
                          f"key(s) that cannot change on resume: {listed}. Resume with the original values (see its "
                          f"config.json), or start a new run with another loop.run_name=NAME. Keys that may change on "
                          f"resume: {', '.join(sorted(RESUME_MUTABLE_KEYS))}")
    return changes


def _dataclass_type(tp: Any, field: dataclasses.Field) -> type | None:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if _is_union(tp):
        for arg in typing.get_args(tp):
            if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                return arg
    if tp is None and field.default_factory is not dataclasses.MISSING:  # unresolvable annotation
        default = field.default_factory()
        if dataclasses.is_dataclass(default):
            return type(default)
    return None


# ----------------------------------------------------------------------------------------------
# presets and run directories


def load_preset(presets: Any, name: str, overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Any:
    """Build preset ``name`` from the registry ``presets`` and apply ``overrides`` to it."""
    return apply_overrides(presets.get(name)(), overrides)


def read_run_config(run_dir: str | os.PathLike, cls: type, recipe: str) -> Any:
    """The ``cls`` config that a ``recipe`` run directory was trained with (its ``config.json``)."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected a {recipe} run directory")
    return config_from_dict(cls, json.loads(config_path.read_text()))
