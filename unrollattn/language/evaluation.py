"""Evaluation of causal language models, and the in-context linear-regression task (docs/papers.md B.8).

- :func:`window_loss`: mean next-token cross-entropy (and perplexity) over fixed, evenly spaced windows of a
  token array: the validation split, or the split of a *different* corpus (covariate shift).
- :func:`last_word_passages` + :func:`last_word_accuracy`: LAMBADA-style last-word prediction on held-out
  passages. A passage is a line of validation text that ends a sentence; the model sees the preceding text and
  generates greedily; it is correct when the first word of its continuation equals the line's last word (the
  AoT/ToST protocol generates greedily and checks the target, papers.md B.8). These passages come from the
  training corpus's validation split, so the number is *not* LAMBADA accuracy.
- :func:`contaminated_loss`: the same windows as the validation loss with a fraction (1.5%, papers.md C.7) of the
  *words* replaced by a fixed junk token (every token of a chosen word, so a word is replaced whole under any
  tokenizer; word boundaries from :func:`token_word_table`); the loss is that of predicting the *clean* text from
  the contaminated context (also returned: the loss on the contaminated text itself, the TextAttack protocol).
  Long sequences need no extra code: :func:`window_loss` with a larger ``block_size``.
- In-context linear regression (Garg et al. 2022 style, used by AoT, papers.md B.8): prompts
  (x_1, w.x_1, ..., x_k, w.x_k) with x, w ~ N(0, I_d), read into the backbone through a linear map on
  ``inputs_embeds``, read out by a linear map at every x token; :class:`ICLRegressionTask` trains it with
  :func:`unrollattn.train.fit`, :func:`icl_error_curve` gives the squared error against the number of
  in-context examples next to the least-squares and zero baselines, :func:`write_icl_curves` a table and plot.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..utils.dist import DistState, all_reduce_tensor, global_batch_seed, micro_batch_slice, unwrap_model
from ..utils.plots import Series, draw_series, new_figure, save_figure
from ..utils.tables import write_table

__all__ = [
    "ICLData", "ICLRegressionTask", "ICLRegressor", "LastWordPassage", "TokenWordTable", "contaminate_word_windows",
    "contaminate_words",
    "contaminated_loss", "first_word", "fixed_window_starts", "icl_batch", "icl_error_curve", "junk_token_id",
    "last_word_accuracy", "last_word_passages", "least_squares_curve", "lm_logits", "token_word_table", "window_loss",
    "word_masks", "write_icl_curves",
]


# ----------------------------------------------------------------------------------------------------- LM loss


def lm_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Logits [B, T, V] of an HF causal LM (``.logits``) or of a module returning the tensor itself."""
    out = model(input_ids=input_ids)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise ValueError(f"expected logits of shape [B, T, V] from {type(model).__name__}, got {type(logits).__name__}")
    return logits


def fixed_window_starts(n_tokens: int, block_size: int, max_windows: int) -> np.ndarray:
    """Start offsets of at most ``max_windows`` windows of ``block_size + 1`` tokens, evenly spread over the
    array (non-overlapping when it is long enough); the same for every call."""
    if block_size < 1 or max_windows < 1:
        raise ValueError(f"block_size and max_windows must be >= 1, got {block_size}, {max_windows}")
    span = n_tokens - block_size - 1
    if span < 0:
        raise ValueError(f"{n_tokens} tokens are fewer than block_size + 1 = {block_size + 1}: use a smaller "
                         "data.block_size or a larger corpus / val_fraction")
    count = min(max_windows, n_tokens // (block_size + 1)) or 1
    return np.unique(np.linspace(0, span, num=count).round().astype(np.int64))


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> Tensor:
    return torch.from_numpy(np.stack([np.asarray(tokens[s: s + block_size + 1], dtype=np.int64) for s in starts]))


def window_loss(model: nn.Module, tokens: np.ndarray, block_size: int, *, max_windows: int = 64, batch_size: int = 16,
                state: DistState | None = None) -> dict[str, float]:
    """Mean next-token cross-entropy over :func:`fixed_window_starts` windows of ``tokens``.

    Returns ``{"loss", "ppl", "tokens"}``; under DDP the windows are sharded over ranks and the sums reduced.
    Call it under ``torch.no_grad()`` (``fit``'s evaluate does).
    """
    state = state or DistState(device=next(model.parameters()).device)
    starts = fixed_window_starts(len(tokens), block_size, max_windows)
    mine = starts[state.rank:: state.world_size]
    vocab = getattr(getattr(unwrap_model(model), "config", None), "vocab_size", None)
    totals = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        w = _windows(tokens, mine[i: i + batch_size], block_size)
        if vocab is not None and int(w.max()) >= vocab:
            raise ValueError(f"token id {int(w.max())} is outside the model's vocabulary of {vocab}")
        w = w.to(state.device)
        logits = lm_logits(model, w[:, :-1]).float()
        targets = w[:, 1:]
        if int(targets.max()) >= logits.shape[-1]:
            raise ValueError(f"token id {int(targets.max())} is outside the model's vocabulary of {logits.shape[-1]}")
        totals[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").double().cpu()
        totals[1] += targets.numel()
    loss_sum, count = all_reduce_tensor(totals, state, "sum").tolist()
    loss = loss_sum / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


# ----------------------------------------------------------------------------------------------------- contamination


@dataclasses.dataclass(frozen=True)
class TokenWordTable:
    """Per token id (bool arrays of length vocab): ``space`` the text starts with whitespace, ``first_alpha`` its
    first non-whitespace character is a letter, ``last_alpha`` its last character is a letter."""

    space: np.ndarray
    first_alpha: np.ndarray
    last_alpha: np.ndarray


def _token_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """The text of each token id alone (byte-level: ASCII characters; a lone byte >= 128 decodes to U+FFFD, which
    is neither a letter nor whitespace)."""
    batch = getattr(tokenizer, "batch_decode", None)
    ids = [[i] for i in range(vocab_size)]
    return list(batch(ids)) if callable(batch) else [tokenizer.decode(i) for i in ids]


def token_word_table(tokenizer: Any, vocab_size: int | None = None) -> TokenWordTable:
    """Where words begin and continue, read from the tokenizer's own token texts (byte-level and BPE alike)."""
    vocab_size = len(tokenizer) if vocab_size is None else int(vocab_size)
    texts = _token_texts(tokenizer, vocab_size)
    space = np.array([t[:1].isspace() for t in texts], dtype=bool)
    first = np.array([t.lstrip()[:1].isalpha() for t in texts], dtype=bool)
    last = np.array([t[-1:].isalpha() for t in texts], dtype=bool)
    return TokenWordTable(space, first, last)


def word_masks(ids: Tensor, table: TokenWordTable) -> tuple[Tensor, Tensor]:
    """Bool masks [B, T] of tokens that *start* a word and that *continue* the word of the previous token.

    A token starts a word when its text begins (after optional whitespace) with a letter and either begins with
    whitespace or follows a token that does not end in a letter; it continues a word when it begins with a letter,
    without whitespace, right after a token ending in a letter. The first token of a row is neither (its left
    neighbour is unknown).
    """
    if ids.ndim != 2:
        raise ValueError(f"ids: expected token ids of shape [B, T], got {list(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(table.space)):
        raise ValueError(f"ids: token ids must lie in [0, {len(table.space)}) (the word table's vocabulary)")
    flat = ids.cpu().numpy()
    space, first, last = (torch.from_numpy(a[flat]) for a in (table.space, table.first_alpha, table.last_alpha))
    prev_last = torch.zeros_like(last)
    prev_last[:, 1:] = last[:, :-1]
    valid = torch.ones_like(space)
    valid[:, 0] = False
    start = valid & first & (space | ~prev_last)
    cont = valid & first & ~space & prev_last
    return start.to(ids.device), cont.to(ids.device)


def junk_token_id(tokenizer: Any, candidates: Sequence[str] = (" AAA", "AAA", "@")) -> int:
    """The fixed junk token: the first of ``candidates`` that the tokenizer encodes as one token (GPT-2 BPE: " AAA",
    the word of the TextAttack protocol, papers.md C.7; byte-level: "@", which the training corpora hardly use)."""
    for text in candidates:
        ids = list(tokenizer.encode(text))
        if len(ids) == 1:
            return int(ids[0])
    raise ValueError(f"none of {list(candidates)} is a single token of {type(tokenizer).__name__}; pass junk_id=")


def contaminate_words(ids: torch.Tensor, rate: float, junk_id: int, *, word_start: torch.Tensor | None = None,
                      protected: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace a fraction ``rate`` of the eligible tokens of ``ids`` by ``junk_id`` (the 1.5% word-swap test).

    ``word_start``: bool mask of tokens that begin a word (only those are swapped; default every token);
    ``protected``: bool mask of tokens never swapped (e.g. stop words). Returns a new tensor.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"rate: expected a fraction in [0, 1], got {rate}")
    eligible = torch.ones_like(ids, dtype=torch.bool) if word_start is None else word_start.clone()
    if protected is not None:
        eligible &= ~protected
    positions = eligible.flatten().nonzero().flatten()
    count = int(round(rate * positions.numel()))
    chosen = positions[torch.randperm(positions.numel(), generator=generator)[:count]]
    out = ids.clone().flatten()
    out[chosen] = junk_id
    return out.view_as(ids)


def contaminate_word_windows(ids: Tensor, table: TokenWordTable, rate: float, junk_id: int, *,
                             seed: int = 0) -> tuple[Tensor, Tensor]:
    """Replace a fraction ``rate`` of the words of ``ids`` [B, T] (every token of each chosen word) by ``junk_id``.

    The words are drawn by :func:`contaminate_words` among the word starts
    (:func:`word_masks`) with a generator seeded by ``seed``, so a call is deterministic. Returns (contaminated ids,
    bool mask of replaced tokens).
    """
    start, cont = word_masks(ids, table)
    chosen = contaminate_words(torch.zeros_like(ids), rate, 1, word_start=start,
                               generator=torch.Generator().manual_seed(seed)).bool()
    # extend each chosen start over its continuation tokens: segment = index of the word run a token belongs to
    row_offset = torch.arange(ids.shape[0], device=ids.device)[:, None] * (ids.shape[1] + 1)
    segment = (~cont).long().cumsum(-1) + row_offset
    replaced = torch.isin(segment, segment[chosen]) & (start | cont)
    return ids.masked_fill(replaced, int(junk_id)), replaced


def contaminated_loss(model: nn.Module, tokens: np.ndarray, block_size: int, table: TokenWordTable, junk_id: int, *,
                      rate: float = 0.015, max_windows: int = 64, batch_size: int = 16, seed: int = 0,
                      state: DistState | None = None) -> dict[str, float]:
    """Next-token loss on the :func:`window_loss` windows after replacing ``rate`` of their words by ``junk_id``.

    Returns ``{"loss"}`` (targets: the clean text, context: contaminated), ``"loss_junk_targets"`` (the
    contaminated text scored as it is), ``"replaced"`` (fraction of tokens replaced) and ``"tokens"``. All ranks
    contaminate all windows with the same seed, then score their shard.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate: expected a fraction in [0, 1], got {rate!r}")
    state = state or DistState(device=next(model.parameters()).device)
    clean = _windows(tokens, fixed_window_starts(len(tokens), block_size, max_windows), block_size)
    dirty, replaced = contaminate_word_windows(clean, table, rate, junk_id, seed=seed)
    totals = torch.zeros(4, dtype=torch.float64)
    for i in range(state.rank * batch_size, len(clean), batch_size * state.world_size):
        c, d = clean[i: i + batch_size].to(state.device), dirty[i: i + batch_size].to(state.device)
        logits = lm_logits(model, d[:, :-1]).float()
        flat = logits.reshape(-1, logits.shape[-1])
        totals[0] += F.cross_entropy(flat, c[:, 1:].reshape(-1), reduction="sum").double().cpu()
        totals[1] += F.cross_entropy(flat, d[:, 1:].reshape(-1), reduction="sum").double().cpu()
        totals[2] += float(replaced[i: i + batch_size, 1:].sum())
        totals[3] += c[:, 1:].numel()
    clean_sum, junk_sum, n_replaced, count = all_reduce_tensor(totals, state, "sum").tolist()
    count = max(count, 1.0)
    return {"loss": clean_sum / count, "loss_junk_targets": junk_sum / count, "replaced": n_replaced / count,
            "tokens": count}


# ----------------------------------------------------------------------------------------------------- last word


@dataclasses.dataclass(frozen=True)
class LastWordPassage:
    """Text ``prompt`` (ending right before the space that precedes ``target``) and the word to predict."""

    prompt: str
    target: str


_LAST_WORD = re.compile(r"(?P<space>\s)(?P<word>[A-Za-z]{2,})(?P<tail>[.!?;:]['\")\]]*)\s*$")
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)")


def first_word(text: str) -> str:
    """The first alphabetic word of ``text`` after leading whitespace ("" if it starts otherwise)."""
    m = _FIRST_WORD.match(text)
    return m.group(1) if m else ""


def last_word_passages(texts: Sequence[str], n: int = 200, *, min_context_chars: int = 256) -> list[LastWordPassage]:
    """``n`` passages (evenly spaced over the candidates, deterministic) from documents ``texts``.

    A candidate is a line ending a sentence (``.!?;:``, optionally followed by a closing quote/bracket) whose last
    word has at least two letters and at least ``min_context_chars`` of the same document before it.
    """
    if n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n!r}")
    candidates = []
    for text in texts:
        pos = 0
        for line in text.splitlines(keepends=True):
            m = _LAST_WORD.search(line)
            if m is not None:
                word_start = pos + m.start("word")
                if word_start - 1 >= min_context_chars:
                    candidates.append((text, word_start - 1, m.group("word")))  # prompt ends before the space
            pos += len(line)
    if not candidates:
        raise ValueError(f"no last-word passages found ({len(texts)} documents; need lines ending a sentence with "
                         f">= {min_context_chars} characters of context)")
    pick = np.unique(np.linspace(0, len(candidates) - 1, num=min(n, len(candidates))).round().astype(int))
    return [LastWordPassage(candidates[i][0][max(0, candidates[i][1] - 4 * min_context_chars): candidates[i][1]],
                            candidates[i][2]) for i in pick]


def _greedy(model: nn.Module, ids: Tensor, max_new_tokens: int, eos_token_id: int | None) -> Tensor:
    """Greedy continuation tokens [B, max_new_tokens] (HF ``generate`` when the model has it)."""
    if callable(getattr(model, "generate", None)):
        from transformers import GenerationConfig

        gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                               num_beams=1, pad_token_id=eos_token_id, eos_token_id=None, bos_token_id=None)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        return out[:, ids.shape[1]:]
    seq = ids
    for _ in range(max_new_tokens):
        nxt = lm_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1]:]


def last_word_accuracy(model: nn.Module, tokenizer: Any, passages: Sequence[LastWordPassage], *, context_tokens: int,
                       max_new_tokens: int | None = None, batch_size: int = 32,
                       state: DistState | None = None) -> dict[str, float]:
    """Fraction of ``passages`` whose greedy continuation starts with the target word.

    Each prompt is the last ``context_tokens`` tokens of the passage text (passages with fewer are skipped, so
    all prompts of a batch have equal length and need no padding). ``max_new_tokens`` defaults to the longest
    tokenized " target" plus one. Returns ``{"acc", "n"}``; under DDP the passages are sharded over ranks.
    """
    state = state or DistState(device=next(model.parameters()).device)
    model = unwrap_model(model)
    prompts, targets = [], []
    for p in passages:
        ids = list(tokenizer.encode(p.prompt))
        if len(ids) >= context_tokens:
            prompts.append(ids[-context_tokens:])
            targets.append(p.target)
    if max_new_tokens is None:
        max_new_tokens = max((len(tokenizer.encode(" " + t)) for t in targets), default=1) + 1
    limit = getattr(getattr(model, "config", None), "n_positions", None)
    if limit is not None and context_tokens + max_new_tokens > limit:
        raise ValueError(f"last-word evaluation needs context_tokens + max_new_tokens = {context_tokens} + "
                         f"{max_new_tokens} <= the model's context n_positions={limit}")
    totals = torch.zeros(2, dtype=torch.float64)
    mine = list(range(state.rank, len(prompts), state.world_size))
    eos = getattr(tokenizer, "eos_token_id", None)
    for i in range(0, len(mine), batch_size):
        idx = mine[i: i + batch_size]
        ids = torch.tensor([prompts[j] for j in idx], dtype=torch.long, device=state.device)
        new = _greedy(model, ids, max_new_tokens, eos).cpu()
        for j, row in zip(idx, new):
            totals[0] += float(first_word(tokenizer.decode(row.tolist(), skip_special_tokens=True)) == targets[j])
        totals[1] += len(idx)
    correct, count = all_reduce_tensor(totals, state, "sum").tolist()
    return {"acc": correct / count if count else math.nan, "n": count}


# ----------------------------------------------------------------------------------------------------- ICL


@dataclasses.dataclass(frozen=True)
class ICLData:
    """In-context linear regression settings: input dimension ``dim``, ``n_points`` (x, y) pairs per prompt,
    Gaussian label noise ``noise_std`` (0: noiseless, as in Garg et al.), ``eval_prompts`` fixed test prompts."""

    dim: int = 5
    n_points: int = 20
    noise_std: float = 0.0
    eval_prompts: int = 1000
    eval_seed: int = 12345

    def __post_init__(self):
        if self.dim < 1 or self.n_points < 1 or self.eval_prompts < 1:
            raise ValueError(f"dim, n_points and eval_prompts must be >= 1, got {self.dim}, {self.n_points}, "
                             f"{self.eval_prompts}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


def icl_batch(batch: int, data: ICLData, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(xs [B, k, d], ys [B, k], ws [B, d]) with x, w ~ N(0, I_d) and y = w.x (+ noise)."""
    xs = torch.randn(batch, data.n_points, data.dim, generator=generator)
    ws = torch.randn(batch, data.dim, generator=generator)
    ys = torch.einsum("bkd,bd->bk", xs, ws)
    if data.noise_std > 0:
        ys = ys + data.noise_std * torch.randn(ys.shape, generator=generator)
    return xs, ys, ws


class ICLRegressor(nn.Module):
    """Linear read-in -> causal backbone (``inputs_embeds``) -> linear read-out at the x tokens.

    The prompt is the token sequence x_1, [y_1, 0, ..., 0], x_2, [y_2, 0, ...], ... (2k tokens of width d); the
    prediction for y_i is read at the token of x_i, so it sees the i-1 earlier pairs only.
    ``backbone`` is a base model (``GPT2Model`` / ``UnrollAttnModel``) taking ``inputs_embeds``.
    """

    def __init__(self, backbone: nn.Module, dim: int, width: int):
        super().__init__()
        self.dim = dim
        self.read_in = nn.Linear(dim, width)
        self.backbone = backbone
        self.read_out = nn.Linear(width, 1)

    def forward(self, xs: Tensor, ys: Tensor) -> Tensor:
        b, k, d = xs.shape
        if d != self.dim or ys.shape != (b, k):
            raise ValueError(f"expected xs [B, k, {self.dim}] and ys [B, k], got {list(xs.shape)} and {list(ys.shape)}")
        y_tokens = F.pad(ys[..., None], (0, d - 1))
        z = torch.stack([xs, y_tokens], dim=2).reshape(b, 2 * k, d)
        hidden = self.backbone(inputs_embeds=self.read_in(z)).last_hidden_state
        return self.read_out(hidden[:, 0::2]).squeeze(-1)


def least_squares_curve(xs: Tensor, ys: Tensor) -> Tensor:
    """Squared error / d of the minimum-norm least-squares estimate from the first i pairs, for i = 0..k-1."""
    b, k, d = xs.shape
    errors = torch.empty(k, dtype=torch.float64)
    xs64, ys64 = xs.double(), ys.double()
    for i in range(k):
        if i == 0:
            pred = torch.zeros(b, dtype=torch.float64)
        else:
            w_hat = (torch.linalg.pinv(xs64[:, :i]) @ ys64[:, :i, None]).squeeze(-1)  # [B, d]
            pred = torch.einsum("bd,bd->b", xs64[:, i], w_hat)
        errors[i] = ((pred - ys64[:, i]) ** 2).mean() / d
    return errors


def icl_error_curve(model: nn.Module, xs: Tensor, ys: Tensor, batch_size: int = 500) -> Tensor:
    """Mean squared error / d of ``model``'s prediction of y_i, for i = 0..k-1 earlier examples."""
    sums = torch.zeros(xs.shape[1], dtype=torch.float64)
    device = next(model.parameters()).device
    for i in range(0, xs.shape[0], batch_size):
        x, y = xs[i: i + batch_size].to(device), ys[i: i + batch_size].to(device)
        sums += ((model(x, y).float() - y) ** 2).sum(0).double().cpu()
    return sums / (xs.shape[0] * xs.shape[2])


class ICLRegressionTask:
    """:class:`unrollattn.train.Task` of in-context linear regression for a causal backbone.

    ``build_backbone()`` returns a base model taking ``inputs_embeds`` with hidden width ``width`` and a context of
    at least ``2 * data.n_points``. Training prompts are drawn afresh every step (seeded by step, micro-batch and
    rank); ``evaluate`` uses ``data.eval_prompts`` fixed prompts and reports ``val_loss`` (mean over positions of
    squared error / d) and ``icl_err_k<i>`` after i = 0, 1, d/2, d, 2d, k-1 examples; ``export`` writes the whole
    curve with baselines (icl_curve.csv / .md / .png).
    """

    loss_label = "squared error / d (per query)"

    def __init__(self, build_backbone: Callable[[], nn.Module], width: int, data: ICLData, *, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, label: str = "model"):
        self.build_backbone = build_backbone
        self.width = width
        self.data = data
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.label = label
        gen = torch.Generator().manual_seed(data.eval_seed)
        self.eval_xs, self.eval_ys, _ = icl_batch(data.eval_prompts, data, gen)

    def build_model(self) -> nn.Module:
        return ICLRegressor(self.build_backbone(), self.data.dim, self.width)

    def batch(self, step: int, micro: int, state: DistState) -> dict[str, Tensor]:
        keep = micro_batch_slice(self.batch_size, self.grad_accum, state.world_size, micro, state.rank)
        gen = torch.Generator().manual_seed(global_batch_seed(self.seed, step))
        xs, ys, _ = icl_batch(self.batch_size, self.data, gen)
        return {"xs": xs[keep], "ys": ys[keep]}

    def loss(self, model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        pred = model(batch["xs"], batch["ys"]).float()
        return F.mse_loss(pred, batch["ys"]) / self.data.dim, {}

    def report_points(self) -> list[int]:
        d, k = self.data.dim, self.data.n_points
        return sorted({i for i in (0, 1, d // 2, d, 2 * d, k - 1) if 0 <= i < k})

    def evaluate(self, model: nn.Module, state: DistState) -> dict[str, float]:
        shard = slice(state.rank, None, state.world_size)
        curve = icl_error_curve(model, self.eval_xs[shard], self.eval_ys[shard])
        n = torch.tensor([float(self.eval_xs[shard].shape[0])], dtype=torch.float64)
        summed = all_reduce_tensor(torch.cat([curve * n, n]), state, "sum")
        curve = summed[:-1] / summed[-1]
        out = {"val_loss": float(curve.mean())}
        out.update({f"icl_err_k{i}": float(curve[i]) for i in self.report_points()})
        return out

    def items_per_batch(self, batch: Mapping[str, Tensor]) -> int:
        return int(batch["xs"].shape[0] * batch["xs"].shape[1] * 2)  # tokens

    def curve_rows(self, model: nn.Module) -> list[dict[str, float]]:
        """Rows ``{"k", <label>, "least_squares", "zero"}`` of squared error / d against in-context examples."""
        was = model.training
        model.eval()
        with torch.no_grad():
            ours = icl_error_curve(model, self.eval_xs, self.eval_ys)
        model.train(was)
        ls = least_squares_curve(self.eval_xs, self.eval_ys)
        zero = (self.eval_ys.double() ** 2).mean(0) / self.data.dim
        return [{"k": i, self.label: float(ours[i]), "least_squares": float(ls[i]), "zero": float(zero[i])}
                for i in range(self.data.n_points)]

    def export(self, model: nn.Module, run_dir: Path) -> None:
        write_icl_curves(self.curve_rows(unwrap_model(model)), Path(run_dir), stem="icl_curve",
                         title=f"in-context linear regression, d={self.data.dim}: {self.label}")


def write_icl_curves(rows: Sequence[Mapping[str, float]], out_dir: Path, *, stem: str = "icl_curves",
                     title: str = "in-context linear regression") -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.md`` and ``<stem>.png`` (error / d against k) from ``rows``
    (each ``{"k": i, <series>: error, ...}``); returns the paths."""
    if not rows:
        raise ValueError("write_icl_curves: no rows")
    series = [c for c in rows[0] if c != "k"]
    rows = [{"k": int(r["k"]), **{s: float(r[s]) for s in series}} for r in rows]
    out_dir = Path(out_dir)
    paths = {"csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    write_table(rows, ["k", *series], paths["md"], paths["csv"], headers={"k": "k (in-context examples)"},
                heading=f"{title}: squared error / d")
    baseline_styles = {"least_squares": {"color": "k", "linestyle": "--", "linewidth": 1.0},
                       "zero": {"color": "k", "linestyle": ":", "linewidth": 1.0}}
    ks = [r["k"] for r in rows]
    lines = [Series(ks, [r[s] for r in rows], label=s,
                    style=baseline_styles.get(s, {"color": f"C{i % 10}", "linewidth": 1.6}))
             for i, s in enumerate(series)]
    fig, axes = new_figure()
    draw_series(axes[0, 0], lines, xlabel="in-context examples k", ylabel="squared error / d", title=title)
    axes[0, 0].set_ylim(bottom=0.0)
    fig.tight_layout()
    save_figure(fig, paths["png"])
    return paths
