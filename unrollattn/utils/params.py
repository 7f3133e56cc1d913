"""Parameter counting: totals, and the layer stack (the repeated blocks) that depth scales, for parameter matching."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

STACK_PATHS = ("blocks", "transformer.h", "h", "model.blocks")  # timm ViT, HF causal LM / GPT-2, a base model, features


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Distinct parameters (tied weights counted once; ``parameters()`` yields a shared tensor once), optionally only
    those that require gradients; works on the meta device and through DDP wrappers."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def layer_stack(model: nn.Module) -> nn.Module:
    """The model's stack of repeated layers (``blocks`` of a timm ViT, ``transformer.h`` of an HF causal LM)."""
    for path in STACK_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module):
            return module
    raise ValueError(f"{type(model).__name__}: no layer stack found (expected one of the attributes "
                     f"{', '.join(STACK_PATHS)} holding the repeated layers)")


def stack_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters of the layer stack, number of layers)."""
    stack = layer_stack(model)
    return count_parameters(stack), len(stack)


def matching_depth(per_layer: int, target: int) -> int:
    """The layer count whose stack is closest to ``target`` parameters at ``per_layer`` each (at least 1)."""
    if per_layer <= 0:
        raise ValueError(f"per_layer: expected a positive parameter count, got {per_layer}")
    return max(1, round(target / per_layer))


MATCH_TOLERANCE = 0.02  # parameter matching: the layer stack within 2% of the reference's


def matching_shape(per_layer: Callable[[int], int], target: int, *, width: int, width_step: int,
                   tolerance: float = MATCH_TOLERANCE) -> tuple[int, int]:
    """(depth, width) of a stack of identical layers with ``per_layer(width)`` parameters each, closest to ``target``.

    Depth first: the matching depth at ``width`` when its stack is within ``tolerance`` of ``target``. Where no depth
    is (a layer is too large a share of the target), the width nearest ``width`` at which a depth is: multiples of
    ``width_step`` (the head count, so heads divide it) between half and twice ``width``; ``per_layer`` may raise
    ValueError for a width a layer cannot take, which is skipped. With no such width, the closest shape found.
    """
    if target <= 0 or width < 1 or width_step < 1:
        raise ValueError(f"matching_shape: expected positive target, width and width_step, got {target}, {width}, "
                         f"{width_step}")

    def miss(depth: int, per: int) -> float:
        return abs(depth * per - target) / target

    per = per_layer(width)
    depth = matching_depth(per, target)
    best = (miss(depth, per), depth, width)
    if best[0] <= tolerance:
        return depth, width
    candidates = [w for w in range(width_step, 2 * width + 1, width_step) if w != width and 2 * w >= width]
    for w in sorted(candidates, key=lambda w: (abs(w - width), w)):
        try:
            per = per_layer(w)
        except ValueError:
            continue
        depth = matching_depth(per, target)
        shape = (miss(depth, per), depth, w)
        if shape[0] <= tolerance:
            return depth, w
        best = min(best, shape)
    return best[1], best[2]


__all__ = ["MATCH_TOLERANCE", "STACK_PATHS", "count_parameters", "layer_stack", "matching_depth", "matching_shape",
           "stack_parameters"]
