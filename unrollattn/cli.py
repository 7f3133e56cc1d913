"""The ``unrollattn`` command: list, train, ablate, diagnose, quickstart.

    unrollattn list [pattern] [--kind models|attentions|blocks]
    unrollattn train <recipe> --preset NAME [--resume] key=value ...
    unrollattn ablate <recipe> --variants a,b,c [--preset quick] [--out DIR] [--resume] key=value ...
    unrollattn diagnose snr [args ...]
    unrollattn quickstart [key=value ...]

Recipes are the modules of the top-level ``recipes`` package, imported on demand. Bad names and
values end with ``error: ...`` and exit status 2 (set UNROLLATTN_TRACEBACK=1 to see the traceback).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import pkgutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

__all__ = ["QUICKSTART_VARIANTS", "ablate", "exit_on_error", "import_recipe", "list_recipes", "main", "model_params"]

QUICKSTART_VARIANTS = ("vit", "aot_mssa", "aot_mhsa", "crate")
USAGE_ERROR = 2


def exit_on_error(fn: Callable[..., int | None], *args: Any) -> int:
    """Run ``fn(*args)``; print ``error: <message>`` instead of a traceback and return 2 for bad input
    (ValueError, KeyError, missing files or network), 1 for a diverged training run."""
    try:
        return int(fn(*args) or 0)
    except (ValueError, KeyError, FileNotFoundError, ConnectionError, FloatingPointError) as err:
        if os.environ.get("UNROLLATTN_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 1 if isinstance(err, FloatingPointError) else USAGE_ERROR


# ----------------------------------------------------------------------------------------------- recipes


def list_recipes() -> list[str]:
    """Names of the recipe modules in the ``recipes`` package."""
    try:
        import recipes
    except ImportError:
        raise ValueError("the 'recipes' package is not importable: install the repository with `pip install -e .` "
                         "or run from its root") from None
    return sorted(m.name for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def import_recipe(name: str) -> ModuleType:
    """``recipes.<name>``, with a clear error listing the recipes for an unknown name."""
    known = list_recipes()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown recipe {name!r}; {hint}available: {', '.join(known) or '(none)'}")
    return importlib.import_module(f"recipes.{name}")


# ----------------------------------------------------------------------------------------------- list


def model_params(name: str) -> int | None:
    """Parameter count of registered model ``name`` at its default size (built on the meta device when possible).

    On the meta device timm ViTs are built with ``weight_init="skip"``: their truncated-normal init runs through
    slow reference decompositions there and cannot change a count. Builders that reject the keyword are built
    without it; a builder that reads tensor values at construction is built for real.
    """
    import torch

    from .registry import build_model

    def count(model) -> int:
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    for overrides in ({"weight_init": "skip"}, {}):
        try:
            with torch.device("meta"):
                return count(build_model(name, **overrides))
        except Exception:
            continue
    try:
        with torch.no_grad():
            return count(build_model(name))
    except Exception:
        return None


def _human_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import ATTENTIONS, BLOCKS, MODELS

    kinds = ("models", "attentions", "blocks") if args.kind == "all" else (args.kind,)
    found = 0
    for kind in kinds:
        registry = {"models": MODELS, "attentions": ATTENTIONS, "blocks": BLOCKS}[kind]
        names = registry.names(args.pattern)
        found += len(names)
        if not names:
            continue
        print(f"{kind}:")
        width = max(len(n) for n in names)
        for name in names:
            meta = registry.meta(name)
            if kind == "models":
                params = model_params(name)
                size = "?" if params is None else _human_count(params)
                print(f"  {name:<{width}}  {size:>8}  {meta.get('family', '')}/{meta.get('task', '')}")
            else:
                print(f"  {name:<{width}}  {meta.get('summary', '')}")
    if not found:
        raise ValueError(f"no {' or '.join(kinds)} match {args.pattern!r}")
    return 0


# ----------------------------------------------------------------------------------------------- ablate


def _unique_dir(path: Path) -> Path:
    if not path.exists() or not any(path.iterdir()):
        return path
    n = 2
    while (candidate := path.with_name(f"{path.name}-{n}")).exists():
        n += 1
    return candidate


def ablate(recipe: str, variants: Sequence[str], *, preset: str = "quick", overrides: Sequence[str] = (),
           out: str | os.PathLike | None = None, resume: bool = False) -> tuple[str, dict[str, dict[str, Any]]]:
    """Run ``recipe`` once per variant with the same preset and overrides; write comparison.md / .csv / .png
    (and summaries.json) into ``out`` (default ``runs/ablate-<recipe>-<preset>``, suffixed -2, -3, ... if taken).

    Returns (markdown table, {variant: summary}). A variant that fails (e.g. diverges) does not stop the
    others: its row shows ``-`` and its error is in its summary (and summaries.json).
    """
    from .train import broadcast_object, compare, init_distributed, plot_comparison

    mod = import_recipe(recipe)
    for attr in ("run", "load_config", "VARIANTS"):
        if not hasattr(mod, attr):
            raise ValueError(f"recipe {recipe!r} does not support ablations (it has no {attr})")
    variants = [v.strip() for v in variants if v.strip()]
    if not variants:
        raise ValueError(f"--variants: expected a comma-separated list, e.g. {','.join(mod.VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"--variants: duplicate names in {','.join(variants)}")
    allowed = mod.available_variants() if hasattr(mod, "available_variants") else tuple(mod.VARIANTS)
    unknown = [v for v in variants if v not in allowed]
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))} for recipe {recipe!r}; {hint}"
                         f"variants: {', '.join(mod.VARIANTS)}"
                         + (f" (also: {', '.join(a for a in allowed if a not in mod.VARIANTS)})"
                            if len(allowed) > len(mod.VARIANTS) else ""))
    variant_key = getattr(mod, "VARIANT_KEY", "model.variant")
    reserved = {variant_key, "loop.out_dir", "loop.run_name", "out_dir", "run_name"}
    clash = [o for o in overrides if o.split("=", 1)[0].strip().lstrip("-") in reserved]
    if clash:
        raise ValueError(f"ablate sets {', '.join(sorted(reserved))} itself; remove {', '.join(clash)} "
                         "(use --variants and --out)")
    base = mod.load_config(preset, list(overrides), resume=resume)  # validates preset and overrides up front
    state = init_distributed(base.loop.device)
    default_out = Path(base.loop.out_dir) / f"ablate-{recipe}-{preset}"
    out_dir = Path(out) if out is not None else (default_out if resume else _unique_dir(default_out))
    out_dir = Path(broadcast_object(str(out_dir), state))  # every rank writes to the same directory

    runs: dict[str, dict[str, Any]] = {}
    for i, variant in enumerate(variants, 1):
        if state.is_main:
            print(f"== ablate {recipe}/{preset}: variant {variant} ({i}/{len(variants)}) -> {out_dir / variant}",
                  flush=True)
        cfg = mod.load_config(preset, [*overrides, f"{variant_key}={variant}", f"loop.out_dir={out_dir}",
                                       f"loop.run_name={variant}"], resume=resume)
        try:
            runs[variant] = mod.run(cfg)
        except Exception as err:  # e.g. divergence: keep the other variants' results, report this one
            if os.environ.get("UNROLLATTN_TRACEBACK"):
                raise
            runs[variant] = {"variant": variant, "error": f"{type(err).__name__}: {err}",
                             "run_dir": str(out_dir / variant)}
            if state.is_main:
                print(f"   variant {variant} failed: {runs[variant]['error']}", file=sys.stderr, flush=True)

    if hasattr(mod, "ablation_columns_for"):  # columns that depend on the preset (e.g. lm vs in-context regression)
        columns = mod.ablation_columns_for(base)
    else:
        columns = getattr(mod, "ablation_columns", ("params", "wall_s"))
    headers = dict(columns) if isinstance(columns, dict) else {c: c for c in columns}
    table_rows = {v: {headers[k]: s.get(k) for k in headers} for v, s in runs.items()}
    if not state.is_main:
        return "", runs
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summaries.json").write_text(json.dumps(runs, indent=2, default=str) + "\n")
    if all("error" in s for s in runs.values()):
        return "", runs
    metric = getattr(mod, "ablation_metric", "top1")
    markdown = compare(table_rows, list(headers.values()), out_dir, label="variant")
    plot_comparison(runs, out_dir, metric=metric, title=f"{recipe} / {preset}: {', '.join(variants)}")
    return markdown, runs


def _cmd_ablate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    markdown, runs = ablate(args.recipe, args.variants.split(","), preset=args.preset, overrides=args.overrides,
                            out=args.out, resume=args.resume)
    if markdown:
        out_dir = Path(next(iter(runs.values()))["run_dir"]).parent
        print()
        print(markdown)
        print(f"wrote {out_dir}/comparison.md, comparison.csv, comparison.png, summaries.json "
              f"({time.perf_counter() - t0:.0f} s)")
    failed = [v for v, s in runs.items() if "error" in s]
    if failed and int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"error: variant(s) {', '.join(failed)} failed (see summaries.json)", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- other commands


def _cmd_train(args: argparse.Namespace) -> int:
    mod = import_recipe(args.recipe)
    if not hasattr(mod, "main"):
        raise ValueError(f"recipe {args.recipe!r} has no main()")
    return int(mod.main(list(args.args)) or 0)


DIAGNOSTICS = {"snr": "unrollattn.diagnostics.snr"}


def _cmd_diagnose(args: argparse.Namespace) -> int:
    if args.name not in DIAGNOSTICS:
        close = difflib.get_close_matches(args.name, list(DIAGNOSTICS), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown diagnostic {args.name!r}; {hint}available: {', '.join(DIAGNOSTICS)}")
    return int(importlib.import_module(DIAGNOSTICS[args.name]).main(list(args.args)) or 0)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    args.recipe, args.variants, args.preset, args.resume = "classify", ",".join(QUICKSTART_VARIANTS), "quick", False
    return _cmd_ablate(args)


# ----------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unrollattn", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="registered models (with parameter counts), attentions and blocks")
    p.add_argument("pattern", nargs="?", default=None, help="substring or glob filter, e.g. crate or 'aot_*'")
    p.add_argument("--kind", choices=("all", "models", "attentions", "blocks"), default="all")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("train", help="run a recipe: train <recipe> --preset NAME [--resume] key=value ...",
                       add_help=False)
    p.add_argument("recipe")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the recipe (try: train <recipe> --help)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("ablate", help="one recipe over several variants, then a comparison table and plot")
    p.add_argument("recipe")
    p.add_argument("--variants", required=True, help="comma-separated, e.g. vit,aot_mssa,aot_mhsa,crate")
    p.add_argument("--preset", default="quick")
    p.add_argument("--out", default=None, help="output directory (default runs/ablate-<recipe>-<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the variants' runs in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("diagnose", help="interpretability diagnostics: diagnose snr [args ...]", add_help=False)
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_diagnose)

    p = sub.add_parser("quickstart", help="ablate classify over vit, aot_mssa, aot_mhsa, crate with the quick preset")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unrollattn`` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if extra:  # key=value overrides that follow options (argparse does not intermix positionals)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return exit_on_error(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
