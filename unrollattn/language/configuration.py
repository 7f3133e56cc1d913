"""HF configuration of the unrollattn causal language model (docs/integration.md 2.1).

One config describes every language variant of the paper: AoT-MSSA (``block="aot", attention="mssa"``),
AoT-MHSA (``block="aot", attention="mhsa"``), causal CRATE (``block="crate", attention="mssa"``) and an
in-house softmax baseline on the same scaffolding (``block="transformer", attention="mhsa"``).
"""
from __future__ import annotations

import math

from transformers import PreTrainedConfig

from .. import layers as _layers  # noqa: F401  (registers the attention variants and blocks)
from ..core.validation import check_float, check_int
from ..registry import ATTENTIONS, BLOCKS, list_attentions, list_blocks

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_TOKEN_ID = 50256  # "<|endoftext|>" of the GPT-2 BPE
POSITION_EMBEDDINGS = ("learned", "none")
INT_FIELDS = ("n_layer", "n_embd", "n_head", "vocab_size", "pad_vocab_size_multiple", "n_positions")  # all >= 1
# name -> (minimum, maximum, open_min, open_max) of the float fields
FLOAT_FIELDS = {"mlp_ratio": (0.0, None, True, False), "dropout": (0.0, 1.0, False, True),
                "layer_norm_epsilon": (0.0, None, True, False), "initializer_range": (0.0, None, False, False)}


class UnrollAttnConfig(PreTrainedConfig):
    """Configuration of :class:`UnrollAttnForCausalLM`.

    Args:
        attention: registered attention name (``unrollattn.list_attentions()``), e.g. ``"mssa"`` or ``"mhsa"``.
        attn_options: keyword options of that attention (e.g. ``{"nonlinearity": "relu"}`` for MSSA).
        block: registered block name: ``"aot"`` (x + attn(LN(x)), no MLP), ``"crate"`` (MSSA + ISTA) or
            ``"transformer"`` (pre-norm attention + MLP).
        block_options: keyword options of that block (e.g. ``{"ista_step_size": 0.1, "ista_lambda": 0.1}``).
        n_layer, n_embd, n_head: depth, width and number of heads (subspaces K for MSSA).
        head_dim: per-head width p; ``None`` means ``n_embd // n_head`` (resolved here, so it is an int after init).
        vocab_size: number of token ids the tokenizer produces (GPT-2 BPE: 50257). Larger ids raise ``ValueError``.
        pad_vocab_size_multiple: round the embedding table up to a multiple of this (nanoGPT pads 50257 to
            50304 with 64); logits are returned for the first ``vocab_size`` rows only.
        n_positions: context length: the longest sequence (cached + new tokens) the model accepts, and the rows of
            the learned position embedding when ``position_embedding="learned"``.
        position_embedding: ``"learned"`` (GPT-2's additive absolute embedding, added to the token embedding) or
            ``"none"`` (no additive position signal: for attentions that model position themselves, e.g.
            ``bilateral`` whose spatial kernel on 1-D token indices replaces the additive embedding, so no
            token-position cross term enters the logits (papers.md C.2, C.5); with a causal mask only, ``"none"`` is
            NoPE).
        use_layer_norm: LayerNorm before each AoT attention and a final LayerNorm (AoT language uses LN, B.3);
            ``False`` needs a block with a ``use_norm`` option (``aot``).
        mlp_ratio: MLP hidden width / n_embd for the ``transformer`` block.
        dropout: embedding, attention and residual dropout.
        bias: biases in the linear maps and LayerNorms.
        tie_word_embeddings: tie the LM head to the token embedding (declared: 5.x configs lack the field).
    """

    model_type = "unrollattn"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the cache field (renamed in transformers 5.24)
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        attention: str = "mssa",
        attn_options: dict | None = None,
        block: str = "aot",
        block_options: dict | None = None,
        n_layer: int = 12,
        n_embd: int = 768,
        n_head: int = 12,
        head_dim: int | None = None,
        vocab_size: int = GPT2_VOCAB_SIZE,
        pad_vocab_size_multiple: int = 1,
        n_positions: int = 1024,
        position_embedding: str = "learned",
        use_layer_norm: bool = True,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bias: bool = True,
        tie_word_embeddings: bool = True,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.attention = attention
        self.attn_options = dict(attn_options or {})
        self.block = block
        self.block_options = dict(block_options or {})
        ints = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab_size,
                    pad_vocab_size_multiple=pad_vocab_size_multiple, n_positions=n_positions)
        floats = dict(mlp_ratio=mlp_ratio, dropout=dropout, layer_norm_epsilon=layer_norm_epsilon,
                      initializer_range=initializer_range)
        for name in INT_FIELDS:
            setattr(self, name, check_int(name, ints[name]))
        for name, (low, high, open_low, open_high) in FLOAT_FIELDS.items():
            setattr(self, name, check_float(name, floats[name], low, high, open_min=open_low, open_max=open_high))
        self.position_embedding = position_embedding
        self.use_layer_norm = bool(use_layer_norm)
        self.bias = bool(bias)
        self.tie_word_embeddings = bool(tie_word_embeddings)
        self.use_cache = bool(use_cache)
        self._validate(head_dim)
        self.head_dim = check_int("head_dim", head_dim) if head_dim is not None else self.n_embd // self.n_head
        # GPT-2's <|endoftext|> when the vocabulary is GPT-2's; otherwise no special ids unless given.
        default_eos = GPT2_EOS_TOKEN_ID if self.vocab_size == GPT2_VOCAB_SIZE else None
        self.bos_token_id = default_eos if bos_token_id is None else _token_ids("bos_token_id", bos_token_id)
        self.eos_token_id = default_eos if eos_token_id is None else _token_ids("eos_token_id", eos_token_id)
        self.pad_token_id = None if pad_token_id is None else _token_ids("pad_token_id", pad_token_id)
        super().__init__(**kwargs)

    def _validate(self, head_dim: int | None) -> None:
        if not isinstance(self.attention, str) or self.attention not in ATTENTIONS:
            raise ValueError(f"attention={self.attention!r} is not a registered attention; "
                             f"registered: {', '.join(list_attentions())}")
        if not isinstance(self.block, str) or self.block not in BLOCKS:
            raise ValueError(f"block={self.block!r} is not a registered block; registered: {', '.join(list_blocks())}")
        if head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set head_dim)")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding: expected one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        if not self.use_layer_norm and "use_norm" not in getattr(BLOCKS.get(self.block), "option_names", ()):
            raise ValueError(f"use_layer_norm=False needs a block with a 'use_norm' option (e.g. 'aot'); "
                             f"block={self.block!r} always normalises")
        for name in ("attn_options", "block_options"):
            if "head_dim" in getattr(self, name) or "attn_options" in getattr(self, name):
                raise ValueError(f"{name} must not set head_dim/attn_options; use the config fields")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: ``vocab_size`` rounded up to ``pad_vocab_size_multiple``."""
        m = self.pad_vocab_size_multiple
        return int(math.ceil(self.vocab_size / m) * m)


def _token_ids(name: str, value):
    """A special token id (an integer >= 0) or, as HF allows for eos_token_id, a list of them."""
    if isinstance(value, (list, tuple)):
        return [check_int(name, v, minimum=0) for v in value]
    return check_int(name, value, minimum=0)


__all__ = ["UnrollAttnConfig", "GPT2_VOCAB_SIZE", "GPT2_EOS_TOKEN_ID", "POSITION_EMBEDDINGS"]
