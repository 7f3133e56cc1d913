"""unrollattn: white-box attention from unrolled denoisers, for timm and HF transformers.

Importing the package registers every attention variant, block and model (also as timm names, and the
``unrollattn`` model type with HF's Auto classes). The one exception is the ``unrollattn`` command itself
(the console script, or ``python -m unrollattn.cli``): it defers those imports (torch, timm, transformers:
seconds) until a subcommand runs, so ``unrollattn --help`` answers at once; :func:`register_all` then does them.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from .registry import (
    ATTENTIONS, BLOCKS, MODELS, UnknownNameError, build_model, get_attention, get_block, list_attentions,
    list_blocks, list_models, list_recipes, register_attention, register_block, register_diagnostic, register_model,
    register_recipe,
)

__version__ = "0.1.0"

__all__ = [
    "ATTENTIONS", "BLOCKS", "MODELS", "UnknownNameError", "__version__", "build_attention", "build_block",
    "build_model", "flush_denormals", "get_attention", "get_block", "list_attentions", "list_blocks", "list_models",
    "list_recipes", "register_all", "register_attention", "register_block", "register_diagnostic", "register_model",
    "register_recipe", "set_finite_checks",
]

# public names defined in heavy modules: imported on first access (after register_all)
_LAZY_NAMES = {"build_attention": ".layers", "build_block": ".layers", "set_finite_checks": ".core.validation",
               "flush_denormals": ".utils.denormals"}
_COMMAND_NAMES = ("unrollattn", "unrollattn.exe", "unrollattn-script.py")


def register_all() -> None:
    """Import the layer, language and vision families, which registers them (the registry, timm names,
    HF Auto classes). Importing the package does this; only the ``unrollattn`` command calls it itself."""
    from . import language, layers, vision  # noqa: F401  (registration side effects)


def _started_by_the_command() -> bool:
    """True while the ``unrollattn`` console script or ``python -m unrollattn.cli`` imports the package."""
    if Path(sys.argv[0]).name in _COMMAND_NAMES:
        main = sys.modules.get("__main__")
        return Path(getattr(main, "__file__", "") or "").name == Path(sys.argv[0]).name
    if sys.argv[0] != "-m":  # python -m sets argv[0] to "-m" while it imports the module's packages
        return False
    args = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(args):
        if arg.startswith("-m"):
            module = arg[2:] or (args[i + 1] if i + 1 < len(args) else "")
            return module == "unrollattn.cli"
    return False


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        register_all()
        value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unrollattn' has no attribute {name!r}")


if not _started_by_the_command():
    register_all()
    from .core.validation import set_finite_checks
    from .utils.denormals import flush_denormals
    from .layers import build_attention, build_block
