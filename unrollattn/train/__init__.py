"""Shared training pieces used by every recipe: config, the recipe command line, distributed, checkpoint, run log,
the loop, ablation tables.

A recipe defines a config dataclass (with ``OptimConfig`` / ``LoopConfig`` sections), presets as
functions in a :class:`unrollattn.registry.Registry`, and a :class:`Task`; :func:`fit` trains it::

    cfg = load_preset(PRESETS, args.preset, args.overrides)
    summary = fit(MyTask(cfg), cfg.loop, cfg.optim, run_name_prefix=f"mytask-{args.preset}", config_for_log=cfg)
"""
from .ablate import compare, comparison_figure, plot_comparison
from .checkpoint import (
    CheckpointError, checkpoint_dir_for_step, latest_checkpoint, list_checkpoints, load_checkpoint, load_latest_weights,
    prune_checkpoints,
    save_checkpoint, verify_checkpoint,
)
from .config import (
    RESUME_MUTABLE_KEYS, ConfigError, LoopConfig, OptimConfig, apply_overrides, config_from_dict, config_to_dict,
    load_preset, read_run_config, resume_config_changes,
)
from .distributed import cleanup, init_distributed, resolve_device, wrap_model
from .entry import INTERRUPTED_EXIT, add_config_arguments, config_help, recipe_main, resume_command
from .optim import Lion, build_optimizer, build_scheduler, lr_factor, param_groups
from .runlog import RunDir, RunDirError, curves_figure, env_info, plot_curves, progress_bar, read_metrics
from .trainer import Task, TrainingInterrupted, count_params, epoch_batch_indices, fit, to_device

__all__ = [
    "CheckpointError", "ConfigError", "INTERRUPTED_EXIT", "Lion", "LoopConfig", "OptimConfig",
    "RESUME_MUTABLE_KEYS", "RunDir", "RunDirError", "Task", "TrainingInterrupted", "add_config_arguments",
    "apply_overrides", "build_optimizer", "build_scheduler", "checkpoint_dir_for_step", "cleanup", "compare",
    "comparison_figure", "config_from_dict", "config_help", "config_to_dict", "count_params", "curves_figure",
    "env_info", "epoch_batch_indices", "fit", "init_distributed", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_latest_weights", "load_preset", "lr_factor", "param_groups", "plot_comparison",
    "plot_curves", "progress_bar", "prune_checkpoints", "read_metrics", "read_run_config", "recipe_main",
    "resolve_device", "resume_command", "resume_config_changes", "save_checkpoint", "to_device",
    "verify_checkpoint", "wrap_model",
]
