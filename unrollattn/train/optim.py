"""Optimizer and learning-rate schedule built from :class:`OptimConfig`.

Lion and the weight-decay groups are timm's (:class:`timm.optim.Lion`, ``param_groups_weight_decay``); the decay
of the schedule is the lambda that transformers' ``get_wsd_schedule`` wraps. Only the warm-up is ours: its first
update is at ``lr / warmup_steps`` and it reaches ``lr`` at step ``warmup_steps - 1``, where transformers' warm-ups
start at 0 (WSD: at ``min_lr_ratio``) and reach ``lr`` one step later.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.optim import Lion, param_groups_weight_decay
from torch import nn
from transformers.optimization import _get_wsd_scheduler_lambda  # what get_wsd_schedule wraps in a LambdaLR

from .config import OPTIMIZERS, SCHEDULES, ConfigError, OptimConfig
from ..utils.dist import unwrap_model

__all__ = ["Lion", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on matrices, none on biases, norm scales, other 1-D params and the
    names listed by the model's ``no_weight_decay()`` (timm convention, e.g. ``pos_embed``)."""
    core = unwrap_model(model)
    skip = core.no_weight_decay() if hasattr(core, "no_weight_decay") else ()
    # timm puts every parameter in one group when the decay is 0: split with a stand-in decay, then set the real one,
    # so that the groups (the optimizer state a checkpoint holds) do not depend on weight_decay; decay group first
    groups = sorted(param_groups_weight_decay(core, 1.0, no_weight_decay_list=skip), key=lambda g: -g["weight_decay"])
    if not groups:
        raise ValueError(f"model {type(core).__name__} has no trainable parameters")
    for group in groups:
        group["weight_decay"] = weight_decay if group["weight_decay"] else 0.0
    return groups


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW / SGD (momentum = ``betas[0]``) / Lion over :func:`param_groups` of ``model``."""
    groups = param_groups(model, optim.weight_decay)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas))
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.betas[0])
    if optim.name == "lion":
        return Lion(groups, lr=optim.lr, betas=tuple(optim.betas))
    raise ConfigError(f"optim.name: expected one of {', '.join(OPTIMIZERS)}, got {optim.name!r}")


def _decay(optim: OptimConfig, max_steps: int):
    """Factor after the warm-up: 1 (constant), or transformers' WSD lambda decaying (cosine / linear) from 1 right
    after the warm-up to ``min_lr_ratio`` at step ``max_steps - 1``, and that floor after."""
    if optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: expected one of {', '.join(SCHEDULES)}, got {optim.schedule!r}")
    if optim.schedule == "constant":
        return lambda step: 1.0
    return partial(_get_wsd_scheduler_lambda, num_warmup_steps=optim.warmup_steps, num_stable_steps=0,
                   num_decay_steps=max(1, max_steps - 1 - optim.warmup_steps), warmup_type="linear",
                   decay_type=optim.schedule, min_lr_ratio=optim.min_lr_ratio, num_cycles=0.5)


def _warmup_then(decay, warmup_steps: int):
    def factor(step: int) -> float:  # a closure: LambdaLR saves no state of it, as before
        return (step + 1) / warmup_steps if step < warmup_steps else decay(step)

    return factor


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for optimizer step ``step`` (0-based): linear warm-up, then decay
    to ``min_lr_ratio`` at the last step (cosine / linear) or constant."""
    return _warmup_then(_decay(optim, max_steps), optim.warmup_steps)(step)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following :func:`lr_factor`; call ``scheduler.step()`` once after every optimizer step.

    The schedule is not saved in the scheduler's state (only the step count is), so a resumed run follows the
    schedule of its current config, e.g. a longer ``max_steps``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps: expected an int >= 1, got {max_steps!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then(_decay(optim, max_steps), optim.warmup_steps))
