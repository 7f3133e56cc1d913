"""Recipe "icl": in-context linear regression (Garg et al. style) with the lm recipe's causal backbones.

Single process (CPU or one GPU)::

    python -m unrollattn.recipes.icl --preset quick model.variant=aot_mhsa
    unrollattn train icl --preset quick model.variant=aot_mssa data.dim=5 data.n_points=20

Ablation (one table + the error curves of every variant)::

    unrollattn ablate icl --variants gpt2,aot_mhsa,aot_mssa --preset quick

A prompt is the 2k tokens x_1, y_1, ..., x_k, y_k with x, w ~ N(0, I_d) and y_i = w.x_i (+ ``data.noise_std``
noise), drawn afresh every step; the model reads it through a linear map, runs a causal backbone on
``inputs_embeds`` and predicts each y_i at the token of x_i, from the i - 1 pairs before it
(:class:`unrollattn.language.evaluation.ICLRegressionTask`). The backbone is the base model of an lm-recipe model:
``model`` is the lm recipe's section (a registered causal-LM variant, or ``model.attention`` / ``model.block``;
``model.match_params`` sizes it to a reference's layer stack).

Metrics on ``data.eval_prompts`` fixed prompts: ``val_loss`` (squared error / d, mean over the k positions) and
``icl_err_k<i>`` after i in-context examples, with the aliases ``icl_err_k1``, ``icl_err_kd``, ``icl_err_k2d`` and
``icl_err_klast``. Every run writes ``icl_curve.csv`` / ``.md`` / ``.png`` (the whole curve next to least squares and
the zero estimator) and refreshes ``icl_curves.*`` in ``loop.out_dir`` with the curves of every run there.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from unrollattn.language.evaluation import ICLData, ICLRegressionTask, write_icl_curves
from unrollattn.recipes.lm import (
    VARIANT_KEY, ModelConfig, available_variants, build_lm, derived_fields, model_description, parse_model_label,
)
from unrollattn.registry import Registry
from unrollattn.train import ConfigError, LoopConfig, OptimConfig, apply_overrides, fit, recipe_main

__all__ = [
    "DEFAULT_PRESET", "ICLConfig", "ICLTask", "PRESETS", "PromptConfig", "VARIANTS", "VARIANT_KEY",
    "ablation_columns", "ablation_metric", "available_variants", "combine_icl_curves", "load_config", "main",
    "error_aliases", "parse_model_label", "run",
]

DEFAULT_PRESET = "quick"  # what `python -m unrollattn.recipes.icl` and `unrollattn ablate icl` run without --preset
VARIANTS = available_variants()

# summary key -> column header of the ablation table
ablation_columns = {"params": "params", "params_non_embedding": "non-emb params", "params_stack": "layer-stack params",
                    "params_reference": "reference stack", "n_layer": "layers",
                    "val_loss": "val loss (err/d)", "icl_err_k1": "err k=1", "icl_err_kd": "err k=d",
                    "icl_err_k2d": "err k=2d", "icl_err_klast": "err k=max", "tokens_per_s": "train tok/s",
                    "peak_mem_mb": "peak mem MB", "wall_s": "wall s"}
ablation_metric = "val_loss"


# ----------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class PromptConfig:
    """The prompts: x, w ~ N(0, I_dim), ``n_points`` (x, w.x + noise) pairs per prompt, ``noise_std`` the label
    noise, ``eval_prompts`` fixed prompts for the evaluation."""

    dim: int = 5
    n_points: int = 20
    noise_std: float = 0.0
    eval_prompts: int = 1000

    def __post_init__(self):
        ICLData(self.dim, self.n_points, self.noise_std, self.eval_prompts)  # raises ValueError on bad values


@dataclasses.dataclass
class ICLConfig:
    """The whole run: the backbone (``model``, the lm recipe's section), the prompts (``data``), ``loop`` and
    ``optim``."""

    preset: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def __post_init__(self):
        context, need = self.model.n_positions, 2 * self.data.n_points
        if context is not None and need > context:
            raise ConfigError(f"2 * data.n_points = {need} tokens exceeds the model's context "
                              f"model.n_positions={context}")


# ----------------------------------------------------------------------------------------------------- task


class ICLTask(ICLRegressionTask):
    """The regression task of ``cfg`` with the run's description, the error aliases and the combined curves of
    ``loop.out_dir`` (refreshed by its export)."""

    def __init__(self, cfg: ICLConfig):
        self.cfg = cfg
        prompts = cfg.data
        self.n_positions = cfg.model.n_positions or 2 * prompts.n_points
        with torch.device("meta"):
            width = self._backbone().config.n_embd
        super().__init__(self._backbone, width,
                         ICLData(prompts.dim, prompts.n_points, prompts.noise_std, prompts.eval_prompts),
                         batch_size=cfg.loop.batch_size, grad_accum=cfg.loop.grad_accum, seed=cfg.loop.seed,
                         label=cfg.model.label)

    def _backbone(self) -> nn.Module:
        """The base model of the lm recipe's model (``GPT2Model`` / ``UnrollAttnModel``): the LM head is not used."""
        return build_lm(self.cfg.model, vocab_size=1, eos_token_id=None, n_positions=self.n_positions).transformer

    def export(self, model: nn.Module, run_dir: Path) -> None:
        super().export(model, run_dir)
        combine_icl_curves(Path(run_dir).parent)

    def run_info(self) -> dict[str, Any]:
        """The backbone (the lm recipe's :func:`~unrollattn.recipes.lm.model_description`) and the prompts."""
        with torch.device("meta"):
            backbone = self._backbone()
        return {**model_description(self.cfg.model, backbone), "icl_dim": self.cfg.data.dim,
                "icl_points": self.cfg.data.n_points}

    def summary_fields(self, summary: dict[str, Any]) -> dict[str, Any]:
        """:func:`error_aliases`, where the combined curves are, and the lm recipe's table fields."""
        aliases = error_aliases(summary, self.cfg.data)
        return {**aliases, "icl_curves": str(Path(summary["run_dir"]).parent / "icl_curves.md"),
                **derived_fields({**summary, **aliases}, ablation_columns)}


def error_aliases(summary: dict[str, Any], prompts: PromptConfig) -> dict[str, float]:
    """``icl_err_kd``, ``icl_err_k2d``, ``icl_err_klast``: the errors after d, 2d and k - 1 examples (NaN when the
    evaluation did not report that point)."""
    d, k = prompts.dim, prompts.n_points
    return {alias: summary.get(f"icl_err_k{i}", math.nan)
            for alias, i in (("icl_err_kd", d), ("icl_err_k2d", 2 * d), ("icl_err_klast", k - 1))}


def combine_icl_curves(out_dir: Path) -> Path | None:
    """``out_dir/icl_curves.{csv,md,png}`` from every run directory in ``out_dir`` that has an ``icl_curve.csv``
    (e.g. the variants of one ablation): each run's column, with the baselines of the first run. Returns the
    markdown path, None when no run there has a curve."""
    rows: dict[int, dict[str, float]] = {}
    found = False
    for run_dir in sorted(p for p in Path(out_dir).iterdir() if (p / "icl_curve.csv").is_file()):
        with open(run_dir / "icl_curve.csv", newline="") as f:
            reader = list(csv.DictReader(f))
        series = [c for c in reader[0] if c not in ("k", "least_squares", "zero")] if reader else []
        for r in reader:
            row = rows.setdefault(int(r["k"]), {"k": int(r["k"])})
            for s in series:
                row[run_dir.name if len(series) == 1 else f"{run_dir.name}/{s}"] = float(r[s])
            for base in ("least_squares", "zero"):
                row.setdefault(base, float(r[base]))
        found = True
    if not found:
        return None
    ordered = [rows[k] for k in sorted(rows)]
    names = [c for c in ordered[0] if c not in ("k", "least_squares", "zero")]
    ordered = [{"k": r["k"], **{n: r.get(n, math.nan) for n in names}, "least_squares": r["least_squares"],
                "zero": r["zero"]} for r in ordered]
    return write_icl_curves(ordered, Path(out_dir), stem="icl_curves",
                            title="in-context linear regression: " + ", ".join(names))["md"]


# ----------------------------------------------------------------------------------------------------- presets

PRESETS = Registry("icl preset")


@PRESETS.register("quick")
def quick() -> ICLConfig:
    """CPU, a few minutes per variant: d = 3 and 12 (x, y) pairs per prompt (24 tokens), width 64, 4 heads,
    GPT-2-equivalent depth 4, 1000 steps of 64 fresh prompts (no curriculum), error vs k over 1000 fixed prompts.
    (d = 5 needs far more steps than a CPU preset affords: 600 steps stay at the zero-estimator error.)"""
    return ICLConfig(
        preset="quick",
        model=ModelConfig(variant="gpt2", size="tiny", depth=4, match_params="gpt2", n_embd=64, n_head=4),
        data=PromptConfig(dim=3, n_points=12, noise_std=0.0, eval_prompts=1000),
        loop=LoopConfig(max_steps=1000, batch_size=64, eval_every=250, log_every=50, ckpt_every=0),
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99), warmup_steps=50, schedule="cosine",
                          min_lr_ratio=0.1, grad_clip=1.0),
    )


# ----------------------------------------------------------------------------------------------------- entry points


def load_config(preset: str = DEFAULT_PRESET, overrides: Sequence[str] | None = None, *,
                resume: bool = False) -> ICLConfig:
    """Preset ``preset`` with ``key=value`` overrides applied (``resume`` sets ``loop.resume``)."""
    cfg = apply_overrides(PRESETS.get(preset)(), list(overrides or []))
    return apply_overrides(cfg, ["loop.resume=true"]) if resume else cfg


def run(cfg: ICLConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg``; return fit's summary (also result.json) with the backbone's description and the
    error aliases (:meth:`ICLTask.run_info`, :meth:`ICLTask.summary_fields`)."""
    return fit(ICLTask(cfg), cfg.loop, cfg.optim, run_name_prefix=f"icl-{cfg.preset}-{cfg.model.label}",
               config_for_log=cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[--preset NAME] [--resume] [key=value ...]``; prints the summary as JSON."""
    return recipe_main(argv, prog="python -m unrollattn.recipes.icl", description=__doc__.split("\n\n")[0],
                       presets=PRESETS, default_preset=DEFAULT_PRESET, load_config=load_config, run=run)


if __name__ == "__main__":
    from unrollattn.utils.errors import exit_on_error

    sys.exit(exit_on_error(main))
