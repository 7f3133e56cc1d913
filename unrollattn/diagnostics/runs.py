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

__all__ = ["LoadedRun", "RECIPES_WITH_MODELS", "load_run"]

RECIPES_WITH_MODELS = ("classify", "restore", "lm")  # recipes whose run directories the diagnostics read


@dataclasses.dataclass
class LoadedRun:
    """``model`` (eval mode) and ``cfg`` of the run in ``run_dir``, trained by recipe ``recipe``."""

    run_dir: Path
    recipe: str
    model: nn.Module
    cfg: Any
    _task: Any = dataclasses.field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The run's variant (or directory name)."""
        model = getattr(self.cfg, "model", None)
        return getattr(model, "label", None) or getattr(model, "variant", None) or self.run_dir.name

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """Keywords of a full forward: language models without a cache (a cached forward decodes instead)."""
        return {"use_cache": False} if self.recipe == "lm" else {}

    @property
    def task(self):
        """The recipe's Task for this config (it loads the run's data)."""
        if self._task is None:
            module = importlib.import_module(f"unrollattn.recipes.{self.recipe}")
            self._task = {"classify": lambda: module.ClassifyTask(self.cfg), "restore": lambda: module.RestoreTask(self.cfg),
                          "lm": lambda: module.LMTask(self.cfg)}[self.recipe]()
        return self._task

    def heldout(self, count: int) -> dict[str, torch.Tensor]:
        """``count`` held-out examples (the first ones, a fixed choice): ``inputs`` (what the model takes) and
        ``display`` (pixels in [0, 1] [B, C, H, W], or token ids [B, T] for language models)."""
        if count < 1:
            raise ValueError(f"count: expected at least 1 held-out example, got {count}")
        if self.recipe == "classify":
            data = self.task.data
            if data.num_test == 0:
                raise ValueError(f"{self.run_dir}: the run's data {data.name} has no test split")
            images = data.test_images[:count]
            pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            return {"inputs": data.normalize(images), "display": pixels, "labels": data.test_labels[:count]}
        if self.recipe == "restore":
            photos = [p.reshape(p.shape[-3:]) for p in self.task.photos.test_images()[:count]]  # [C, H, W] each
            crop = min(min(p.shape[-2:]) for p in photos)
            x = torch.stack([p[..., :crop, :crop] for p in photos]).float()
            return {"inputs": self.task.operator(x), "display": x}
        block = self.cfg.data.block_size
        val = torch.as_tensor(self.task.corpus.split("val")[: count * block].astype("int64"))
        if val.numel() < block:
            raise ValueError(f"{self.run_dir}: the validation split has fewer than block_size={block} tokens")
        ids = val[: (val.numel() // block) * block].view(-1, block)[:count]
        return {"inputs": ids, "display": ids}

    def decode_tokens(self, ids: torch.Tensor) -> list[str]:
        """Each token id as text (language-model runs)."""
        tokenizer = self.task.tokenizer
        return [tokenizer.decode([int(i)]) for i in ids]


def _load_lm(run_dir: Path):
    import json

    from ..recipes.lm import LMConfig
    from ..train.config import config_from_dict
    from transformers import AutoModelForCausalLM

    raw = json.loads((run_dir / "config.json").read_text())
    if raw.get("task") == "lm":  # runs from before icl became its own recipe carry "task": "lm" and an "icl" section
        raw = {k: v for k, v in raw.items() if k not in ("task", "icl")}
    cfg = config_from_dict(LMConfig, raw)
    hf_dir = run_dir / "hf_model"
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} not found: expected a finished lm run (it exports hf_model/)")
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval(), cfg


def load_run(run_dir: str | Path) -> LoadedRun:
    """The run in ``run_dir`` through its recipe's loader (``classify.load_model``, ``restore.load_model``, the LM's
    exported ``hf_model``); anything else is a ValueError naming what was expected."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"{run_dir}: not a run directory (expected config.json from `unrollattn train "
                         f"{'|'.join(RECIPES_WITH_MODELS)}`)")
    errors = []
    for recipe in RECIPES_WITH_MODELS:
        try:
            if recipe == "lm":
                model, cfg = _load_lm(run_dir)
            else:
                model, cfg = importlib.import_module(f"unrollattn.recipes.{recipe}").load_model(run_dir)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
            errors.append(f"{recipe}: {str(err).splitlines()[0][:160]}")
            continue
        return LoadedRun(run_dir, recipe, model, cfg)
    raise ValueError(f"{run_dir}: not a finished run of {', '.join(RECIPES_WITH_MODELS)} ({'; '.join(errors)})")
