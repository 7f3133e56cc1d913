"""HF causal language model over any registered attention and block (docs/integration.md 2.2).

``UnrollAttnForCausalLM`` = token + learned position embeddings (or none: ``position_embedding="none"``, for
attentions that model position themselves, e.g. bilateral) -> ``n_layer`` registry blocks (causal) -> final
LayerNorm -> LM head tied to the token embedding. The same scaffold gives AoT-MSSA, AoT-MHSA, causal CRATE, the
kernel-regression transformers (bilateral, gaussian, twicing) and an in-house softmax transformer, so variants differ
only in the block/attention. ``boost`` blocks with rule ``anchor`` (B3) pull toward the layer-0 input (the
embeddings), which the model hands them on every forward (with a KV cache: layer 0's cached prefix).

KV cache: any HF ``Cache`` (``DynamicCache`` by default, ``StaticCache`` with ``cache_implementation="static"``), one
cache layer per block, which each block fills through its own ``decode`` (``unrollattn.layers.decoding``): ``mhsa``
stores per-head keys and values, ``mssa`` the shared projection U_k^T z once (keys = values), the kernel attentions
their keys and values; a new token then costs O(T d) per layer. Attentions that recompute their prefix (twicing,
``glr``/``gtv``) and blocks that call their attention more than once (``boost``) store their inputs instead
(O(T^2) per new token). Every path gives the logits of the uncached forward (tested).
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
from timm.layers import Mlp
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from ..core.masks import as_bool_mask, nonempty_rows
from ..core.validation import check_finite, finite_checks
from ..layers.blocks import ISTA, attach_layer_zero_input
from ..layers.decoding import decode_by_recompute
from ..registry import MODELS, build_model, get_block, list_models, register_model
from ..utils.params import count_parameters
from .configuration import UnrollAttnConfig
from .hf_compat import CACHE_FIELD, LOSS_KEYWORDS, check_keywords, take_cache, with_cache


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

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        """``attention_mask``: bool [B, 1, Tq, Tk] = causal & key-is-a-token, or None (plain causal)."""
        if cache is None:
            return self.block(hidden_states, attn_mask=nonempty_rows(attention_mask), is_causal=True)
        decode = getattr(self.block, "decode", None)
        if decode is None:  # a user's block without the decode method: exact, by recomputation over its inputs
            return decode_by_recompute(self.block, hidden_states, cache, self.layer_idx, attention_mask)
        return decode(hidden_states, cache, self.layer_idx, attention_mask)


class UnrollAttnPreTrainedModel(PreTrainedModel):
    config: UnrollAttnConfig
    config_class = UnrollAttnConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UnrollAttnBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
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
            # value checks need the host (.item()): eager only, so a compiled model keeps one graph
            if not torch.compiler.is_compiling() and input_ids.numel() and (
                    int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
                raise ValueError(f"input_ids: token ids must lie in [0, {self.config.vocab_size}) (vocab_size), got "
                                 f"min {int(input_ids.min())}, max {int(input_ids.max())}")
            return input_ids.shape
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.n_embd:
            raise ValueError(f"inputs_embeds: expected shape [B, T, {self.config.n_embd}], got {list(inputs_embeds.shape)}")
        check_finite(inputs_embeds, "inputs_embeds")
        return inputs_embeds.shape[:2]

    def _attention_mask(self, attention_mask, batch: int, past: int, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(2-D padding mask [B, T] or None, bool [B, 1, Tq, Tk] causal & key-is-a-token mask or None = plain causal).

        Accepts the 2-D padding mask of the cached + new tokens (1 = token, 0 = padding) or a 4-D mask prepared by
        HF (``generate`` with a fixed-size cache builds one over the whole buffer; only the filled keys are kept).
        """
        total = past + n
        if attention_mask is None:
            return None, None
        if attention_mask.ndim == 4:
            if attention_mask.shape[0] != batch or attention_mask.shape[-2] != n:
                raise ValueError(f"attention_mask: a 4-D mask must be [{batch}, 1, {n}, >= {total}], got "
                                 f"{list(attention_mask.shape)}")
            return None, as_bool_mask(attention_mask, total)
        if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (batch, total):
            raise ValueError(f"attention_mask: expected a 2-D padding mask of shape [{batch}, {total}] "
                             f"(cached + new tokens, 1 = token, 0 = padding), got {list(attention_mask.shape)}")
        padding = attention_mask.to(torch.bool)
        if not torch.compiler.is_compiling() and bool(padding.all()):  # eager: no mask lets SDPA run is_causal
            return padding, None
        q_pos = torch.arange(past, total, device=padding.device)[:, None]
        k_pos = torch.arange(total, device=padding.device)[None]
        # causal & key-is-a-token; a padded query's empty row is filled by nonempty_rows where it is used
        return padding, (k_pos <= q_pos) & padding[:, None, None, :]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``cache`` (``past_key_values`` before transformers 5.24): any HF ``Cache``; a new ``DynamicCache`` when
        ``use_cache`` and none is given. Unknown keywords raise TypeError (see ``hf_compat``)."""
        check_keywords(type(self).__name__, kwargs)
        cfg = self.config
        batch, n = self._check_inputs(input_ids, inputs_embeds)
        cache = take_cache(cache, past_key_values)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache, cache = False, None
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        past = int(cache.get_seq_length()) if cache is not None else 0
        total = past + n
        if total > cfg.n_positions:
            raise ValueError(f"sequence length {total} (cached {past} + new {n}) exceeds the context n_positions="
                             f"{cfg.n_positions}")
        padding, mask = self._attention_mask(attention_mask, batch, past, n)
        if position_ids is None:
            if padding is not None:  # left padding: positions count real tokens only (as generate() does)
                position_ids = (padding.long().cumsum(-1) - 1).clamp_min(0)[:, -n:]
            else:
                position_ids = torch.arange(past, total, device=self.wte.weight.device)[None]
        elif not torch.compiler.is_compiling() and position_ids.numel() and (
                int(position_ids.min()) < 0 or int(position_ids.max()) >= cfg.n_positions):
            raise ValueError(f"position_ids must lie in [0, {cfg.n_positions}), got max {int(position_ids.max())}")

        hidden = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)
        hidden = self.drop(hidden + self.wpe(position_ids) if self.wpe is not None else hidden)
        all_hidden = (hidden,) if output_hidden_states else None
        if self.layer_zero is not None:  # uncached: the whole sequence; cached: layer 0 replaces it by its prefix
            self.layer_zero.set(hidden)
        try:
            with finite_checks(False):  # the input is checked above; the layers' own value checks would repeat it
                for layer in self.h:
                    hidden = layer(hidden, attention_mask=mask, cache=cache)
                    if output_hidden_states:
                        all_hidden += (hidden,)
        finally:
            if self.layer_zero is not None:
                self.layer_zero.set(None)  # don't keep activations alive
        hidden = self.ln_f(hidden)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden,)
        out = with_cache(BaseModelOutputWithPast, cache if use_cache else None, last_hidden_state=hidden,
                         hidden_states=all_hidden)
        return out if kwargs.get("return_dict", True) else out.to_tuple()


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
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        loss_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in LOSS_KEYWORDS}
        check_keywords(type(self).__name__, kwargs)
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=take_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                               use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden = slice_logits_to_keep(out.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)
        if logits.shape[-1] != self.config.vocab_size:  # drop the rows added by pad_vocab_size_multiple
            logits = logits[..., : self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        out = with_cache(CausalLMOutputWithPast, out.get(CACHE_FIELD), loss=loss, logits=logits,
                         hidden_states=out.hidden_states)
        return out if kwargs.get("return_dict", True) else out.to_tuple()


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
    # controls for bilateral's gain: its locality prior alone (ALiBi), no position signal at all (NoPE), and one
    # learned bandwidth per head for both the range and the spatial kernel
    "alibi": ({"attention": "alibi", "position_embedding": "none"}, "softmax + ALiBi's fixed distance bias, no PE"),
    "nope": ({"attention": "mhsa", "position_embedding": "none"}, "softmax with no position signal (NoPE)"),
    "bilateral_tied": ({"attention": "bilateral", "attn_options": {"spatial_kernel": "laplacian", "tie_bandwidths": True},
                        "position_embedding": "none"}, "bilateral attention with h_p = h_y per head, no PE"),
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
    _variant, _size = _name.rsplit("_lm_", 1)
    register_model(_name, family=_family, task="causal-lm", paper_params=_paper, summary=_summary, variant=_variant,
                   size=_size, attention=_defaults["attention"], block=_defaults["block"])(
        _preset_builder(_name, _defaults))


def build_composed_lm(shape: dict, **config) -> UnrollAttnForCausalLM:
    """GPT-2-shaped ``UnrollAttnForCausalLM`` (4 / 12 layers) with any ``attention`` and ``block`` (default mhsa,
    transformer); an attention that encodes position itself gets no learned position embedding."""
    config = {"attention": "mhsa", "block": "transformer", **shape, **config}
    from ..registry import get_attention

    if getattr(get_attention(config["attention"]), "encodes_position", False):
        config.setdefault("position_embedding", "none")
    return build_causal_lm(**config)


for _size, _shape in (("tiny", {**TINY, "n_layer": 4}), ("base", {**BASE, "n_layer": 12})):
    register_model(f"unrollattn_lm_{_size}", family="unrolled", task="causal-lm", size=_size, composable=True,
                   summary=f"UnrollAttnForCausalLM, GPT-2 {_size} shape, any attention= and block=")(
        partial(build_composed_lm, _shape))


class ParamRow(NamedTuple):
    name: str
    params: int
    paper_params: int | None


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
    "build_causal_lm", "count_parameters", "parameter_table",
]
