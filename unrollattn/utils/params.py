"""Parameter counting: totals, and the layer stack (the repeated blocks) that depth scales, for parameter matching."""
from __future__ import annotations

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


__all__ = ["STACK_PATHS", "count_parameters", "layer_stack", "matching_depth", "stack_parameters"]
