"""Parameter-free attention kernels for any HF model that uses ``AttentionInterface`` (GPT-2, Llama, ...).

Each kernel is registered under one name, prefixed ``unrollattn_``, in BOTH ``AttentionInterface`` and
``AttentionMaskInterface`` (with ``eager_mask``): without the mask entry HF hands the function
``attention_mask=None`` and causal/padding masking silently disappears (docs/integration.md 2.5).
Select one with ``cfg._attn_implementation = "unrollattn_gaussian"``, ``from_config(cfg,
attn_implementation=...)`` or ``model.set_attn_implementation(...)``.

A kernel is a log-kernel ``logits_fn(query, key, *, scaling, module) -> [B, H, Tq, Tk]`` (Nadaraya-Watson
form, papers.md C.9: w_ij = softmax_j(l_ij + m_ij)); the shared wrapper adds the mask, normalises and
averages the values. Learned operators (MSSA, GLR/GTV) cannot enter this way (they need parameters):
use ``patch_gpt2`` or ``UnrollAttnForCausalLM`` (integration.md 2.6).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..registry import HF_KERNELS

PREFIX = "unrollattn_"


def dot_logits(query: torch.Tensor, key: torch.Tensor, *, scaling: float, module=None) -> torch.Tensor:
    """q_i . k_j * scaling: the softmax attention kernel (a reference for the plumbing)."""
    return torch.matmul(query, key.transpose(-1, -2)) * scaling


def gaussian_logits(query: torch.Tensor, key: torch.Tensor, *, scaling: float, module=None) -> torch.Tensor:
    """-||q_i - k_j||^2 / h^2 up to a per-query constant: (2 q_i . k_j - ||k_j||^2) / h^2 (C.9).

    h^2 = 2 / scaling, i.e. h^2 = 2 sqrt(d) for the usual scaling 1/sqrt(d): the bandwidth at which the
    Gaussian kernel differs from the dot-product kernel only by the key-norm term (C.9, first row).
    """
    h2 = 2.0 / scaling
    key_sq = key.pow(2).sum(-1).unsqueeze(-2)  # [B, H, 1, Tk]
    return (2.0 * torch.matmul(query, key.transpose(-1, -2)) - key_sq) / h2


def _match_heads(query: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Repeat grouped key/value heads (GQA/MQA models) to the number of query heads."""
    if states.shape[1] == query.shape[1]:
        return states
    if query.shape[1] % states.shape[1]:
        raise ValueError(f"query heads {query.shape[1]} are not a multiple of key/value heads {states.shape[1]}")
    return states.repeat_interleave(query.shape[1] // states.shape[1], dim=1)


def make_attention_function(logits_fn: Callable) -> Callable:
    """Wrap a log-kernel into HF's attention-function contract.

    ``fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs) -> (out, None)``:
    query/key/value [B, H, T, D]; ``attention_mask`` additive float or bool (True = attend) [B, 1, Tq, Tk]
    or None, in which case ``module.is_causal`` decides causality; out [B, Tq, H, D].
    """

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        key, value = _match_heads(query, key), _match_heads(query, value)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        logits = logits_fn(query.float(), key.float(), scaling=scaling, module=module)
        n_query, n_key = query.shape[-2], key.shape[-2]
        low = torch.finfo(logits.dtype).min
        if attention_mask is None:
            if getattr(module, "is_causal", False) and n_query > 1:
                causal = torch.ones(n_query, n_key, dtype=torch.bool, device=query.device).tril(n_key - n_query)
                logits = logits.masked_fill(~causal, low)
        else:
            mask = attention_mask[..., :n_key]
            logits = logits.masked_fill(~mask, low) if mask.dtype == torch.bool else logits + mask.to(logits.dtype)
        weights = logits.softmax(dim=-1).to(value.dtype)
        weights = F.dropout(weights, p=dropout, training=module.training if module is not None else False)
        return torch.matmul(weights, value).transpose(1, 2).contiguous(), None

    attention.logits_fn = logits_fn
    return attention


def register_hf_kernel(name: str, logits_fn: Callable) -> str:
    """Register ``logits_fn`` as an HF attention implementation (and its eager mask) under ``unrollattn_<name>``.

    Returns the registered name. Re-registering a name replaces it (safe on re-import).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"kernel name must be a non-empty string, got {name!r}")
    full = name if name.startswith(PREFIX) else PREFIX + name
    fn = make_attention_function(logits_fn)
    AttentionInterface.register(full, fn)
    AttentionMaskInterface.register(full, eager_mask)  # without it the function would receive attention_mask=None
    HF_KERNELS.register(full, fn, overwrite=True)
    return full


def list_hf_kernels() -> list[str]:
    return HF_KERNELS.names()


register_hf_kernel("dot", dot_logits)
register_hf_kernel("gaussian", gaussian_logits)

__all__ = ["HF_KERNELS", "dot_logits", "gaussian_logits", "list_hf_kernels", "make_attention_function",
           "register_hf_kernel"]
