"""A trained run directory for the diagnostics: its model, loaded by the recipe's own loader, and held-out inputs
from the run's own data config (classification: the test split; restoration: the test photos; language models:
windows of the validation split)."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = ["LoadedRun", "load_run", "recipes_with_models"]


def recipes_with_models() -> dict[str, Any]:
    """The registered recipes whose run directories hold a model (modules with ``load_model`` and ``make_task``),
    by name; found through the registry, so a recipe of your own is read too."""
    from ..registry import list_recipes, recipe_module

    modules = {name: importlib.import_module(recipe_module(name)) for name in list_recipes()}
    return {name: m for name, m in modules.items() if hasattr(m, "load_model") and hasattr(m, "make_task")}


@dataclasses.dataclass
class LoadedRun:
    """``model`` (eval mode) and ``cfg`` of the run in ``run_dir``, trained by recipe ``recipe`` (its module
    ``recipe_module`` gives the task that holds the run's data)."""

    run_dir: Path
    recipe: str
    model: nn.Module
    cfg: Any
    recipe_module: Any = dataclasses.field(default=None, repr=False)
    _task: Any = dataclasses.field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The run's variant (or directory name)."""
        model = getattr(self.cfg, "model", None)
        return getattr(model, "label", None) or getattr(model, "variant", None) or self.run_dir.name

    @property
    def is_language_model(self) -> bool:
        return hasattr(self.model, "generate") and hasattr(getattr(self.model, "config", None), "vocab_size")

    @property
    def is_restoration(self) -> bool:
        """A restoration model: it owns its forward operator H and restores images, it has no token stream."""
        return hasattr(self.model, "forward_operator")

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """Keywords of a full forward: language models without a cache (a cached forward decodes instead)."""
        return {"use_cache": False} if self.is_language_model else {}

    @property
    def task(self):
        """The recipe's Task for this config (it loads the run's data)."""
        if self._task is None:
            self._task = self.recipe_module.make_task(self.cfg)
        return self._task

    def heldout(self, count: int) -> dict[str, torch.Tensor]:
        """``count`` held-out examples (the first ones, a fixed choice) from the recipe's task: ``inputs`` (what the
        model takes) and ``display`` (pixels in [0, 1] [B, C, H, W], or token ids [B, T] for language models)."""
        if count < 1:
            raise ValueError(f"count: expected at least 1 held-out example, got {count}")
        try:
            return self.task.heldout(count)
        except ValueError as err:
            raise ValueError(f"{self.run_dir}: {err}") from None

    def decode_tokens(self, ids: torch.Tensor) -> list[str]:
        """Each token id as text (language-model runs)."""
        return self.task.decode_tokens(ids)


def load_run(run_dir: str | Path) -> LoadedRun:
    """The run in ``run_dir`` through its recipe's own ``load_model`` (each registered recipe that has one is
    tried); anything else is a ValueError naming what was expected."""
    run_dir = Path(run_dir)
    recipes = recipes_with_models()
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{run_dir}: not a run directory (expected config.json from `unrollattn train "
                         f"{'|'.join(recipes)}`)")
    errors = []
    for name, module in recipes.items():
        try:
            model, cfg = module.load_model(run_dir)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
            errors.append(f"{name}: {str(err).splitlines()[0][:160]}")
            continue
        return LoadedRun(run_dir, name, model, cfg, module)
    raise ValueError(f"{run_dir}: not a finished run of {', '.join(recipes)} ({'; '.join(errors)})")
