"""The command line every recipe shares: :func:`recipe_main` (``[--preset NAME] [--resume] [key=value ...]``).

``--help`` lists the presets, the variants and every config key (:func:`config_help`) with the keys that may
change on resume; Ctrl-C ends with one line holding the command that resumes the run (:func:`resume_command`) and
exit status :data:`INTERRUPTED_EXIT`. The configs themselves, their coercion and the resume rules are
:mod:`unrollattn.train.config`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import re
import shlex
import sys
import textwrap
import types
from collections.abc import Sequence
from typing import Any, Callable

from ..utils.dist import is_main_process
from .config import RESUME_MUTABLE_KEYS, _field_types, _type_name
from .distributed import cleanup
from .trainer import TrainingInterrupted

__all__ = ["INTERRUPTED_EXIT", "add_config_arguments", "config_help", "recipe_main", "resume_command"]

#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED_EXIT = 130


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--preset NAME``, ``--resume`` and positional ``key=value`` overrides to ``parser``."""
    parser.add_argument("--preset", default=None, metavar="NAME", help="preset name (a registered function returning a config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its newest complete checkpoint (name it with loop.run_name=...; "
                             "only the keys listed under 'keys that may change on resume' may differ)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=3e-4 loop.max_steps=200")
    return parser


def _short(value: Any, width: int = 40) -> str:
    """``repr`` with floats to 4 significant digits, cut to ``width`` characters."""
    def show(v: Any) -> str:
        if isinstance(v, float):
            return repr(v) if len(repr(v)) <= 8 else f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            inner = ", ".join(map(show, v)) + ("," if isinstance(v, tuple) and len(v) == 1 else "")
            return f"({inner})" if isinstance(v, tuple) else f"[{inner}]"
        return repr(v)

    text = show(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def config_help(cfg: Any, *, preset: str | None = None) -> str:
    """One line per config key of the dataclass instance ``cfg``: dotted key, type, the dataclass default and, where
    ``cfg`` (e.g. a preset) holds another value, that value (``preset`` names it)."""
    rows = []

    def walk(obj: Any, prefix: str) -> None:
        types_ = _field_types(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, f"{prefix}{f.name}.")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = dataclasses.MISSING
            shown = "(required)" if default is dataclasses.MISSING else _short(default)
            here = "" if default is not dataclasses.MISSING and value == default else f"{preset or 'here'}: {_short(value)}"
            rows.append((f"{prefix}{f.name}", _type_name(types_.get(f.name)), shown, here))

    walk(cfg, "")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {h}".rstrip() for k, t, d, h in rows)


def _first_sentence(obj: Any) -> str:
    paragraph = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph, maxsplit=1)[0]


def _recipe_epilog(presets: Any, default_preset: str, module: types.ModuleType | None) -> str:
    names = list(presets.names())
    width = max(map(len, names), default=0)
    wrap = functools.partial(textwrap.fill, width=110, subsequent_indent=" " * (width + 4))
    parts = [f"presets (--preset NAME; default {default_preset}):\n"
             + "\n".join(wrap(f"  {n:<{width}}  {_first_sentence(presets.get(n))}") for n in names)]
    variants = tuple(getattr(module, "VARIANTS", ()) or ())
    if variants:
        key = getattr(module, "VARIANT_KEY", "model.variant")
        try:
            extra = [v for v in module.available_variants() if v not in variants] if hasattr(module, "available_variants") else []
        except Exception:  # help must not fail on a registry problem
            extra = []
        parts.append(f"variants (set one with {key}=NAME, compare several with `unrollattn ablate <recipe> "
                     f"--variants a,b`):\n  {', '.join(variants)}" + (f"\n  also: {', '.join(extra)}" if extra else ""))
    try:
        cfg = presets.get(default_preset)()
    except Exception as err:  # noqa: BLE001  (still show the rest of the help)
        parts.append(f"config keys: unavailable ({type(err).__name__}: {err})")
    else:
        parts.append(textwrap.fill(f"config keys (key=value; type, default, the value of preset {default_preset} where it "
                                   "differs; a bare name such as max_steps=20 finds its section):", width=110)
                     + "\n" + config_help(cfg, preset=default_preset))
    parts.append(textwrap.fill("keys that may change on resume: " + ", ".join(sorted(RESUME_MUTABLE_KEYS)), width=110,
                               subsequent_indent="  "))
    return "\n\n".join(parts)


def resume_command(prog: str, preset: str, overrides: Sequence[str], run_name: str | None) -> str:
    """The shell command that resumes run ``run_name`` of the recipe behind ``prog`` (``python -m unrollattn.recipes.<name>``)
    with the same preset and overrides: ``unrollattn train <name> --preset P --resume k=v ... loop.run_name=R``
    (a ``torchrun`` line under torchrun)."""
    match = re.fullmatch(r"(?:\S*python[\d.]*\s+-m\s+)?(?:unrollattn\.)?recipes\.(\w+)", prog.strip())
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
        nodes = ["--standalone"] if local == world else [f"--nnodes={world // max(local, 1)}"]
        script = ["-m", f"unrollattn.recipes.{match.group(1)}"] if match else shlex.split(prog)[-1:]
        base = ["torchrun", *nodes, f"--nproc_per_node={local}", *script]
    else:
        base = ["unrollattn", "train", match.group(1)] if match else shlex.split(prog)
    names_run = any(o.split("=", 1)[0].strip().lstrip("-") in ("loop.run_name", "run_name") for o in overrides)
    tail = [f"loop.run_name={run_name}"] if run_name and not names_run else []
    return shlex.join([*base, "--preset", preset, "--resume", *overrides, *tail])


def recipe_main(argv, *, prog: str, description: str, presets: Any, default_preset: str,
                load_config: Callable[..., Any], run: Callable[[Any], dict]) -> int:
    """The command line every recipe shares: ``[--preset NAME] [--resume] [key=value ...]``; rank 0 prints
    the run's summary as JSON.

    ``--help`` lists the presets, the variants (when the recipe module of ``run`` has ``VARIANTS``) and every config
    key with its type and default. Ctrl-C ends with one line giving the command that resumes the run (the checkpoint
    of the last completed step is written first, see :class:`~unrollattn.train.trainer.TrainingInterrupted`) and
    exit status 130.
    """
    module = sys.modules.get(getattr(run, "__module__", "") or "")
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=_recipe_epilog(presets, default_preset, module))
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    preset = args.preset or default_preset
    is_main = is_main_process()
    try:
        summary = run(load_config(preset, args.overrides, resume=args.resume))
    except TrainingInterrupted as stop:
        if is_main:
            print(_interrupted_line(stop, resume_command(prog, preset, args.overrides, stop.run_name)), file=sys.stderr,
                  flush=True)
        return INTERRUPTED_EXIT
    except KeyboardInterrupt:
        if is_main:
            print("interrupted outside the training loop (no step was cut short); to continue a run that has started: "
                  + resume_command(prog, preset, args.overrides, None), file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    cleanup()  # every rank leaves the process group together before the interpreter exits
    if is_main:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _interrupted_line(stop: Any, command: str) -> str:
    if stop.checkpoint_step is None:
        return (f"interrupted at step {stop.step}; no checkpoint could be written (weights not finite, or the save was "
                f"interrupted too), so {stop.run_dir} cannot be resumed; start anew with another loop.run_name=NAME")
    if stop.checkpoint_step != stop.step:
        return (f"interrupted at step {stop.step} (the save of that step was cut short; the newest checkpoint is of step "
                f"{stop.checkpoint_step}); resume with: {command}")
    return f"interrupted at step {stop.step}; resume with: {command}"
