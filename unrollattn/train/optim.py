"""Optimizer and learning-rate schedule built from :class:`OptimConfig`."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import OPTIMIZERS, SCHEDULES, ConfigError, OptimConfig
from .distributed import unwrap_model

__all__ = ["Lion", "build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an interpolated momentum.

    Use a learning rate 3-10x smaller and a weight decay 3-10x larger than for AdamW.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lion: expected lr >= 0 and betas in [0, 1), got lr={lr}, betas={betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(exp_avg.lerp(p.grad, 1 - beta1).sign_(), alpha=-group["lr"])
                exp_avg.lerp_(p.grad, 1 - beta2)
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight decay on matrices, none on biases, norm scales, other 1-D params and the
    names listed by the model's ``no_weight_decay()`` (timm convention, e.g. ``pos_embed``)."""
    core = unwrap_model(model)
    skip = set(core.no_weight_decay()) if hasattr(core, "no_weight_decay") else set()
    decay, no_decay, seen = [], [], set()
    for name, p in core.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError(f"model {type(core).__name__} has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for optimizer step ``step`` (0-based): linear warm-up, then decay
    to ``min_lr_ratio`` at the last step (cosine / linear) or constant."""
    if optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: expected one of {', '.join(SCHEDULES)}, got {optim.schedule!r}")
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - 1 - optim.warmup_steps)
    progress = min(1.0, max(0.0, (step - optim.warmup_steps) / decay_steps))
    floor = optim.min_lr_ratio
    if optim.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following :func:`lr_factor`; call ``scheduler.step()`` once after every optimizer step.

    The schedule is a closure (not saved in the scheduler's state), so a resumed run follows the
    schedule of its current config, e.g. a longer ``max_steps``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps: expected an int >= 1, got {max_steps!r}")

    def factor(step: int) -> float:
        return lr_factor(step, optim, max_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
