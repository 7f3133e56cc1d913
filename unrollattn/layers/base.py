"""The constructor/forward contract shared by every attention layer and block (docs/integration.md 3)."""
from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn as nn

class RecordsAttention:
    """Opt-in record of what a layer's own forward computed — attention weights, a learned graph's edge weights —
    for ``unrollattn.diagnostics.attention_maps``. With ``record_attention`` set (``diagnostics.recording(model)``
    sets it and reads ``recorded`` from a forward hook), a layer computes the explicit weights of its forward and
    passes them to :meth:`record`; unset (the default) nothing extra is computed or kept."""

    record_attention: bool = False

    def record(self, **tensors: torch.Tensor) -> None:
        """Keep detached copies of ``tensors`` in ``self.recorded`` (a dict) while ``record_attention`` is set."""
        if self.record_attention:
            self.__dict__.setdefault("recorded", {}).update({k: v.detach() for k, v in tensors.items()})


class UnknownOptionError(TypeError, ValueError):
    """A keyword no layer option matches (a typo would otherwise silently keep the default). A TypeError like
    any unexpected keyword argument, and a ValueError like every other bad option of the project."""


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

    @property
    def param_dtype(self) -> torch.dtype | None:
        """dtype of the module's floating-point parameters (what its inputs must have); None without any."""
        # read on every call (a decoding step calls it once per layer): the module's own and its children's
        # parameters first, straight from their dicts; the full recursive walk only when they hold none
        for module in (self, *self._modules.values()):
            if module is None:
                continue
            for p in module._parameters.values():
                if p is not None and p.is_floating_point():
                    return p.dtype
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), None)

    @staticmethod
    def _drop_passthrough(owner: str, extra: dict[str, Any], used: set[str] = frozenset()) -> None:
        """Accept (and ignore) timm's keywords (TIMM_PASSTHROUGH); any other keyword not in ``used`` (the
        owner's own options) raises UnknownOptionError naming the closest valid option."""
        unknown = sorted(k for k in extra if k not in TIMM_PASSTHROUGH and k not in used)
        if not unknown:
            return
        valid = sorted(used)
        candidates = valid + sorted(TIMM_PASSTHROUGH)  # a misspelt qkv_bias is worth a hint too
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UnknownOptionError(f"{owner}: unknown option(s) {', '.join(hints)}; valid options: "
                                 f"{', '.join(valid) if valid else '(none)'}")
