"""GPT-2 baseline (HF's own ``GPT2LMHeadModel``) and the attention module swap (docs/integration.md 2.6).

``patch_gpt2(model, "mssa")`` replaces every ``model.transformer.h[i].attn`` with a module that honours
``GPT2Attention.forward`` but mixes tokens with a registry attention (its own weights), so MSSA, kernel
attentions, ... run inside stock GPT-2 with loss, backward and ``generate`` (with and without KV cache).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import Cache, EncoderDecoderCache

from ..core.masks import as_bool_mask, nonempty_rows
from ..layers.attention import MultiHeadSelfAttention
from ..registry import get_attention, register_model
from .hf_compat import check_keywords, take_cache

# keywords GPT2Block hands its attention that the swapped module does not need
GPT2_BLOCK_KEYWORDS = ("use_cache", "position_ids", "encoder_attention_mask", "num_items_in_batch")


class GPT2UnrollAttention(nn.Module):
    """Drop-in for ``GPT2Attention`` (self-attention only) backed by a registry attention layer ``self.layer``.

    With a KV cache it calls ``self.layer.decode``: the layer decides what it stores (per-head keys and values for
    ``mhsa``, U_k^T z for ``mssa``, its inputs for attentions that recompute the prefix), in a ``DynamicCache`` or a
    fixed-size cache (``cache_implementation="static"``).
    """

    is_causal = True

    def __init__(self, config: GPT2Config, layer_idx: int, attention="mssa", *, device=None, dtype=None, **options):
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = attention if isinstance(attention, str) else attention.__name__
        self.layer = get_attention(attention)(
            config.n_embd, config.n_head, qkv_bias=True, proj_bias=True, attn_drop=config.attn_pdrop,
            proj_drop=config.resid_pdrop, device=device, dtype=dtype, **options)

    def forward(self, hidden_states: torch.Tensor, cache: Cache | None = None,
                attention_mask: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
                past_key_values: Cache | None = None, **kwargs) -> tuple[torch.Tensor, None]:
        """``GPT2Attention.forward``: ``cache`` (``past_key_values`` before transformers 5.24) and HF's 4-D mask
        (bool from ``sdpa_mask`` or additive float from ``eager_mask``; a fixed-size cache's spans its buffer)."""
        check_keywords(type(self).__name__, kwargs, GPT2_BLOCK_KEYWORDS)
        if encoder_hidden_states is not None:
            raise ValueError("GPT2UnrollAttention replaces self-attention only; cross-attention is not supported")
        cache = take_cache(cache, past_key_values)
        if cache is None:
            return self.layer(hidden_states, attn_mask=nonempty_rows(as_bool_mask(attention_mask)), is_causal=True), None
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        n_key = int(cache.get_seq_length(self.layer_idx)) + hidden_states.shape[1]
        return self.layer.decode(hidden_states, cache, self.layer_idx, as_bool_mask(attention_mask, n_key)), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, attention={self.attention!r}"


@torch.no_grad()
def _init_like_gpt2(module: GPT2UnrollAttention, config: GPT2Config) -> None:
    """GPT-2's scheme on the new linear maps: N(0, initializer_range), zero biases, output map / sqrt(2 n_layer)."""
    for name, sub in module.layer.named_modules():
        if isinstance(sub, nn.Linear):
            std = config.initializer_range / (math.sqrt(2 * config.n_layer) if name == "proj" else 1.0)
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def _copy_gpt2_attention(layer: nn.Module, old: nn.Module) -> None:
    """``c_attn``/``c_proj`` (Conv1D, weight [in, out]) into a layer with GPT-2's maps (nn.Linear, [out, in])."""
    layer.load_projections(old.c_attn.weight.t(), old.c_attn.bias, old.c_proj.weight.t(), old.c_proj.bias)


def patch_gpt2(model: GPT2LMHeadModel, attention="mssa", *, copy_weights: bool = False, **options) -> GPT2LMHeadModel:
    """Swap every ``model.transformer.h[i].attn`` of an HF GPT-2 model for ``attention`` (registry name or class).

    New modules get GPT-2's initialisation; ``copy_weights=True`` (``mhsa`` only) copies the original
    ``c_attn``/``c_proj`` weights instead, which leaves the logits unchanged. ``options`` go to the attention
    (e.g. ``nonlinearity="relu"`` for MSSA). Returns ``model`` (patched in place); ``model.config.unrollattn_patch``
    records the swap.
    """
    transformer = getattr(model, "transformer", model)
    blocks = getattr(transformer, "h", None)
    if blocks is None or not all(hasattr(block, "attn") for block in blocks):
        raise ValueError(f"patch_gpt2: expected a GPT2LMHeadModel/GPT2Model with transformer.h[i].attn, got {type(model).__name__}")
    cls = get_attention(attention)
    if copy_weights and not (issubclass(cls, MultiHeadSelfAttention) and cls.attend is MultiHeadSelfAttention.attend):
        raise ValueError(f"copy_weights=True needs attention='mhsa' (same Q/K/V/O maps as GPT-2), got {attention!r}")
    config = model.config
    for i, block in enumerate(blocks):
        old = block.attn
        ref = next(old.parameters())
        new = GPT2UnrollAttention(config, getattr(old, "layer_idx", i), attention, device=ref.device, dtype=ref.dtype,
                                  **options)
        if copy_weights:
            _copy_gpt2_attention(new.layer, old)
        else:
            _init_like_gpt2(new, config)
        new.train(old.training)
        block.attn = new
    config.unrollattn_patch = {"attention": new.attention, "options": dict(options)}
    return model


@torch.no_grad()
def transformer_from_gpt2(gpt2: GPT2LMHeadModel):
    """The in-house softmax baseline (``block="transformer", attention="mhsa"``) carrying a GPT-2's weights.

    Same function as the GPT-2 (tested: equal logits), so the scaffold of ``UnrollAttnForCausalLM`` is a fair
    stand-in for GPT-2 and OpenAI's weights can seed it. Conv1D weights are transposed into nn.Linear.
    """
    from .modeling import build_causal_lm

    c = gpt2.config
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or not c.scale_attn_weights or \
            c.scale_attn_by_inverse_layer_idx or c.add_cross_attention:
        raise ValueError("transformer_from_gpt2 needs a plain GPT-2 config: tanh GELU, 1/sqrt(d) attention scaling, "
                         "no inverse-layer scaling, no cross-attention")
    model = build_causal_lm(
        attention="mhsa", block="transformer", n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head,
        vocab_size=c.vocab_size, n_positions=c.n_positions, mlp_ratio=(c.n_inner or 4 * c.n_embd) / c.n_embd,
        dropout=c.resid_pdrop, layer_norm_epsilon=c.layer_norm_epsilon, initializer_range=c.initializer_range,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id)
    ref = next(gpt2.parameters())
    model.to(device=ref.device, dtype=ref.dtype)
    src, dst = gpt2.transformer, model.transformer
    dst.wte.weight.copy_(src.wte.weight)
    dst.wpe.weight.copy_(src.wpe.weight)
    for theirs, ours in zip(src.h, dst.h):
        b = ours.block
        pairs = [(theirs.ln_1, b.norm1), (theirs.ln_2, b.norm2)]
        for a, o in pairs:
            o.weight.copy_(a.weight)
            o.bias.copy_(a.bias)
        _copy_gpt2_attention(b.attn, theirs.attn)
        for conv, lin in ((theirs.mlp.c_fc, b.mlp.fc1), (theirs.mlp.c_proj, b.mlp.fc2)):
            lin.weight.copy_(conv.weight.t())
            lin.bias.copy_(conv.bias)
    dst.ln_f.weight.copy_(src.ln_f.weight)
    dst.ln_f.bias.copy_(src.ln_f.bias)
    if not c.tie_word_embeddings:
        model.lm_head.weight.copy_(gpt2.lm_head.weight)
    return model.train(gpt2.training)


# --------------------------------------------------------------------------------------------------------------
# presets: the GPT-2 baseline is HF's own model
# --------------------------------------------------------------------------------------------------------------

NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # as nanoGPT / the AoT runs pre-train
# GPT-2's tanh-approximate GELU through torch's fused kernel: the same function as HF's default "gelu_new" (written
# out in Python ops), faster and lighter, and the activation the UnrollAttn LMs use; a fair speed anchor.
GPT2_ACTIVATION = "gelu_pytorch_tanh"


def build_gpt2(**config) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel(GPT2Config(**config))``; an ``attn_implementation`` key selects the attention function."""
    attn_implementation = config.pop("attn_implementation", None)
    cfg = GPT2Config(**{"activation_function": GPT2_ACTIVATION, **config})
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    model = GPT2LMHeadModel(cfg)
    # HF infers the loss from the class name, which "GPT2LMHeadModel" does not match: it then logs inside forward,
    # a graph break under torch.compile. Name it.
    model.loss_type = "ForCausalLM"
    return model


@register_model("gpt2_tiny", family="gpt2", task="causal-lm", paper_params=None, variant="gpt2", size="tiny",
                attention="mhsa", block="transformer",
                summary="GPT-2, width 128, 4 heads, 4 layers, context 256 (CPU size)")
def gpt2_tiny(**overrides) -> GPT2LMHeadModel:
    return build_gpt2(**{**NO_DROPOUT, "n_embd": 128, "n_head": 4, "n_layer": 4, "n_positions": 256, **overrides})


@register_model("gpt2_base", family="gpt2", task="causal-lm", paper_params=124_000_000, variant="gpt2", size="base",
                attention="mhsa", block="transformer",
                summary="GPT-2 Base (HF defaults: width 768, 12 heads, 12 layers, context 1024)")
def gpt2_base(**overrides) -> GPT2LMHeadModel:
    return build_gpt2(**{**NO_DROPOUT, **overrides})


__all__ = ["GPT2UnrollAttention", "build_gpt2", "gpt2_base", "gpt2_tiny", "patch_gpt2", "transformer_from_gpt2"]
