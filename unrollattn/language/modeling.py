"""HF causal language model over any registered attention and block (docs/integration.md 2.2).

``UnrollAttnForCausalLM`` = token + learned position embeddings (or none: ``position_embedding="none"``, for
attentions that model position themselves, e.g. bilateral) -> ``n_layer`` registry blocks (causal) -> final
LayerNorm -> LM head tied to the token embedding. The same scaffold gives AoT-MSSA, AoT-MHSA, causal CRATE, the
kernel-regression transformers (bilateral, gaussian, twicing) and an in-house softmax transformer, so variants differ
only in the block/attention. ``boost`` blocks with rule ``anchor`` (B3) pull toward the layer-0 input (the
embeddings), which the model hands them on every forward (with a KV cache: layer 0's cached prefix).

KV cache (HF ``DynamicCache``, one cache layer per block):

- ``mhsa``: the per-head keys and values, as in any transformer; a new token costs O(T d) per layer.
- ``mssa``: the shared projection U_k^T z (query = key = value, papers.md B.2) is stored once as the keys;
  the cache's value slot holds a zero-width tensor, so the cache costs d numbers per token per layer
  (half of MHSA's 2d) and a new token costs O(T d) per layer.
- any other attention inside a ``transformer`` / ``aot`` / ``crate`` block: the attention *input*
  (normalised hidden states) is cached and the layer recomputes attention over the whole prefix for the
  new queries (O(T^2) per new token), since a generic layer exposes no query/key split.
- any other block (one that calls its attention more than once, e.g. a boosting residual): the *block
  input* is cached and the whole block is recomputed over the prefix (O(T^2) per new token).

The non-attention parts of the known blocks (LayerNorm, MLP, ISTA) act per token, so a cached step runs
them on the new tokens only. All paths give the same logits as the uncached forward (tested).
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from ..core.subspace import attention_weights, combine_masks, merge_heads, split_heads
from ..core.validation import check_tokens
from ..layers.attention import MultiHeadSelfAttention, MultiHeadSubspaceSelfAttention
from ..layers.blocks import ISTA, AoTBlock, CrateBlock, TransformerBlock, attach_layer_zero_input
from ..registry import MODELS, build_model, get_block, list_models, register_model
from .configuration import UnrollAttnConfig

# Blocks whose forward calls ``self.attn`` exactly once and is otherwise per-token: the cached step may run
# them on the new tokens only, with a cache-aware stand-in for ``self.attn``.
SINGLE_ATTENTION_BLOCKS = (TransformerBlock, AoTBlock, CrateBlock)


# --------------------------------------------------------------------------------------------------------------
# cached attention (shared with the GPT-2 module swap in gpt2.py)
# --------------------------------------------------------------------------------------------------------------

def _uses_attend_of(layer: nn.Module, cls: type) -> bool:
    """True when ``layer`` is ``cls`` or a subclass that keeps ``cls``'s token mixing (e.g. ``with_options``)."""
    return isinstance(layer, cls) and type(layer).attend is cls.attend


def offset_causal_mask(n_query: int, n_key: int, device) -> torch.Tensor:
    """Bool [Tq, Tk]: query i (absolute position n_key - n_query + i) sees keys j <= its position."""
    return torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(n_key - n_query)


def _sdpa(q, k, v, mask, dropout_p: float, scale: float | None):
    """SDPA of new queries against all cached keys; ``mask`` None means plain causal (with the cache offset)."""
    n_query, n_key = q.shape[-2], k.shape[-2]
    is_causal = False
    if mask is None and n_query > 1:
        if n_query == n_key:
            is_causal = True
        else:
            mask = offset_causal_mask(n_query, n_key, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


def _store(cache: Cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Append to the cache; ``values=None`` stores a zero-width value tensor (keys only)."""
    return cache.update(keys, keys[..., :0] if values is None else values, layer_idx)


def nonempty_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Let a query that may see no key (a padding token) see every key instead.

    Its output is never read by valid tokens (they never attend to padding), while an empty row would give NaN
    that reaches them through 0 * NaN in the value average of the next layer.
    """
    return None if mask is None else mask | ~mask.any(dim=-1, keepdim=True)


def full_prefix_mask(mask: torch.Tensor | None, n_key: int, device) -> torch.Tensor | None:
    """Bool [B, 1, Tk, Tk] causal + key-padding mask of the whole prefix, rebuilt from the new queries' raw mask.

    ``mask`` [B, 1, Tq, Tk] is causal & key-is-a-token (HF's masks and ours, before ``nonempty_rows``): a key is
    a token exactly when some new query attends to it.
    """
    if mask is None:
        return None
    keys_valid = mask.to(torch.bool).any(dim=-2, keepdim=True)
    return nonempty_rows(offset_causal_mask(n_key, n_key, device) & keys_valid)


def cached_attention(layer: nn.Module, x: torch.Tensor, cache: Cache, layer_idx: int,
                     mask: torch.Tensor | None = None, *, compact: bool = True) -> torch.Tensor:
    """Causal attention of the new tokens ``x`` [B, Tq, C] against the cached prefix, updating ``cache``.

    ``mask``: raw bool [B, 1, Tq, Tk] = causal & key-is-a-token (True = attend; padded queries may have empty rows)
    or None for plain causal attention (new queries are the last Tq positions).
    ``compact``: store keys only where values equal keys (MSSA) or are not needed (generic fallback);
    ``False`` stores a second copy as values, which fixed-size caches (``StaticCache``) require.
    """
    check_tokens(x, layer.dim)
    b, n, _ = x.shape
    dropout_p = layer.attn_drop_p if layer.training else 0.0
    raw_mask, mask = mask, nonempty_rows(mask)
    if _uses_attend_of(layer, MultiHeadSelfAttention):
        q, k, v = layer.qkv(x).view(b, n, 3, layer.num_heads, layer.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k, v = cache.update(k, v, layer_idx)
        return layer.proj_drop(layer.proj(merge_heads(_sdpa(q, k, v, mask, dropout_p, None))))
    if _uses_attend_of(layer, MultiHeadSubspaceSelfAttention):
        u = split_heads(F.linear(x, layer.subspace.weight, layer.subspace.bias), layer.num_heads)  # U_k^T z (B.2)
        keys, _ = _store(cache, layer_idx, u, None if compact else u)
        if layer.nonlinearity == "softmax":
            heads = _sdpa(u, keys, keys, mask, dropout_p, layer.scale)  # SA(U^T z, U^T Z, U^T Z) per head (B.3)
        else:
            scale = layer.head_dim ** -0.5 if layer.scale is None else layer.scale
            scores = u @ keys.transpose(-2, -1) * scale
            scores = scores + combine_masks(mask, mask is None, n, keys.shape[-2], x.device, scores.dtype)
            weights = attention_weights(scores, layer.nonlinearity, layer.threshold)
            heads = F.dropout(weights, dropout_p) @ keys if dropout_p > 0 else weights @ keys
        heads = merge_heads(heads)
        if layer.tied_output:  # U_out = [U_1, ..., U_K] scaled by eta (B.2)
            return layer.proj_drop(layer.step_size * F.linear(heads, layer.subspace.weight.t()))
        return layer.proj_drop(layer.proj(heads))
    # Generic layer: cache its inputs and recompute over the prefix (O(T^2) per new token).
    past = cache.get_seq_length(layer_idx)
    inputs, _ = _store(cache, layer_idx, x[:, None], None if compact else x[:, None])
    if inputs.shape[-2] != past + n:
        raise ValueError(f"{type(layer).__name__} recomputes attention over the cached prefix and needs a growing "
                         f"cache (DynamicCache); got {type(cache).__name__} holding {inputs.shape[-2]} slots")
    prefix = inputs[:, 0]
    out = layer(prefix, attn_mask=full_prefix_mask(raw_mask, prefix.shape[1], x.device), is_causal=True)
    return out[:, -n:]


class _CachedAttentionCall:
    """Stands in for ``block.attn`` during one cached block call (keeps the block's own residual/MLP/ISTA code)."""

    def __init__(self, layer: nn.Module, cache: Cache, layer_idx: int, mask: torch.Tensor | None):
        self.layer, self.cache, self.layer_idx, self.mask = layer, cache, layer_idx, mask
        self.calls = 0

    def __call__(self, x, attn_mask=None, is_causal=False, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("a single-attention block called its attention twice; the cache would be corrupted")
        return cached_attention(self.layer, x, self.cache, self.layer_idx, self.mask)


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------

class UnrollAttnBlock(GradientCheckpointingLayer):
    """One layer: a registry block (``config.block``) with a registry attention (``config.attention``), causal."""

    def __init__(self, config: UnrollAttnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        block_cls = get_block(config.block)
        options = dict(config.block_options)
        if "use_norm" in getattr(block_cls, "option_names", ()):
            options.setdefault("use_norm", config.use_layer_norm)
        self.block = block_cls(
            config.n_embd, config.n_head, config.mlp_ratio, qkv_bias=config.bias, proj_bias=config.bias,
            proj_drop=config.dropout, attn_drop=config.dropout,
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_epsilon, bias=config.bias),
            act_layer=partial(nn.GELU, approximate="tanh"), mlp_layer=partial(Mlp, bias=config.bias),
            attn_layer=config.attention, attn_options={**config.attn_options, "head_dim": config.head_dim}, **options)
        # Output maps that write into the residual stream: N(0, std / sqrt(#branches)) as GPT-2 (tag read by _init_weights).
        residual = [getattr(self.block.attn, "proj", None), getattr(getattr(self.block, "mlp", None), "fc2", None),
                    getattr(getattr(self.block, "ista", None), "decoder", None)]  # CRATE-alpha's decoder D_hat
        residual = [m for m in residual if isinstance(m, nn.Linear)]
        for proj in residual:
            proj.residual_init_scale = 1.0 / math.sqrt(config.n_layer * len(residual))
        self.incremental = isinstance(self.block, SINGLE_ATTENTION_BLOCKS) and type(self.block).forward in {
            cls.forward for cls in SINGLE_ATTENTION_BLOCKS}

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, **kwargs) -> torch.Tensor:
        """``attention_mask``: raw bool [B, 1, Tq, Tk] = causal & key-is-a-token, or None (plain causal)."""
        block = self.block
        if past_key_values is None:
            return block(hidden_states, attn_mask=nonempty_rows(attention_mask), is_causal=True)
        if self.incremental:
            modules = block._modules
            layer = modules["attn"]
            modules["attn"] = _CachedAttentionCall(layer, past_key_values, self.layer_idx, attention_mask)
            try:
                return block(hidden_states, attn_mask=None, is_causal=True)
            finally:
                modules["attn"] = layer
        # Generic block: cache its input, recompute it over the prefix (O(T^2) per new token).
        n = hidden_states.shape[1]
        inputs, _ = _store(past_key_values, self.layer_idx, hidden_states[:, None], None)
        prefix = inputs[:, 0]
        zero = getattr(block, "layer_zero", None)
        if zero is not None and self.layer_idx == 0:  # B3 anchor: the layer-0 input of the whole prefix
            zero.set(prefix)
        return block(prefix, attn_mask=full_prefix_mask(attention_mask, prefix.shape[1], prefix.device),
                     is_causal=True)[:, -n:]


class UnrollAttnPreTrainedModel(PreTrainedModel):
    config: UnrollAttnConfig
    config_class = UnrollAttnConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UnrollAttnBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2 scheme: N(0, initializer_range) for linear/embedding weights, zero biases, unit LayerNorm; residual
        output maps (tagged by ``UnrollAttnBlock``) scaled by 1/sqrt(#residual branches); CRATE's ISTA dictionary
        keeps its kaiming-uniform init (as in the CRATE reference code)."""
        super()._init_weights(module)
        if isinstance(module, ISTA):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.Linear) and getattr(module, "residual_init_scale", None) is not None:
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range * module.residual_init_scale)


class UnrollAttnModel(UnrollAttnPreTrainedModel):
    """Embeddings + blocks + final LayerNorm; returns the last hidden states (and the cache)."""

    def __init__(self, config: UnrollAttnConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        # learned absolute positions, or none (attention that models position itself, e.g. bilateral's spatial kernel)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if config.position_embedding == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([UnrollAttnBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = (nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
                     if config.use_layer_norm else nn.Identity())
        self.gradient_checkpointing = False
        # B3 boosting rule (block "boost", rule "anchor"): the blocks pull toward the layer-0 input, set per forward
        self.layer_zero = attach_layer_zero_input(self.h)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def _check_inputs(self, input_ids, inputs_embeds) -> tuple[int, int]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.ndim != 2 or input_ids.is_floating_point():
                raise ValueError(f"input_ids: expected integer ids of shape [B, T], got {input_ids.dtype} {list(input_ids.shape)}")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
                raise ValueError(f"input_ids: token ids must lie in [0, {self.config.vocab_size}) (vocab_size), got "
                                 f"min {int(input_ids.min())}, max {int(input_ids.max())}")
            return input_ids.shape
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.n_embd:
            raise ValueError(f"inputs_embeds: expected shape [B, T, {self.config.n_embd}], got {list(inputs_embeds.shape)}")
        return inputs_embeds.shape[:2]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cfg = self.config
        batch, n = self._check_inputs(input_ids, inputs_embeds)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=cfg)
        if past_key_values is not None and not isinstance(past_key_values, DynamicCache):
            raise ValueError(f"past_key_values: expected a transformers DynamicCache, got {type(past_key_values).__name__}")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        total = past + n
        if total > cfg.n_positions:
            raise ValueError(f"sequence length {total} (cached {past} + new {n}) exceeds the context n_positions="
                             f"{cfg.n_positions}")

        if attention_mask is not None:
            if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (batch, total):
                raise ValueError(f"attention_mask: expected a 2-D padding mask of shape [{batch}, {total}] "
                                 f"(cached + new tokens, 1 = token, 0 = padding), got {list(attention_mask.shape)}")
            attention_mask = attention_mask.to(torch.bool)
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only (as generate() does)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -n:]
            else:
                position_ids = torch.arange(past, total, device=self.wte.weight.device)[None]
        elif position_ids.numel() and (int(position_ids.min()) < 0 or int(position_ids.max()) >= cfg.n_positions):
            raise ValueError(f"position_ids must lie in [0, {cfg.n_positions}), got max {int(position_ids.max())}")

        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            q_pos = torch.arange(past, total, device=attention_mask.device)[:, None]
            k_pos = torch.arange(total, device=attention_mask.device)[None]
            # causal & key-is-a-token; a padded query's empty row is filled by nonempty_rows where it is used
            mask = (k_pos <= q_pos) & attention_mask[:, None, None, :]

        hidden = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)
        hidden = self.drop(hidden + self.wpe(position_ids) if self.wpe is not None else hidden)
        all_hidden = (hidden,) if output_hidden_states else None
        if self.layer_zero is not None:  # uncached: the whole sequence; cached: layer 0 replaces it by its prefix
            self.layer_zero.set(hidden)
        try:
            for layer in self.h:
                hidden = layer(hidden, attention_mask=mask, past_key_values=past_key_values)
                if output_hidden_states:
                    all_hidden += (hidden,)
        finally:
            if self.layer_zero is not None:
                self.layer_zero.set(None)  # don't keep activations alive
        hidden = self.ln_f(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values if use_cache else None,
                                       hidden_states=all_hidden)


class UnrollAttnForCausalLM(UnrollAttnPreTrainedModel, GenerationMixin):
    """Causal LM head over :class:`UnrollAttnModel`; ``generate()``, ``save_pretrained``/``from_pretrained`` work."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: UnrollAttnConfig):
        super().__init__(config)
        self.transformer = UnrollAttnModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings):
        self.transformer.wte = new_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               output_hidden_states=output_hidden_states)
        hidden = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)
        if logits.shape[-1] != self.config.vocab_size:  # drop the rows added by pad_vocab_size_multiple
            logits = logits[..., : self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)




# --------------------------------------------------------------------------------------------------------------
# presets (papers.md B.6): base sizes at the paper's scale, tiny sizes for CPU with about equal parameter counts
# --------------------------------------------------------------------------------------------------------------

TINY = {"n_embd": 128, "n_head": 4, "n_positions": 256}
BASE = {"n_embd": 768, "n_head": 12, "n_positions": 1024}

# name -> (family, config, paper parameter count, summary). Depths from the B.6 arithmetic: an AoT-MHSA layer is
# 2.36M parameters at width 768 (35 layers -> 122M), an AoT-MSSA layer 1.18M (53 layers -> 102M); MSSA medium at
# GPT-2 medium's width 1024 / 16 heads (62 layers -> 182.8M); causal CRATE base at 768 / 12 layers (60.7M).
# Tiny variants match GPT-2 tiny's 0.79M non-embedding parameters: 4 GPT-2 layers = 12 AoT-MHSA = 24 AoT-MSSA = 16 CRATE.
LM_PRESETS: dict[str, tuple[str, dict, int | None, str]] = {
    "aot_mssa_lm_tiny": ("aot", {"attention": "mssa", "block": "aot", "n_layer": 24, **TINY}, None,
                         "AoT-MSSA-L, CPU size"),
    "aot_mssa_lm_base": ("aot", {"attention": "mssa", "block": "aot", "n_layer": 53, **BASE}, 102_000_000,
                         "AoT-MSSA Base (102M)"),
    "aot_mssa_lm_medium": ("aot", {"attention": "mssa", "block": "aot", "n_layer": 62, "n_embd": 1024, "n_head": 16,
                                   "n_positions": 1024}, 182_000_000, "AoT-MSSA Medium (182M)"),
    "aot_mhsa_lm_tiny": ("aot", {"attention": "mhsa", "block": "aot", "n_layer": 12, **TINY}, None,
                         "AoT-MHSA-L, CPU size"),
    "aot_mhsa_lm_base": ("aot", {"attention": "mhsa", "block": "aot", "n_layer": 35, **BASE}, 122_000_000,
                         "AoT-MHSA Base (122M)"),
    "crate_lm_tiny": ("crate", {"attention": "mssa", "block": "crate", "n_layer": 16, **TINY}, None,
                      "causal CRATE, CPU size"),
    "crate_lm_base": ("crate", {"attention": "mssa", "block": "crate", "n_layer": 12, **BASE}, 60_000_000,
                      "Causal-CRATE-Base (60M)"),
    # CRATE-alpha's residual sparse coding (papers.md B.9) with a complete dictionary: 4 d^2 per layer, so 3 layers per
    # GPT-2 layer. Deep causal CRATE with the paper's non-residual ISTA stays at the unigram loss on the quick preset.
    "crate_alpha_lm_tiny": ("crate", {"attention": "mssa", "block": "crate", "block_options": {"ista": "alpha"},
                                      "n_layer": 12, **TINY}, None, "causal CRATE, CRATE-alpha sparse coding, CPU size"),
    "crate_alpha_lm_base": ("crate", {"attention": "mssa", "block": "crate", "block_options": {"ista": "alpha"},
                                      "n_layer": 12, **BASE}, None, "causal CRATE, CRATE-alpha sparse coding, 12 layers"),
}
# Kernel-regression attention (papers.md C) in a GPT-2-shaped transformer (pre-norm attention + MLP, GPT-2's depth and
# width; the q/k/v and output maps are GPT-2's, plus one or two bandwidths per head). ``bilateral``: a range kernel on
# q/k times a Laplacian spatial kernel on the 1-D token indices (ALiBi's form, C.3) *replacing* the additive learned
# position embedding, so no token-position cross term; ``gaussian`` (RBF range kernel) and ``twicing`` ((2A - A^2)V,
# C.4) keep GPT-2's learned positions, as the softmax attention they modify.
KERNEL_LM = {
    "bilateral": ({"attention": "bilateral", "attn_options": {"spatial_kernel": "laplacian"},
                   "position_embedding": "none"}, "bilateral attention (range x Laplacian spatial kernel, no PE)"),
    "gaussian": ({"attention": "gaussian"}, "Gaussian (RBF) attention, learned PE"),
    "twicing": ({"attention": "twicing"}, "twicing attention (2A - A^2)V, learned PE"),
}
for _kernel, (_options, _summary) in KERNEL_LM.items():
    for _size, _shape, _layers in (("tiny", TINY, 4), ("base", BASE, 12)):
        LM_PRESETS[f"{_kernel}_lm_{_size}"] = ("kernel", {"block": "transformer", "n_layer": _layers, **_shape, **_options},
                                               None, f"{_summary}, GPT-2 {_size} shape")


def build_causal_lm(**config) -> UnrollAttnForCausalLM:
    """``UnrollAttnForCausalLM(UnrollAttnConfig(**config))``."""
    return UnrollAttnForCausalLM(UnrollAttnConfig(**config))


def _preset_builder(name: str, defaults: dict):
    def build(**overrides) -> UnrollAttnForCausalLM:
        return build_causal_lm(**{**defaults, **overrides})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{LM_PRESETS[name][3]}: UnrollAttnForCausalLM with {defaults}; keyword overrides go to the config."
    return build


for _name, (_family, _defaults, _paper, _summary) in LM_PRESETS.items():
    register_model(_name, family=_family, task="causal-lm", paper_params=_paper, summary=_summary)(
        _preset_builder(_name, _defaults))


class ParamRow(NamedTuple):
    name: str
    params: int
    paper_params: int | None


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def parameter_table(pattern: str | None = None) -> list[ParamRow]:
    """(name, params, paper params) for every registered causal-LM preset, built on the meta device (no memory)."""
    rows = []
    for name in list_models(pattern, task="causal-lm"):
        with torch.device("meta"):
            model = build_model(name)
        rows.append(ParamRow(name, count_parameters(model), MODELS.meta(name).get("paper_params")))
    return rows


__all__ = [
    "LM_PRESETS", "ParamRow", "UnrollAttnBlock", "UnrollAttnForCausalLM", "UnrollAttnModel", "UnrollAttnPreTrainedModel",
    "build_causal_lm", "cached_attention", "count_parameters", "parameter_table",
]
