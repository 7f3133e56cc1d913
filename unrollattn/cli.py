"""The ``unrollattn`` command: list, train, ablate, budgets, diagnose, quickstart.

    unrollattn list [pattern] [--kind models|attentions|blocks]
    unrollattn train <recipe> --preset NAME [--resume] key=value ...
    unrollattn ablate <recipe> --variants a,b,c [--preset NAME] [--out DIR] [--resume] key=value ...
    unrollattn budgets ABLATION_DIR ... --reference NAME [--by FIELD] --out DIR
    unrollattn diagnose snr [args ...]
    unrollattn quickstart [key=value ...]

Recipes and diagnostics are found through the registry (the ``unrollattn.recipes`` / ``unrollattn.diagnostics``
entry points) and imported on demand; ``train <recipe> --help``
and ``ablate <recipe> --help`` show that recipe's presets and variants. Bad names and values end with
``error: ...`` and exit status 2 (set UNROLLATTN_TRACEBACK=1 to see the traceback).

Start-up: the package's registration imports (torch, timm, transformers) wait until a subcommand runs,
so help answers without them (see ``unrollattn.register_all``).
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from . import register_all
from .utils.errors import exit_on_error

__all__ = ["QUICKSTART_VARIANTS", "ablate", "default_preset", "exit_on_error", "import_recipe", "list_recipes", "main",
           "model_params"]

QUICKSTART_VARIANTS = ("vit", "aot_mssa", "aot_mhsa", "crate")
# ----------------------------------------------------------------------------------------------- recipes


def list_recipes() -> list[str]:
    """Names of the registered recipes (entry points ``unrollattn.recipes``, or :func:`unrollattn.register_recipe`)."""
    from .registry import list_recipes as registered

    names = registered()
    if not names:
        raise ValueError("no recipe is registered: install the repository (`pip install -e .`) so that its "
                         "'unrollattn.recipes' entry points exist")
    return names


def import_recipe(name: str) -> ModuleType:
    """The module of recipe ``name`` (after :func:`unrollattn.register_all`: recipes ask the registries for their
    variants); an unknown name lists the recipes."""
    from .registry import recipe_module

    list_recipes()
    module = recipe_module(name)
    register_all()
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"recipe {name!r} is registered as module {module!r}, which does not import: {err}") from None


def default_preset(mod: ModuleType) -> str:
    """The preset a recipe module runs when none is named: its ``DEFAULT_PRESET``, else ``quick`` when it has one;
    otherwise a ValueError listing its presets."""
    presets = mod.PRESETS.names()
    name = getattr(mod, "DEFAULT_PRESET", None) or ("quick" if "quick" in presets else None)
    if name is None:
        recipe = mod.__name__.rsplit(".", 1)[-1]
        raise ValueError(f"recipe {recipe!r} has no default preset; choose one with --preset: {', '.join(presets)}")
    return name


def _recipe_variants(mod: ModuleType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the recipe's VARIANTS, the further names it accepts, e.g. other registered families)."""
    main = tuple(mod.VARIANTS)
    allowed = tuple(mod.available_variants()) if hasattr(mod, "available_variants") else main
    return main, tuple(a for a in allowed if a not in main)


# ----------------------------------------------------------------------------------------------- list


def model_params(name: str) -> int | None:
    """Parameter count of registered model ``name`` at its default size (built on the meta device when possible).

    On the meta device timm ViTs are built with ``weight_init="skip"``: their truncated-normal init runs through
    slow reference decompositions there and cannot change a count. Builders that reject the keyword are built
    without it; a builder that reads tensor values at construction is built for real.
    """
    import torch

    from .registry import build_model

    from .utils.params import count_parameters as count

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


def _decode_cost(kind: str, cls: type) -> str:
    """How cached decoding extends the output: from stored keys/values, or by recomputing the prefix."""
    if kind == "attentions":
        return "decode: recomputes" if getattr(cls, "decode_recomputes_prefix", True) else "decode: O(T d)/token"
    # a single-attention block runs its attention's own decode; any other block recomputes itself
    return "decode: recomputes" if getattr(cls, "decode_recomputes_block", True) else "decode: as its attention"


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
                print(f"  {name:<{width}}  {_decode_cost(kind, registry.get(name)):<22}  {meta.get('summary', '')}")
    if not found:
        raise ValueError(f"no {' or '.join(kinds)} match {args.pattern!r}")
    return 0


# ----------------------------------------------------------------------------------------------- ablate


class AblationInterrupted(KeyboardInterrupt):
    """Ctrl-C during an ablation: the variant that was running, the ablation's directory and preset."""

    def __init__(self, out_dir: Path, variant: str, preset: str):
        self.out_dir, self.variant, self.preset = Path(out_dir), variant, preset
        super().__init__(f"interrupted during variant {variant} of {out_dir}")


def ablation_variants(variants: Sequence[str] = (), attention: Sequence[str] = (), block: Sequence[str] = ()
                      ) -> list[str]:
    """Variant labels: the named ``variants``, then every ``attention-block`` of the product (an empty side defaults
    to mhsa / transformer)."""
    clean = lambda names: [n.strip() for n in names if n.strip()]  # noqa: E731
    labels = clean(variants)
    attention, block = clean(attention), clean(block)
    if attention or block:
        labels += [f"{a}-{b}" for a in attention or ["mhsa"] for b in block or ["transformer"]]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--variants / --attention x --block: duplicate names in {','.join(labels)}")
    return labels


def _variant_overrides(mod: ModuleType, label: str) -> list[str]:
    """Overrides selecting ``label`` (a variant, or attention-block where the recipe composes models)."""
    if hasattr(mod, "parse_model_label"):
        return [f"model.{k}={'none' if v is None else v}" for k, v in mod.parse_model_label(label).items()]
    if "-" in label:
        raise ValueError(f"recipe {mod.__name__.rsplit('.', 1)[-1]!r} does not compose attention x block; name its "
                         "variants with --variants")
    return [f"{getattr(mod, 'VARIANT_KEY', 'model.variant')}={label}"]


def _ablation_dir(default: Path, spec: dict[str, Any]) -> tuple[Path, bool]:
    """(directory, resuming): the first of ``default``, ``default-2``, ... that holds this very ablation (its
    ablation.json equals ``spec``: resume it) or is free."""
    for i in range(1, 10_000):
        path = default if i == 1 else default.with_name(f"{default.name}-{i}")
        record = path / "ablation.json"
        if record.is_file():
            try:
                if json.loads(record.read_text()) == spec:
                    return path, True
            except json.JSONDecodeError:
                pass
            continue
        if not path.exists() or not any(path.iterdir()):
            return path, False
    raise ValueError(f"no free ablation directory next to {default}")


def ablate(recipe: str, variants: Sequence[str] = (), *, attention: Sequence[str] = (), block: Sequence[str] = (),
           seeds: int = 1, match_params: str | None = None, preset: str | None = None, overrides: Sequence[str] = (),
           out: str | os.PathLike | None = None, resume: bool = False) -> tuple[str, dict[str, dict[str, Any]]]:
    """Run ``recipe`` once per variant (named ``variants`` and every ``attention-block`` of the product) and seed,
    with the same preset (default: :func:`default_preset`) and overrides; ``match_params`` sizes every variant to
    the reference's layer-stack parameters. Writes comparison.md / .csv / .png (mean ± std over seeds), summaries.json
    and ablation.json into ``out`` (default ``runs/ablate-<recipe>-<preset>``): running the same ablation again
    resumes it (finished runs are read back, unfinished ones resumed); another ablation gets ``-2``, ``-3``, ...

    Seeds run from ``loop.seed`` (an override, else the preset's) up, so the seeds of one study can be split over
    several processes or machines (``loop.seed=2 --seeds 1`` next to ``--seeds 2``); every summary records its seed.

    Returns (markdown table, {run name: summary}). A run that fails (e.g. diverges) does not stop the others: its row
    shows ``-`` and its error is in its summary (and summaries.json).
    """
    from .train import compare, init_distributed, plot_comparison
    from .utils.dist import broadcast_object
    from .utils.io import atomic_write_json
    from .train.ablate import summarize_seeds

    mod = import_recipe(recipe)
    for attr in ("run", "load_config"):
        if not hasattr(mod, attr):
            raise ValueError(f"recipe {recipe!r} does not support ablations (it has no {attr})")
    preset = default_preset(mod) if preset is None else preset
    labels = ablation_variants(variants, attention, block)
    if not labels:
        raise ValueError("ablate: name the variants (--variants a,b) or an attention x block product "
                         "(--attention a,b --block x,y)")
    if seeds < 1:
        raise ValueError(f"--seeds: expected an int >= 1, got {seeds}")
    main_variants, also = _recipe_variants(mod)
    unknown = [v for v in labels if "-" not in v and v not in main_variants + also]
    if unknown:
        close = difflib.get_close_matches(unknown[0], main_variants + also, n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown variant(s) {', '.join(map(repr, unknown))} for recipe {recipe!r}; {hint}"
                         f"variants: {', '.join(main_variants)}" + (f" (also: {', '.join(also)})" if also else ""))
    variant_key = getattr(mod, "VARIANT_KEY", "model.variant")
    reserved = {variant_key, "model.attention", "model.block", "loop.out_dir", "loop.run_name", "out_dir", "run_name"}
    reserved |= {"model.match_params"} if match_params else set()
    clash = [o for o in overrides if o.split("=", 1)[0].strip().lstrip("-") in reserved]
    if clash:
        raise ValueError(f"ablate sets {', '.join(sorted(reserved))} itself; remove {', '.join(clash)} "
                         "(use --variants / --attention / --block, --match-params, --seeds and --out)")
    common = [*overrides, *([f"model.match_params={match_params}"] if match_params else [])]
    base = mod.load_config(preset, common, resume=resume)  # validates preset and overrides up front
    for label in labels:  # and every variant's names (an unknown attention or block lists the registered ones)
        mod.load_config(preset, [*common, *_variant_overrides(mod, label)])
    state = init_distributed(base.loop.device)
    spec = {"recipe": recipe, "preset": preset, "variants": labels, "seeds": seeds, "match_params": match_params,
            "overrides": list(overrides)}
    if out is not None:
        out_dir, resuming = Path(out), resume or (Path(out) / "ablation.json").is_file()
    else:
        out_dir, resuming = _ablation_dir(Path(base.loop.out_dir) / f"ablate-{recipe}-{preset}", spec)
        resuming = resuming or resume
    out_dir = Path(broadcast_object(str(out_dir), state))  # every rank writes to the same directory
    if state.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "ablation.json", spec)

    runs: dict[str, dict[str, Any]] = {}
    by_label: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    plan = [(label, base.loop.seed + s) for label in labels for s in range(seeds)]  # loop.seed, loop.seed + 1, ...
    for i, (label, seed) in enumerate(plan, 1):
        name = label if seeds == 1 else f"{label}-seed{seed}"
        finished = out_dir / name / "result.json"
        if resuming and finished.is_file():
            summary = {"variant": label, "seed": seed, **json.loads(finished.read_text()),
                       "run_dir": str(out_dir / name)}
            if state.is_main:
                print(f"== ablate {recipe}/{preset}: {name} finished earlier ({i}/{len(plan)})", flush=True)
        else:
            if state.is_main:
                print(f"== ablate {recipe}/{preset}: {name} ({i}/{len(plan)}) -> {out_dir / name}", flush=True)
            cfg = mod.load_config(preset, [*common, *_variant_overrides(mod, label), f"loop.seed={seed}",
                                           f"loop.out_dir={out_dir}", f"loop.run_name={name}"], resume=resuming)
            try:
                summary = {"seed": seed, **mod.run(cfg)}
            except KeyboardInterrupt as stop:  # the run saved its last step (TrainingInterrupted); finished ones stay
                raise AblationInterrupted(out_dir, name, preset) from stop
            except Exception as err:  # e.g. divergence: keep the other variants' results, report this one
                if os.environ.get("UNROLLATTN_TRACEBACK"):
                    raise
                summary = {"variant": label, "seed": seed, "error": f"{type(err).__name__}: {err}",
                           "run_dir": str(out_dir / name)}
                if state.is_main:
                    print(f"   variant {name} failed: {summary['error']}", file=sys.stderr, flush=True)
        runs[name] = summary
        by_label[label].append(summary)

    if hasattr(mod, "ablation_columns_for"):  # columns that depend on the preset (e.g. lm vs in-context regression)
        columns = mod.ablation_columns_for(base)
    else:
        columns = getattr(mod, "ablation_columns", ("params", "wall_s"))
    headers = dict(columns) if isinstance(columns, dict) else {c: c for c in columns}
    if not state.is_main:
        return "", runs
    atomic_write_json(out_dir / "summaries.json", runs)
    ok = {label: [s for s in summaries if "error" not in s] for label, summaries in by_label.items()}
    ok = {label: summaries for label, summaries in ok.items() if summaries}
    if not ok:
        return "", runs
    rows = summarize_seeds(ok, list(headers))
    table_rows = {label: {headers[k]: rows.get(label, {}).get(k) for k in headers}
                  for label in labels}  # a variant whose runs all failed: a row of "-"
    markdown = compare(table_rows, list(headers.values()), out_dir, label="variant")
    metric = getattr(mod, "ablation_metric", "top1")
    figure_rows = {label: {**ok[label][0], **rows[label]} for label in rows}  # curves from each variant's first seed
    plot_comparison(figure_rows, out_dir, metric=metric, title=f"{recipe} / {preset}: {', '.join(labels)}"
                    + (f" ({seeds} seeds)" if seeds > 1 else ""))
    return markdown, runs


def _cmd_ablate(args: argparse.Namespace) -> int:
    from .registry import import_modules
    from .utils.dist import is_main_process

    t0 = time.perf_counter()
    import_modules(args.imports)
    try:
        markdown, runs = ablate(args.recipe, args.variants.split(","), attention=args.attention.split(","),
                                block=args.block.split(","), seeds=args.seeds, match_params=args.match_params,
                                preset=args.preset, overrides=args.overrides, out=args.out, resume=args.resume)
    except AblationInterrupted as stop:
        from .train.entry import INTERRUPTED_EXIT

        selection = [f"--{k.replace('_', '-')}={v}" for k, v in (
            ("variants", args.variants), ("attention", args.attention), ("block", args.block),
            ("match_params", args.match_params), ("import", args.imports)) if v]
        selection += [f"--seeds={args.seeds}"] if args.seeds > 1 else []
        command = shlex.join(["unrollattn", "ablate", args.recipe, *selection, "--preset", stop.preset,
                              "--out", str(stop.out_dir), *args.overrides])
        if is_main_process():
            print(f"interrupted during variant {stop.variant}; resume the ablation with: {command}", file=sys.stderr,
                  flush=True)
        return INTERRUPTED_EXIT
    if markdown:
        out_dir = Path(next(iter(runs.values()))["run_dir"]).parent
        print()
        print(markdown)
        print(f"wrote {out_dir}/comparison.md, comparison.csv, comparison.png, summaries.json "
              f"({time.perf_counter() - t0:.0f} s)")
    failed = [v for v, s in runs.items() if "error" in s]
    if failed and is_main_process():
        print(f"error: variant(s) {', '.join(failed)} failed (see summaries.json)", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------- other commands


def _cmd_train(args: argparse.Namespace) -> int:
    mod = import_recipe(args.recipe)
    if not hasattr(mod, "main"):
        raise ValueError(f"recipe {args.recipe!r} has no main()")
    return int(mod.main(list(args.args)) or 0)


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .registry import diagnostic_module

    return int(importlib.import_module(diagnostic_module(args.name)).main(list(args.args)) or 0)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    args.recipe, args.variants, args.preset, args.resume = "classify", ",".join(QUICKSTART_VARIANTS), "quick", False
    args.attention = args.block = args.imports = ""
    args.seeds, args.match_params = 1, None
    return _cmd_ablate(args)


# ----------------------------------------------------------------------------------------------- parser


def _recipe_choices() -> str:
    try:
        return f"one of: {', '.join(list_recipes())}"
    except ValueError as err:
        return str(err)


def _ablate_arguments(p: argparse.ArgumentParser, mod: ModuleType | None, *, probe: bool = False) -> None:
    """The arguments of ``ablate``, with the variants and presets of recipe ``mod`` in their help when given
    (``probe``: everything optional, to find the recipe in a command line before the real parse)."""
    if mod is None:
        recipes = _recipe_choices()
        variants = "comma-separated variants of the recipe (listed by: unrollattn ablate <recipe> --help)"
        preset = "a preset of the recipe (default: the recipe's default preset)"
    else:
        main_variants, also = _recipe_variants(mod)
        recipes = mod.__name__.rsplit(".", 1)[-1]
        variants = f"comma-separated, from: {', '.join(main_variants)}" + (f"; also: {', '.join(also)}" if also else "")
        try:
            default = f"default: {default_preset(mod)}"
        except ValueError:
            default = "required: the recipe has no default"
        preset = f"one of: {', '.join(mod.PRESETS.names())} ({default})"
    p.add_argument("recipe", nargs="?" if probe else None, help=recipes)
    p.add_argument("--variants", default="", help=variants)
    p.add_argument("--attention", default="", help="comma-separated registered attentions: with --block, every "
                   "attention x block is a variant named attention-block (block default transformer)")
    p.add_argument("--block", default="", help="comma-separated registered blocks (attention default mhsa)")
    p.add_argument("--match-params", default=None, metavar="REFERENCE",
                   help="size each variant so its layer stack has REFERENCE's parameters within 2%%: its depth, or "
                        "where no depth comes that close the nearest width (REFERENCE: a variant or attention-block; "
                        "the preset's depth is REFERENCE's)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant: loop.seed (default the preset's), "
                   "loop.seed + 1, ..., loop.seed + N - 1; mean ± std")
    p.add_argument("--import", dest="imports", default="", metavar="MODULES",
                   help="comma-separated modules to import first (e.g. one registering your own attention)")
    p.add_argument("--preset", default=None, help=preset)
    p.add_argument("--out", default=None, help="output directory (default runs/ablate-<recipe>-<preset>; the same "
                   "command again resumes it: finished runs are skipped, unfinished ones resumed)")
    p.add_argument("--resume", action="store_true", help="continue the variants' runs in --out")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train <recipe>")


def _ablate_epilog(mod: ModuleType | None) -> str:
    if mod is None:
        return "Variants and presets belong to the recipe: unrollattn ablate <recipe> --help lists them."
    name = mod.__name__.rsplit(".", 1)[-1]
    presets = mod.PRESETS.names()
    try:
        preset = default_preset(mod)
    except ValueError:
        preset = presets[0]
    main_variants, _ = _recipe_variants(mod)
    composed = (f"  unrollattn ablate {name} --attention mhsa,mssa,bilateral --block transformer,aot "
                f"--match-params {main_variants[0]} --seeds 3 --preset {preset}\n" if hasattr(mod, "parse_model_label")
                else "")
    return (f"examples:\n  unrollattn ablate {name} --variants {','.join(main_variants[:4])} --preset {preset}\n"
            f"{composed}\nConfig keys for the overrides: unrollattn train {name} --help")


def _ablate_recipe_for_help(argv: Sequence[str]) -> ModuleType | None:
    """The recipe module of ``ablate <recipe> ... --help`` (None for any other command line or an unknown recipe)."""
    if not argv or argv[0] != "ablate" or not {"-h", "--help"} & set(argv[1:]):
        return None
    probe = argparse.ArgumentParser(add_help=False)
    _ablate_arguments(probe, None, probe=True)
    known, _ = probe.parse_known_args([a for a in argv[1:] if a not in ("-h", "--help")])
    try:
        return import_recipe(known.recipe) if known.recipe else None
    except ValueError:
        return None


def _cmd_budgets(args: argparse.Namespace) -> int:
    from .train.ablate import write_budget_study

    by = [f.strip() for f in args.by.split(",") if f.strip()]
    markdown = write_budget_study(args.ablations, args.out, reference=args.reference, metric=args.metric, x=args.x,
                                  by=by)
    print(markdown)
    print(f"wrote {args.out}/gaps.md, gaps.csv, gaps.png")
    return 0


def build_parser(ablate_recipe: ModuleType | None = None) -> argparse.ArgumentParser:
    """The command's parser; ``ablate_recipe`` (a recipe module) puts its variants and presets in ``ablate``'s help."""
    parser = argparse.ArgumentParser(prog="unrollattn", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="registered models (with parameter counts), attentions and blocks")
    p.add_argument("pattern", nargs="?", default=None, help="substring or glob filter, e.g. crate or 'aot_*'")
    p.add_argument("--kind", choices=("all", "models", "attentions", "blocks"), default="all")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("train", help="run a recipe: train <recipe> --preset NAME [--resume] key=value ...",
                       add_help=False)  # train <recipe> --help is the recipe's own help
    p.add_argument("-h", "--help", action="help", help="show this help message and exit")
    p.add_argument("recipe", help=_recipe_choices())
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the recipe (its presets and config keys: "
                                                           "train <recipe> --help)")
    p.set_defaults(func=_cmd_train)

    about = "one recipe over several variants, then a comparison table and plot"
    p = sub.add_parser("ablate", help=about, description=about, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_ablate_epilog(ablate_recipe))
    _ablate_arguments(p, ablate_recipe)
    p.set_defaults(func=_cmd_ablate)

    about = ("the gap of every variant to a reference across finished ablations that differ in budget, with its "
             "change per doubling of the budget, as a table and a plot; the runs of one budget may come from several "
             "directories (seeds split over processes: their recorded seeds must differ)")
    p = sub.add_parser("budgets", help=about, description=about)
    p.add_argument("ablations", nargs="+", metavar="ABLATION_DIR", help="directories written by `unrollattn ablate`")
    p.add_argument("--reference", required=True, help="the variant the gaps are measured to, e.g. gpt2")
    p.add_argument("--metric", default="val_loss", help="summary field compared (default val_loss)")
    p.add_argument("--x", default="tokens_seen", help="summary field that is the budget (default tokens_seen)")
    p.add_argument("--by", default="", help="comma-separated summary fields that separate studies, e.g. n_embd, or "
                                            "n_embd,seed for one study per seed (paired gaps)")
    p.add_argument("--out", required=True, help="directory for gaps.md, gaps.csv, gaps.png")
    p.set_defaults(func=_cmd_budgets)

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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_ablate_recipe_for_help(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides that follow options (argparse does not intermix positionals)
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    register_all()  # the package's registrations, deferred while the command started (unrollattn/__init__.py)
    from .utils.denormals import flush_denormals  # imports torch: not before --help has answered

    with flush_denormals():  # before torch's first parallel operation, so its intra-op threads inherit it
        return exit_on_error(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
