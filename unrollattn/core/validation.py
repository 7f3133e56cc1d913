"""Input and option checks shared by every operator, layer, model and config: wrong types, dtypes, shapes and
non-finite values raise ValueError naming what was expected."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

_CHECK_FINITE = True


def set_finite_checks(enabled: bool) -> None:
    """Turn the value checks that read tensors on the host on or off globally: NaN/inf inputs, positive kernel
    bandwidths (each a host sync per call on GPU, and a few small operations per layer and token in decoding)."""
    global _CHECK_FINITE
    _CHECK_FINITE = bool(enabled)


@contextlib.contextmanager
def finite_checks(enabled: bool):
    """The value checks of :func:`set_finite_checks` on or off inside the ``with`` block, the previous setting
    restored after it. A model that has checked its own input runs its layers under ``finite_checks(False)``: each
    layer checking again would cost a host read per layer (a few tensor operations per layer and generated token)."""
    global _CHECK_FINITE
    previous, _CHECK_FINITE = _CHECK_FINITE, _CHECK_FINITE and bool(enabled)
    try:
        yield
    finally:
        _CHECK_FINITE = previous


def finite_checks_enabled() -> bool:
    return _CHECK_FINITE and not torch.compiler.is_compiling()


def check_dtype(x: torch.Tensor, dtype: torch.dtype | None = None, name: str = "x", what: str = "tensor") -> None:
    """Require a floating-point ``x``, of ``dtype`` (the parameters' dtype) when given.

    Under autocast the parameters and activations legitimately differ (autocast casts at each op), so only
    "floating point" is required there."""
    if not x.is_floating_point():
        want = dtype if dtype is not None else "a floating-point dtype"
        raise ValueError(f"{name}: expected a floating-point {what} ({want}), got {x.dtype}")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{name}: expected dtype {dtype} (the parameters' dtype), got {x.dtype}; "
                         f"cast with x.to({dtype}) or the module with .to({x.dtype})")


def check_tokens(x: torch.Tensor, dim: int | None = None, name: str = "x", *, dtype: torch.dtype | None = None) -> None:
    """Require floating-point ``x`` of shape [B, N, dim] with finite values, of ``dtype`` when given."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape [B, N, {dim or 'C'}], got {type(x).__name__}")
    if x.ndim != 3 or (dim is not None and x.shape[-1] != dim):
        raise ValueError(f"{name}: expected shape [B, N, {dim or 'C'}], got {list(x.shape)}")
    check_dtype(x, dtype, name, "token tensor")
    check_finite(x, name)


def check_images(x: torch.Tensor, channels: int | None = None, name: str = "images", *,
                 dtype: torch.dtype | None = None) -> None:
    """Require a float image batch [B, channels, H, W] (normalised, not uint8 pixels), of ``dtype`` when given."""
    want = f"[B, {channels or 'C'}, H, W]"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected an image tensor {want}, got {type(x).__name__}")
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        hint = " (a single image: add the batch axis with x.unsqueeze(0))" if x.ndim == 3 else ""
        raise ValueError(f"{name}: expected an image batch {want}, got shape {list(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a float image tensor {want} (normalised, e.g. "
                         f"ImageClassificationData.normalize or x.float() / 255 then mean/std), got {x.dtype}")
    check_dtype(x, dtype, name, "image tensor")


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    # detached: isfinite's abs would save x for backward, which activation checkpointing's recompute would not expect
    if finite_checks_enabled() and x.is_floating_point() and not torch.isfinite(x.detach()).all():
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


def _type_name(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value, minimum: int | None = 1) -> int:
    """``value`` as an int: an integer (not a bool, not a string) >= ``minimum`` (None: no bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 12.0 from a JSON / YAML file
        else:
            bound = "" if minimum is None else f" >= {minimum}"
            raise ValueError(f"{name}: expected an integer{bound}, got {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None, *,
                open_min: bool = False, open_max: bool = False) -> float:
    """``value`` as a finite float (an int or float, not a bool or string) within [minimum, maximum]
    (``open_min`` / ``open_max`` exclude the bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite number, got {_type_name(value)}")
    value = float(value)
    too_low = minimum is not None and (value <= minimum if open_min else value < minimum)
    too_high = maximum is not None and (value >= maximum if open_max else value > maximum)
    if too_low or too_high:
        bounds = ([f"{'>' if open_min else '>='} {minimum}"] if minimum is not None else []) + \
                 ([f"{'<' if open_max else '<='} {maximum}"] if maximum is not None else [])
        raise ValueError(f"{name}: expected a number {' and '.join(bounds)}, got {value}")
    return value


def check_size_pair(name: str, value) -> tuple[int, int]:
    """An image or patch size: one integer >= 1 or an (H, W) pair of them."""
    pair = value if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name}: expected an integer >= 1 or an (H, W) pair, got {value!r}")
    return check_int(name, pair[0]), check_int(name, pair[1])
