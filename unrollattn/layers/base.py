"""The constructor/forward contract shared by every attention layer and block (DESIGN.md, Contracts)."""
from __future__ import annotations

import warnings
from typing import Any

import torch.nn as nn

# Keywords timm's VisionTransformer / Block pass that a layer may not use; accepted and ignored.
TIMM_PASSTHROUGH = frozenset({
    "qk_norm", "scale_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "norm_layer", "device", "dtype",
    "depth", "attn_head_dim", "dim_out", "gated", "fused_attn", "rope", "num_prefix_tokens", "attn_layer",
    "mlp_ratio", "mlp_layer", "act_layer", "init_values", "drop_path", "qkv_bias", "attn_drop", "proj_drop",
})


class Configurable(nn.Module):
    """``Cls.with_options(**opts)`` returns a real subclass whose constructor defaults to ``opts``.

    timm's ``attn_layer=`` / ``block_fn=`` need a class (not a functools.partial), so options such as
    a nonlinearity or an ISTA step size are bound by subclassing.
    """

    bound_options: dict[str, Any] = {}

    @classmethod
    def with_options(cls, **options) -> type:
        if not options:
            return cls
        merged = {**cls.bound_options, **options}
        tag = ",".join(f"{k}={v!r}" for k, v in sorted(options.items()))
        return type(cls.__name__, (cls,), {"bound_options": merged, "__qualname__": f"{cls.__qualname__}[{tag}]",
                                           "__module__": cls.__module__})

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)

    @staticmethod
    def _drop_passthrough(owner: str, extra: dict[str, Any], used: set[str] = frozenset()) -> None:
        unknown = sorted(k for k in extra if k not in TIMM_PASSTHROUGH and k not in used)
        if unknown:
            warnings.warn(f"{owner}: ignoring unknown keyword(s) {unknown}", stacklevel=3)
