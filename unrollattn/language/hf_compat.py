"""What unrollattn's HF models take from a transformers release, in one place.

transformers 5.24 renamed the cache argument of every forward from ``past_key_values`` to ``cache`` (the old name
still reaches a forward written for it only when a caller uses it). Our forwards accept both, return the cache
under the field the running release declares, and reject keywords they do not know instead of swallowing them:
a future rename then fails loudly, naming the release, instead of decoding without the past.
"""
from __future__ import annotations

from typing import Any, Iterable

import transformers
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..utils.versions import declared_requirements

# the output field that carries the cache ("cache" since 5.24, "past_key_values" before)
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# keywords HF's generate / pipeline / Trainer may pass that need no action from our models
IGNORED_KEYWORDS = frozenset({"cache_position", "output_attentions", "token_type_ids", "return_dict"})
LOSS_KEYWORDS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})


def supported_transformers() -> str:
    req = declared_requirements().get("transformers")
    return f"transformers{req.specifier}" if req is not None else "the declared transformers range"


def take_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache passed under either name (both at once is an error)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: as cache= (transformers >= 5.24) or past_key_values=, not both")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(f"cache: expected a transformers Cache (DynamicCache, StaticCache, ...), got "
                         f"{type(cache).__name__}; legacy tuples of tensors are not supported")
    return cache


def check_keywords(owner: str, kwargs: dict[str, Any], accepted: Iterable[str] = ()) -> None:
    """Raise TypeError for keywords ``owner`` does not know (``accepted`` are handled by the caller)."""
    known = IGNORED_KEYWORDS | set(accepted)
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        caches = [k for k in unknown if isinstance(kwargs[k], Cache)]
        what = f"a KV cache under the unknown name(s) {caches}" if caches else f"unexpected keyword(s) {unknown}"
        raise TypeError(f"{owner}.forward got {what} from transformers {transformers.__version__}; unrollattn was "
                        f"written for {supported_transformers()}: install a release in that range")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{owner}: output_attentions=True is not supported (read attention maps with forward hooks "
                         "on the attention layers)")


def with_cache(output_cls, cache: Cache | None, **fields):
    """``output_cls(**fields)`` with the cache under the running release's field name."""
    return output_cls(**fields, **{CACHE_FIELD: cache})


__all__ = ["CACHE_FIELD", "check_keywords", "supported_transformers", "take_cache", "with_cache"]
