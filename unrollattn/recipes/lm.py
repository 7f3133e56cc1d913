"""Recipe "lm": causal language models through HF transformers: AoT-MSSA, AoT-MHSA and CRATE against GPT-2.

Single process (CPU or one GPU)::

    python -m unrollattn.recipes.lm --preset quick model.variant=aot_mssa
    unrollattn train lm --preset quick model.variant=crate loop.max_steps=100

DDP, one process per device (``loop.batch_size`` is the global batch; divide ``loop.grad_accum`` by the number
of processes to keep it)::

    torchrun --standalone --nproc_per_node=8 -m unrollattn.recipes.lm --preset gpt2_scale loop.grad_accum=5

Ablation (one table + plot)::

    unrollattn ablate lm --variants gpt2,aot_mhsa,aot_mssa,crate,crate_alpha --preset quick
    unrollattn ablate lm --variants gpt2,bilateral,gaussian,twicing --preset quick --out runs/ablate-lm-quick-kernel
    unrollattn ablate lm --attention mhsa,mssa,glr,bilateral --block aot --match-params gpt2 --seeds 2 --preset tiny_debug

Variants (papers.md B.3, B.5, B.9, C): ``gpt2`` = HF ``GPT2LMHeadModel``; ``aot_mhsa`` = softmax attention + skip, no
MLP; ``aot_mssa`` = subspace attention (Q = K = V = U_k^T z) + skip; ``crate`` = MSSA + the CRATE paper's ISTA
(ReLU(LN(.)) with no residual: a deep causal LM collapses to the unigram loss, kept as the paper's form);
``crate_alpha`` = MSSA + CRATE-alpha's residual sparse coding (complete dictionary, untied decoder), the causal CRATE
that trains; ``bilateral`` / ``gaussian`` / ``twicing`` = GPT-2-shaped transformers (attention + MLP, GPT-2's depth,
width and q/k/v/output maps) with kernel-regression attention on 1-D causal positions; ``bilateral`` has *no* learned
absolute position embedding (``position_embedding="none"``): its Laplacian spatial kernel on token distances (ALiBi's
form) is the only position signal, so no token-position cross term (C.2, C.5); ``gaussian`` and ``twicing`` keep
GPT-2's learned positions. Every variant is a registry entry (metadata ``variant``, ``size``, ``attention``,
``block``), so a user's registered model or attention is a variant too; ``model.attention`` / ``model.block`` compose
any attention with any block. The presets set ``model.match_params=gpt2``: ``model.depth`` is GPT-2's depth and
every other model gets the layer count that gives its layer stack GPT-2's parameters at the same width (computed on
the meta device: AoT-MHSA 3 layers per GPT-2 layer, AoT-MSSA 6, CRATE 4, CRATE-alpha 3 at width 160); with
``match_params=none`` ``depth`` is the layer count itself, and left at None the registered size decides.

Robustness: ``contam_loss`` = loss of the clean val text when 1.5% of its words (word boundaries from the
tokenizer's token texts; every token of a chosen word) are replaced by a fixed junk token ("@" byte-level, " AAA"
GPT-2 BPE) in the context; ``loss_ctx2x`` / ``loss_ctx4x`` = val loss on windows 2x / 4x the training block. Every
variant trains on ``data.block_size`` windows; unless ``model.n_positions`` is set, the context is sized to 4x the
block so learned position tables have (never trained) rows for the long windows: the 4x numbers measure length
extrapolation on equal terms.

Presets: ``quick`` (CPU, a few minutes per variant: byte-level KJV, width 160, GPT-2-equivalent depth 4),
``gpt2_scale`` (GPU: the paper's base sizes, GPT-2 BPE, context 1024, bf16, torch.compile, grad accumulation,
cosine with warm-up; OpenWebText when the hub is reachable, else the local corpora). In-context linear regression
with the same backbones is the recipe ``icl`` (:mod:`unrollattn.recipes.icl`). Metrics: val_loss / val_ppl (validation split of the training
corpus), shift_loss (validation split of a *different* corpus: covariate shift), last_word_acc (LAMBADA-style on
held-out lines, not LAMBADA itself), tokens/s and peak memory.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import unrollattn
import unrollattn.language  # noqa: F401  (registers the causal-LM presets)
from unrollattn.language.corpora import TokenCorpus, prepare_corpus, resolve_corpus
from unrollattn.language.evaluation import (
    contaminated_loss, junk_token_id, last_word_accuracy, last_word_passages, token_word_table, window_loss,
)
from unrollattn.language.tokenizer import get_tokenizer, is_byte_level
from unrollattn.registry import (
    ATTENTIONS, BLOCKS, MODELS, Registry, UnknownNameError, composable_model, model_variants, resolve_variant,
    variant_fields,
)
from unrollattn.utils.params import matching_shape, stack_parameters
from unrollattn.train import (
    ConfigError, LoopConfig, OptimConfig, apply_overrides, config_from_dict, fit, init_distributed, recipe_main,
)
from unrollattn.utils.dist import (
    DistState, global_batch_seed, micro_batch_slice, run_on_main, unwrap_model,
)

__all__ = [
    "DEFAULT_PRESET", "DataConfig", "EvalConfig", "LMConfig", "LMTask", "available_variants",
    "layer_stack_params", "matched_model", "parse_model_label", "reference_model",
    "ModelConfig", "PRESETS", "TOKENIZER_NAMES", "VARIANTS", "VARIANT_KEY", "ablation_columns", "ablation_columns_for",
    "ablation_metric", "build_lm", "embedding_params", "export_hf_model", "load_config", "main", "model_kwargs", "registry_name",
    "derived_fields", "model_description", "run",
]

VARIANT_KEY = "model.variant"
DEFAULT_PRESET = "quick"  # what `python -m unrollattn.recipes.lm` and `unrollattn ablate lm` run without --preset
TOKENIZER_NAMES = ("byte", "gpt2", "gpt2-files", "gpt2-hub")
TASK = "causal-lm"  # the registry task of this recipe's models


def available_variants() -> tuple[str, ...]:
    """Every registered causal-LM variant (registry metadata ``variant``), a user's own included."""
    return tuple(model_variants(TASK))


VARIANTS = available_variants()

# summary key -> column header of the ablation table
ablation_columns = {"params": "params", "params_non_embedding": "non-emb params", "params_stack": "layer-stack params",
                    "params_reference": "reference stack", "n_layer": "layers",
                    "val_loss": "val loss", "val_ppl": "val ppl", "shift_loss": "shift loss",
                    "last_word_acc": "last-word acc", "contam_loss": "contam. loss", "loss_ctx2x": "loss 2x ctx",
                    "loss_ctx4x": "loss 4x ctx", "tokens_per_s": "train tok/s", "peak_mem_mb": "peak mem MB",
                    "wall_s": "wall s"}
ablation_metric = "val_loss"


def ablation_columns_for(cfg: "LMConfig") -> dict[str, str]:
    """The ablation columns of ``cfg``: the robustness columns follow ``cfg.eval`` (contamination rate, context
    factors)."""
    columns = {k: v for k, v in ablation_columns.items() if not k.startswith(("contam_", "loss_ctx"))}
    robust = {}
    if cfg.eval.contamination > 0:
        robust["contam_loss"] = f"loss {100 * cfg.eval.contamination:g}% words junk"
    for f in cfg.eval.context_factors:
        robust[f"loss_ctx{f}x"] = f"loss {f}x ctx"
    keys = list(columns)
    at = keys.index("last_word_acc") + 1
    return {**{k: columns[k] for k in keys[:at]}, **robust, **{k: columns[k] for k in keys[at:]}}


# ----------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass
class ModelConfig:
    """Which model: a registered ``variant`` (gpt2, aot_mssa, crate_alpha, bilateral, ...; ``unrollattn list``) at
    ``size``, or, when ``attention`` / ``block`` are set, that attention in that block composed into the GPT-2-shaped
    ``UnrollAttnForCausalLM`` (any registered names, a user's own included; ``variant`` is then unused).

    Depth: ``depth`` layers; with ``match_params`` (a variant, or ``attention-block`` such as ``mssa-aot``) ``depth``
    is the *reference's* depth and this model gets the layer count whose layer stack has the reference's parameters
    within 2% at the same width, or, where no count does, the nearest width at which one does (:func:`matched_model`). ``n_layer`` sets the count outright. ``n_embd``, ``n_head``,
    ``n_positions`` (None = 4x the data's block size) override the preset; ``extra``: more keyword overrides for the
    model config (e.g. ``{"attn_options": {"nonlinearity": "relu"}}``)."""

    variant: str = "gpt2"
    attention: str | None = None
    block: str | None = None
    size: str = "tiny"
    depth: int | None = None
    match_params: str | None = None
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    n_positions: int | None = None
    dropout: float = 0.0
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.composed:
            for registry, name in ((ATTENTIONS, self.attention), (BLOCKS, self.block)):
                if name is not None:
                    registry.get(name)  # an unknown name lists the closest registered ones
        elif self.variant not in available_variants():
            raise ConfigError(f"variant: expected one of {', '.join(available_variants())} (or set model.attention / "
                              f"model.block), got {self.variant!r}")
        for key in ("depth", "n_layer", "n_embd", "n_head", "n_positions"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: expected a positive int or none, got {value!r}")
        if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: expected a float in [0, 1), got {self.dropout!r}")
        if self.match_params is not None:
            reference_model(self)  # validates the reference's names

    @property
    def composed(self) -> bool:
        return self.attention is not None or self.block is not None

    @property
    def label(self) -> str:
        """Name in run names and tables: the variant, or ``attention-block``."""
        return f"{self.attention or 'mhsa'}-{self.block or 'transformer'}" if self.composed else self.variant


def parse_model_label(label: str) -> dict[str, Any]:
    """``ModelConfig`` fields of a label: a variant name, or ``attention-block``."""
    fields = variant_fields(label)
    return {**fields, "variant": fields["variant"] or ModelConfig.variant}


def reference_model(model: ModelConfig) -> ModelConfig:
    """The model ``match_params`` names, at ``model``'s size, width and heads with ``model.depth`` layers."""
    return dataclasses.replace(model, **parse_model_label(model.match_params), match_params=None, n_layer=None)


@dataclasses.dataclass
class DataConfig:
    """Text data: ``corpus`` and ``shift_corpus`` are corpus names or comma-separated preference lists
    (``unrollattn.language.corpora``; the shift corpus is the first available one that differs from the training
    corpus, "" for none); ``tokenizer`` byte | gpt2 (offline files, else hub) | gpt2-files | gpt2-hub;
    ``block_size`` tokens per training window; ``root`` overrides the data root ($UNROLLATTN_DATA); ``stream``:
    an ``hf:`` corpus is tokenized from a ``datasets`` stream (no arrow copy of the whole dataset on disk; the same
    tokens)."""

    corpus: str = "kjv,austen,music21_en"
    shift_corpus: str = "austen,music21_en,kjv"
    tokenizer: str = "byte"
    block_size: int = 128
    val_fraction: float = 0.05
    root: str | None = None
    stream: bool = False

    def __post_init__(self):
        if self.tokenizer not in TOKENIZER_NAMES:
            raise ConfigError(f"tokenizer: expected one of {', '.join(TOKENIZER_NAMES)}, got {self.tokenizer!r}")
        if self.block_size < 2:
            raise ConfigError(f"block_size: expected an int >= 2, got {self.block_size!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: expected a float in (0, 1), got {self.val_fraction!r}")
        if not self.corpus.strip():
            raise ConfigError("corpus: expected a corpus name or a comma-separated list, got ''")


@dataclasses.dataclass
class EvalConfig:
    """Evaluation: ``windows`` fixed windows of the val split (and of the shift corpus) of ``block_size`` tokens,
    ``batch_size`` windows per forward; ``last_word_passages`` passages (0 disables) of which the model sees the last
    ``last_word_context`` tokens.

    Robustness (issue 5, papers.md C.7): ``contamination`` = fraction of the words of the val windows replaced by a
    fixed junk token (0 disables; summary ``contam_loss``: loss of the clean text given the contaminated context);
    ``context_factors`` = evaluation at ``f * block_size`` tokens (summary ``loss_ctx{f}x``). Models are trained on
    ``block_size`` windows only; when ``model.n_positions`` is left unset, the context is sized to
    ``max(context_factors) * block_size`` so that the learned position embeddings of GPT-2-style models have rows
    for the long windows (rows never trained: this measures length extrapolation, which learned absolute positions
    are known not to do) and every variant is scored on the same windows."""

    windows: int = 64
    batch_size: int = 16
    last_word_passages: int = 200
    last_word_context: int = 64
    contamination: float = 0.015
    context_factors: tuple = (2, 4)

    def __post_init__(self):
        if not 0.0 <= self.contamination <= 1.0:
            raise ConfigError(f"contamination: expected a fraction in [0, 1], got {self.contamination!r}")
        self.context_factors = tuple(self.context_factors)
        if any(not isinstance(f, int) or isinstance(f, bool) or f < 2 for f in self.context_factors) or \
                len(set(self.context_factors)) != len(self.context_factors):
            raise ConfigError(f"context_factors: expected distinct ints >= 2, got {self.context_factors!r}")
        for key in ("windows", "batch_size", "last_word_context"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an int >= 1, got {getattr(self, key)!r}")
        if self.last_word_passages < 0:
            raise ConfigError(f"last_word_passages: expected an int >= 0, got {self.last_word_passages!r}")


@dataclasses.dataclass
class LMConfig:
    """The whole run: language modelling on ``data`` (in-context regression is the recipe ``icl``)."""

    preset: str = "custom"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    loop: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)

    def __post_init__(self):
        context, need = self.model.n_positions, self.data.block_size
        if context is not None and need > context:
            raise ConfigError(f"data.block_size={need} exceeds the model's context model.n_positions={context}")
        if context is not None and self.eval.context_factors and \
                need * max(self.eval.context_factors) > context:
            raise ConfigError(f"eval.context_factors={self.eval.context_factors} need a context of "
                              f"{need * max(self.eval.context_factors)} tokens (data.block_size={need}); set "
                              f"model.n_positions to at least that, leave it unset, or set eval.context_factors=()")


# ----------------------------------------------------------------------------------------------------- model


def registry_name(model: ModelConfig) -> str:
    """The registered model of ``model`` (checked to exist)."""
    try:
        return composable_model(TASK, model.size) if model.composed else resolve_variant(TASK, model.variant, model.size)
    except UnknownNameError as err:
        raise ConfigError(f"model: {err}") from None


def model_kwargs(model: ModelConfig, *, vocab_size: int, eos_token_id: int | None, n_positions: int) -> dict[str, Any]:
    """Keyword overrides for ``unrollattn.build_model(registry_name(model), **kwargs)``."""
    kw: dict[str, Any] = {"vocab_size": vocab_size, "n_positions": model.n_positions or n_positions,
                          "bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
    if model.composed:
        kw.update({k: v for k, v in (("attention", model.attention), ("block", model.block)) if v is not None})
    model = matched_model(model)
    for key, value in (("n_layer", model.n_layer), ("n_embd", model.n_embd), ("n_head", model.n_head)):
        if value is not None:
            kw[key] = value
    if MODELS.meta(registry_name(model))["family"] == "gpt2":  # HF GPT2Config's dropout names
        kw.update(resid_pdrop=model.dropout, embd_pdrop=model.dropout, attn_pdrop=model.dropout)
    else:
        kw["dropout"] = model.dropout
    kw.update(model.extra)
    return kw


def build_lm(model: ModelConfig, *, vocab_size: int, eos_token_id: int | None, n_positions: int) -> nn.Module:
    """The HF causal LM of ``model`` (``GPT2LMHeadModel`` or ``UnrollAttnForCausalLM``)."""
    return unrollattn.build_model(registry_name(model), **model_kwargs(
        model, vocab_size=vocab_size, eos_token_id=eos_token_id, n_positions=n_positions))


def layer_stack_params(model: ModelConfig, n_layer: int | None = None) -> tuple[int, int]:
    """(layer-stack parameters, layers) of ``model`` (with ``n_layer`` layers if given), counted on the meta device."""
    if n_layer is not None:
        model = dataclasses.replace(model, n_layer=n_layer, match_params=None)
    with torch.device("meta"):
        return stack_parameters(build_lm(model, vocab_size=8, eos_token_id=None, n_positions=16))


def matched_model(model: ModelConfig) -> ModelConfig:
    """``model`` with ``match_params`` resolved (``n_layer`` set, ``match_params`` cleared): the layer count whose
    stack has the reference's parameters within 2%, and where no count does, the width nearest this one (a multiple
    of the heads) at which one does (:func:`matching_shape`), counted on the meta device. ``n_layer`` wins."""
    if model.n_layer is not None or model.match_params is None:
        return dataclasses.replace(model, n_layer=model.n_layer or model.depth, match_params=None)
    target, _ = layer_stack_params(reference_model(model))
    with torch.device("meta"):
        config = build_lm(dataclasses.replace(model, n_layer=1, match_params=None), vocab_size=8, eos_token_id=None,
                          n_positions=16).config
    width, heads = model.n_embd or config.n_embd, model.n_head or config.n_head

    def per_layer(n_embd: int) -> int:
        return layer_stack_params(dataclasses.replace(model, n_embd=n_embd, n_head=heads), n_layer=1)[0]

    n_layer, n_embd = matching_shape(per_layer, target, width=width, width_step=heads)
    widened = n_embd != width
    return dataclasses.replace(model, n_layer=n_layer, n_embd=n_embd if widened else model.n_embd,
                               n_head=heads if widened else model.n_head, match_params=None)


def embedding_params(model: nn.Module) -> int:
    """Token + position embedding parameters (the tied LM head shares the token embedding)."""
    model = unwrap_model(model)
    base = getattr(model, "transformer", model)  # a causal LM, or its base model (the ICL backbone)
    return sum(getattr(base, name).weight.numel() for name in ("wte", "wpe") if getattr(base, name, None) is not None)


def model_description(model: ModelConfig, built: nn.Module) -> dict[str, Any]:
    """The run fields that describe ``built`` (the causal LM of ``model`` or its base model, on any device): label,
    registered name, layers, width, layer-stack parameters (and the ``match_params`` reference's) and
    ``params_embedding`` (token + position embeddings)."""
    config = built.config
    stack, _ = stack_parameters(built)
    reference = layer_stack_params(reference_model(model))[0] if model.match_params else math.nan
    return {"variant": model.label, "model_name": registry_name(model), "n_layer": config.n_layer,
            "n_embd": config.n_embd, "params_stack": stack, "params_reference": reference,
            "matched_to": model.match_params, "params_embedding": embedding_params(built)}


def derived_fields(summary: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """What a run's summary (fit's, with :func:`model_description`) adds for the tables: ``params_non_embedding``,
    ``tokens_per_s`` and NaN for each of ``columns`` it does not report, so every run has every column."""
    out = {"params_non_embedding": summary["params"] - summary["params_embedding"],
           "tokens_per_s": summary.get("train_items_per_s")}
    return {**out, **{key: math.nan for key in columns if key not in summary and key not in out}}


def export_hf_model(model: nn.Module, tokenizer: Any, directory: str | os.PathLike) -> Path:
    """Write ``model`` (``save_pretrained``: config.json, model.safetensors, generation_config.json) and the
    ``tokenizer`` it was trained with (byte-level or GPT-2 BPE: tokenizer.json, tokenizer_config.json) into
    ``directory``. After ``import unrollattn`` the directory loads offline, without ``trust_remote_code``, with
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` and ``pipeline("text-generation", model=...)``.

    The generation config gets the tokenizer's eos / pad ids, so ``generate`` stops at ``<|endoftext|>`` and pads
    with it without a warning."""
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer: expected a transformers tokenizer (with save_pretrained), "
                        f"got {type(tokenizer).__name__}")
    model = unwrap_model(model)
    out = Path(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        generation.eos_token_id = tokenizer.eos_token_id
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------- LM task


class LMTask:
    """The :class:`unrollattn.train.Task` of next-token prediction on a prepared corpus.

    Training windows of ``block_size + 1`` tokens start at uniform random offsets of the train split, drawn per
    (seed, step) for the global batch, of which each (micro-batch, rank) keeps its slice; evaluation:
    :func:`window_loss` on the val split and on the shift corpus, and :func:`last_word_accuracy` on passages of the
    val split.
    """

    loss_label = "cross-entropy (nats/token)"

    def __init__(self, cfg: LMConfig, tokenizer: Any = None):
        self.cfg = cfg
        self.state = init_distributed(cfg.loop.device)
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer(cfg.data.tokenizer)
        d = cfg.data
        self.n_positions = cfg.model.n_positions or d.block_size * max((1, *cfg.eval.context_factors))
        if d.block_size > self.n_positions:
            raise ValueError(f"data.block_size={d.block_size} exceeds the model's context n_positions={self.n_positions}")
        self.vocab_size = int(cfg.model.extra.get("vocab_size", len(self.tokenizer)))
        self.eos_token_id = getattr(self.tokenizer, "eos_token_id", None)

        def prepare(spec: str) -> TokenCorpus:
            return prepare_corpus(spec, self.tokenizer, val_fraction=d.val_fraction, root=d.root, stream=d.stream)

        corpus_spec = resolve_corpus(d.corpus, self.tokenizer, d.val_fraction)
        self.corpus = run_on_main(self.state, lambda: prepare(corpus_spec))
        self.shift = None
        if d.shift_corpus.strip():
            try:
                shift_spec = resolve_corpus(d.shift_corpus, self.tokenizer, d.val_fraction, exclude=[corpus_spec])
            except FileNotFoundError as err:
                import warnings

                warnings.warn(f"no shift corpus: {err}", RuntimeWarning, stacklevel=2)
            else:
                self.shift = run_on_main(self.state, lambda: prepare(shift_spec))
        for corpus in (self.corpus, self.shift):
            if corpus is not None:
                self._check_ids(corpus)
        if len(self.corpus.train) < d.block_size + 2:
            raise ValueError(f"{self.corpus.describe()}: the train split is shorter than block_size + 2 = "
                             f"{d.block_size + 2} tokens")
        longest = d.block_size * max((1, *cfg.eval.context_factors))
        if longest > self.n_positions:
            raise ValueError(f"eval.context_factors={cfg.eval.context_factors} need {longest} tokens of context, the "
                             f"model has n_positions={self.n_positions}")
        if len(self.corpus.val) < longest + 1:
            raise ValueError(f"{self.corpus.describe()}: the val split ({len(self.corpus.val)} tokens) is shorter than "
                             f"one {longest + 1}-token window of the long-context evaluation "
                             f"(eval.context_factors={cfg.eval.context_factors}); raise data.val_fraction or drop factors")
        if cfg.eval.contamination > 0:
            self.word_table = token_word_table(self.tokenizer, self.vocab_size)
            self.junk_id = junk_token_id(self.tokenizer)
        self.passages = []
        if cfg.eval.last_word_passages:
            ctx = cfg.eval.last_word_context
            if ctx >= self.n_positions:
                raise ValueError(f"eval.last_word_context={ctx} must be smaller than the model's context "
                                 f"n_positions={self.n_positions} (room is needed for the generated word)")
            self.passages = last_word_passages(self._val_documents(), cfg.eval.last_word_passages,
                                               min_context_chars=ctx * (1 if is_byte_level(self.tokenizer) else 6))

    def _check_ids(self, corpus: TokenCorpus) -> None:
        """Token ids must fit the model's vocabulary (checked on meta, the val split and the first 1M train ids)."""
        biggest = max(int(corpus.val.max()) if len(corpus.val) else 0,
                      int(np.max(corpus.train[: 1 << 20])) if len(corpus.train) else 0)
        if corpus.vocab_size > self.vocab_size or biggest >= self.vocab_size:
            raise ValueError(f"{corpus.name}: token ids up to {max(biggest, corpus.vocab_size - 1)} "
                             f"({corpus.meta['tokenizer']} tokenizer, vocabulary {corpus.vocab_size}) do not fit the "
                             f"model's vocab_size={self.vocab_size}")

    def _val_documents(self, max_tokens: int = 2_000_000) -> list[str]:
        val = np.asarray(self.corpus.val[:max_tokens], dtype=np.int64)
        cuts = np.flatnonzero(val == self.corpus.eos_token_id)
        docs, start = [], 0
        for end in [*cuts.tolist(), len(val)]:
            if end > start:
                docs.append(self.tokenizer.decode(val[start:end].tolist()))
            start = end + 1
        return docs

    def build_model(self) -> nn.Module:
        return build_lm(self.cfg.model, vocab_size=self.vocab_size, eos_token_id=self.eos_token_id,
                        n_positions=self.n_positions)

    def batch(self, step: int, micro: int, state: DistState) -> dict[str, torch.Tensor]:
        loop, block = self.cfg.loop, self.cfg.data.block_size
        rng = np.random.default_rng(global_batch_seed(loop.seed, step))
        train = self.corpus.train
        starts = rng.integers(0, len(train) - block - 1, size=loop.batch_size, endpoint=True)
        starts = starts[micro_batch_slice(loop.batch_size, loop.grad_accum, state.world_size, micro, state.rank)]
        w = torch.from_numpy(np.stack([np.asarray(train[s: s + block + 1], dtype=np.int64) for s in starts]))
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)), {}

    def evaluate(self, model: nn.Module, state: DistState) -> dict[str, float]:
        e, block = self.cfg.eval, self.cfg.data.block_size
        val = window_loss(model, self.corpus.val, block, max_windows=e.windows, batch_size=e.batch_size, state=state)
        out = {"val_loss": val["loss"], "val_ppl": val["ppl"]}
        if self.shift is not None:
            shift = window_loss(model, self.shift.val, block, max_windows=e.windows, batch_size=e.batch_size,
                                state=state)
            out.update(shift_loss=shift["loss"], shift_ppl=shift["ppl"])
        if self.passages:
            acc = last_word_accuracy(model, self.tokenizer, self.passages, context_tokens=e.last_word_context,
                                     batch_size=max(e.batch_size, 32), state=state)
            out["last_word_acc"] = acc["acc"]
        if e.contamination > 0:
            junk = contaminated_loss(model, self.corpus.val, block, self.word_table, self.junk_id, rate=e.contamination,
                                     max_windows=e.windows, batch_size=e.batch_size, seed=self.cfg.loop.seed, state=state)
            out.update(contam_loss=junk["loss"], contam_loss_junk_targets=junk["loss_junk_targets"])
        for f in e.context_factors:  # trained on block_size windows, scored on f times longer ones
            long = window_loss(model, self.corpus.val, f * block, max_windows=e.windows,
                               batch_size=max(1, e.batch_size // f), state=state)
            out[f"loss_ctx{f}x"] = long["loss"]
        return out

    def items_per_batch(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def export(self, model: nn.Module, run_dir: Path) -> None:
        """``run_dir/hf_model``: the model and the run's tokenizer (:func:`export_hf_model`)."""
        export_hf_model(model, self.tokenizer, Path(run_dir) / "hf_model")

    def describe(self) -> dict[str, Any]:
        return {"corpus": self.corpus.name, "corpus_tokens": {"train": len(self.corpus.train), "val": len(self.corpus.val)},
                "shift_corpus": self.shift.name if self.shift is not None else None,
                "tokenizer": self.corpus.meta["tokenizer"], "last_word_passages": len(self.passages)}

    def heldout(self, count: int) -> dict[str, torch.Tensor]:
        """The first ``count`` windows of ``data.block_size`` tokens of the validation split (for the diagnostics):
        ``inputs`` and ``display``, both token ids [count, T]."""
        block = self.cfg.data.block_size
        val = torch.as_tensor(self.corpus.split("val")[: count * block].astype("int64"))
        if val.numel() < block:
            raise ValueError(f"the validation split has fewer than block_size={block} tokens")
        ids = val[: (val.numel() // block) * block].view(-1, block)[:count]
        return {"inputs": ids, "display": ids}

    def decode_tokens(self, ids: torch.Tensor) -> list[str]:
        """Each token id of ``ids`` as text."""
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def run_info(self) -> dict[str, Any]:
        """The model (:func:`model_description`) and the data (:meth:`describe`) of the run."""
        with torch.device("meta"):
            model = self.build_model()
        return {**model_description(self.cfg.model, model), **self.describe()}

    def summary_fields(self, summary: dict[str, Any]) -> dict[str, Any]:
        """:func:`derived_fields` over the ablation columns (NaN e.g. for ``shift_loss`` without a shift corpus) and
        ``tokens_seen`` (``loop.batch_size`` is the global batch: steps x batch x block tokens over all ranks)."""
        tokens_seen = summary["steps"] * self.cfg.loop.batch_size * self.cfg.data.block_size
        return {**derived_fields(summary, ablation_columns), "tokens_seen": tokens_seen}


# ----------------------------------------------------------------------------------------------------- presets

PRESETS = Registry("lm preset")


@PRESETS.register("quick")
def quick() -> LMConfig:
    """CPU, a few minutes per variant on 2 cores: byte-level KJV (else Austen, else the music21 excerpt), windows of
    128 bytes, width 160, 4 heads, GPT-2-equivalent depth 4 (GPT-2 4 layers, AoT-MHSA 12, AoT-MSSA 24, CRATE 16:
    ~1.2M non-embedding parameters each), 300 steps of 16 windows (614k tokens), shift corpus Austen."""
    return LMConfig(
        preset="quick",
        model=ModelConfig(variant="gpt2", size="tiny", depth=4, match_params="gpt2", n_embd=160, n_head=4),
        data=DataConfig(corpus="kjv,austen,music21_en", shift_corpus="austen,music21_en,kjv", tokenizer="byte",
                        block_size=128),
        eval=EvalConfig(windows=48, batch_size=16, last_word_passages=100, last_word_context=64),
        loop=LoopConfig(max_steps=300, batch_size=16, eval_every=100, log_every=25, ckpt_every=0),
        optim=OptimConfig(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=30, schedule="cosine",
                          min_lr_ratio=0.1, grad_clip=1.0),
    )


@PRESETS.register("bpe")
def bpe() -> LMConfig:
    """CPU, the budget study (README "LM against budget"): GPT-2 BPE on KJV + Austen (2.08M tokens, else KJV),
    windows of 128 tokens, width 128, 4 heads, GPT-2-equivalent depth 4 with parameter-matched stacks, 8 windows per
    step; 1000 steps (1.02M tokens) unless ``loop.max_steps`` sets the budget. The tied 50257-token embedding costs
    most of each step at this width (the same for every variant). Shift corpus: Lady Susan (music21, when installed)."""
    return LMConfig(
        preset="bpe",
        model=ModelConfig(variant="gpt2", size="tiny", depth=4, match_params="gpt2", n_embd=128, n_head=4),
        data=DataConfig(corpus="kjv+austen,kjv", shift_corpus="music21_en", tokenizer="gpt2", block_size=128),
        eval=EvalConfig(windows=64, batch_size=16, last_word_passages=100, last_word_context=64),
        loop=LoopConfig(max_steps=1000, batch_size=8, eval_every=125, log_every=25, ckpt_every=125),
        optim=OptimConfig(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=25, schedule="cosine",
                          min_lr_ratio=0.1, grad_clip=1.0),
    )


@PRESETS.register("tiny_debug")
def tiny_debug() -> LMConfig:
    """Seconds: byte-level, width 32, GPT-2-equivalent depth 1, 20 steps of 4 x 32 bytes (tests, smoke runs)."""
    return LMConfig(
        preset="tiny_debug",
        model=ModelConfig(variant="gpt2", size="tiny", depth=1, match_params="gpt2", n_embd=32, n_head=2),
        data=DataConfig(corpus="kjv,austen,music21_en", shift_corpus="", tokenizer="byte", block_size=32),
        eval=EvalConfig(windows=8, batch_size=8, last_word_passages=8, last_word_context=16),
        loop=LoopConfig(max_steps=20, batch_size=4, eval_every=10, log_every=5, ckpt_every=0, progress=False),
        optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=2, min_lr_ratio=0.1),
    )


@PRESETS.register("gpt2_scale")
def gpt2_scale() -> LMConfig:
    """GPU, nanoGPT's GPT-2 recipe (papers.md B.8): the paper's base sizes (GPT-2 124M, AoT-MHSA 122M, AoT-MSSA
    102M, CRATE 60M), GPT-2 BPE, context 1024, 480 x 1024 tokens per step (micro-batch 12 x 40 accumulation on one
    GPU), AdamW (0.9, 0.95), lr 6e-4 -> 6e-5 cosine after 2000 warm-up steps, wd 0.1, clip 1.0, bf16, torch.compile.
    OpenWebText when the hub is reachable, else KJV / Austen (far too small for these sizes: a smoke test only)."""
    return LMConfig(
        preset="gpt2_scale",
        model=ModelConfig(variant="gpt2", size="base"),
        data=DataConfig(corpus="hf:openwebtext,kjv,austen", shift_corpus="austen,kjv,music21_en", tokenizer="gpt2",
                        block_size=1024, stream=True),
        eval=EvalConfig(windows=200, batch_size=8, last_word_passages=500, last_word_context=256),
        loop=LoopConfig(max_steps=600_000, batch_size=480, grad_accum=40, eval_every=2000, log_every=10,
                        ckpt_every=2000, precision="bf16", compile=True, keep_checkpoints=2),
        optim=OptimConfig(lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), warmup_steps=2000, schedule="cosine",
                          min_lr_ratio=0.1, grad_clip=1.0),
    )


# ----------------------------------------------------------------------------------------------------- entry points


def load_config(preset: str = DEFAULT_PRESET, overrides: Sequence[str] | None = None, *, resume: bool = False) -> LMConfig:
    """Preset ``preset`` with ``key=value`` overrides applied (``resume`` sets ``loop.resume``)."""
    cfg = apply_overrides(PRESETS.get(preset)(), list(overrides or []))
    return apply_overrides(cfg, ["loop.resume=true"]) if resume else cfg


def run(cfg: LMConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg``; return fit's summary (also result.json) with the model and data of the run
    (:meth:`LMTask.run_info`) and the table fields (:meth:`LMTask.summary_fields`)."""
    return fit(LMTask(cfg), cfg.loop, cfg.optim, run_name_prefix=f"lm-{cfg.preset}-{cfg.model.label}",
               config_for_log=cfg)


def load_model(run_dir: str | os.PathLike) -> tuple[nn.Module, LMConfig]:
    """The trained model of a finished run directory (its exported ``hf_model/``), in eval mode, with its config.
    Runs from before ``icl`` became its own recipe carry ``task: lm`` and an ``icl`` section, which are dropped."""
    from transformers import AutoModelForCausalLM

    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: expected an lm run directory")
    raw = json.loads(config_path.read_text())
    if raw.get("task") == "lm":
        raw = {k: v for k, v in raw.items() if k not in ("task", "icl")}
    cfg = config_from_dict(LMConfig, raw)
    hf_dir = Path(run_dir) / "hf_model"
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} not found: expected a finished lm run (it exports hf_model/)")
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval(), cfg


def make_task(cfg: LMConfig) -> LMTask:
    """The task of ``cfg`` (it loads the corpus and tokenizer): what the diagnostics ask for held-out examples."""
    return LMTask(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[--preset NAME] [--resume] [key=value ...]``; prints the summary as JSON."""
    return recipe_main(argv, prog="python -m unrollattn.recipes.lm", description=__doc__.split("\n\n")[0], presets=PRESETS,
                       default_preset=DEFAULT_PRESET, load_config=load_config, run=run)


if __name__ == "__main__":
    from unrollattn.utils.errors import exit_on_error

    sys.exit(exit_on_error(main))
