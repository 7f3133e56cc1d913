"""Input checks shared by every operator: wrong shapes and non-finite values raise ValueError."""
from __future__ import annotations

import torch

_CHECK_FINITE = True


def set_finite_checks(enabled: bool) -> None:
    """Turn the NaN/inf input check on or off globally (it costs a host sync per call on GPU)."""
    global _CHECK_FINITE
    _CHECK_FINITE = bool(enabled)


def finite_checks_enabled() -> bool:
    return _CHECK_FINITE and not torch.compiler.is_compiling()


def check_tokens(x: torch.Tensor, dim: int | None = None, name: str = "x") -> None:
    """Require ``x`` of shape [B, N, dim] with finite values."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape [B, N, {dim or 'C'}], got {type(x).__name__}")
    if x.ndim != 3 or (dim is not None and x.shape[-1] != dim):
        raise ValueError(f"{name}: expected shape [B, N, {dim or 'C'}], got {list(x.shape)}")
    check_finite(x, name)


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    if finite_checks_enabled() and x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


def check_heads(dim: int, num_heads: int, head_dim: int | None = None) -> int:
    """Validate a (width, heads) pair and return the head dimension."""
    if dim <= 0 or num_heads <= 0:
        raise ValueError(f"expected positive dim and num_heads, got dim={dim}, num_heads={num_heads}")
    if head_dim is None:
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads} (or pass head_dim=)")
        return dim // num_heads
    if head_dim <= 0:
        raise ValueError(f"expected positive head_dim, got {head_dim}")
    return head_dim


def check_mask(attn_mask: torch.Tensor | None, batch: int, heads: int, n_query: int, n_key: int) -> None:
    """Masks broadcast to [B, H, N_q, N_k]: bool (True = attend) or additive float."""
    if attn_mask is None:
        return
    if attn_mask.ndim > 4 or attn_mask.ndim < 2:
        raise ValueError(f"attn_mask: expected a shape broadcastable to [{batch}, {heads}, {n_query}, {n_key}], got {list(attn_mask.shape)}")
    try:
        torch.broadcast_shapes(attn_mask.shape, (batch, heads, n_query, n_key))
    except RuntimeError:
        raise ValueError(f"attn_mask: expected a shape broadcastable to [{batch}, {heads}, {n_query}, {n_key}], got {list(attn_mask.shape)}") from None
