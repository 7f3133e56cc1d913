"""Layer-owned incremental decoding: every registered attention, in UnrollAttnForCausalLM and in HF GPT-2 patched
with ``patch_gpt2``, decodes with a KV cache exactly as without one (greedy, left padding, chunks, static cache);
the attentions that claim O(T d) work per new token never recompute their prefix."""
import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

from unrollattn import get_attention, list_attentions
from unrollattn.language import UnrollAttnConfig, UnrollAttnForCausalLM, build_gpt2, patch_gpt2
from unrollattn.language.hf_compat import CACHE_FIELD  # the cache keyword of the running release's forwards

V = 61
ATTENTIONS = list_attentions()  # every registered attention: a new variant is covered without editing this file
KINDS = ("unrollattn", "gpt2")
INCREMENTAL = ("mhsa", "mssa", "gaussian", "mahalanobis", "bilateral")  # must not recompute their prefix (issue contract)


def build(kind: str, attention: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    size = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)
    if kind == "unrollattn":
        model = UnrollAttnForCausalLM(UnrollAttnConfig(attention=attention, block="transformer", attn_options=options,
                                                       **size))
    else:
        model = patch_gpt2(build_gpt2(bos_token_id=0, eos_token_id=0, **size), attention, **options)
    return model.eval()


def left_padded(ids: torch.Tensor, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 1 loses its first ``pad`` tokens to left padding."""
    ids, mask = ids.clone(), torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


GREEDY = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_cached_greedy_equals_uncached_and_padding_changes_nothing(kind, attention):
    model = build(kind, attention)
    ids = torch.randint(1, V, (2, 7))
    cached = model.generate(ids, use_cache=True, **GREEDY)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **GREEDY))
    padded, mask = left_padded(ids)
    batch = model.generate(padded, attention_mask=mask, use_cache=True, **GREEDY)
    assert torch.equal(batch, model.generate(padded, attention_mask=mask, use_cache=False, **GREEDY))
    alone = model.generate(ids[1:, 3:], use_cache=True, **GREEDY)
    assert torch.equal(batch[1, 7:], alone[0, 4:])  # the padded row generates as if it were alone
    assert torch.equal(batch[0], cached[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_every_attention_is_causal(kind, attention):
    """Changing token t changes no logit before t (every registered attention, both LM scaffolds)."""
    model = build(kind, attention)
    ids = torch.randint(1, V, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % V
    before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after[:, 6:], before[:, 6:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_static_cache_matches_dynamic(kind, attention):
    model = build(kind, attention)
    ids = torch.randint(1, V, (2, 6))
    dynamic = model.generate(ids, **GREEDY)
    assert torch.equal(model.generate(ids, cache_implementation="static", **GREEDY), dynamic)
    padded, mask = left_padded(ids)
    assert torch.equal(model.generate(padded, attention_mask=mask, cache_implementation="static", **GREEDY),
                       model.generate(padded, attention_mask=mask, use_cache=False, **GREEDY))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_chunked_decoding_logits_match_full_forward(kind, attention):
    model = build(kind, attention)
    ids, mask = left_padded(torch.randint(1, V, (2, 11)))
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache, logits = DynamicCache(config=model.config), []
    for lo, hi in ((0, 4), (4, 5), (5, 8), (8, 11)):  # prefill, one token, chunks (offset causal masks)
        out = model(ids[:, lo:hi], attention_mask=mask[:, :hi], use_cache=True, **{CACHE_FIELD: cache})
        logits.append(out.logits)
    assert cache.get_seq_length() == 11
    valid = mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[valid], full[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ["mssa", "bilateral", "twicing"])
def test_sampling_and_beam_search_run(kind, attention):
    model = build(kind, attention)
    ids = torch.randint(1, V, (2, 5))
    torch.manual_seed(1)
    sampled = model.generate(ids, do_sample=True, top_k=10, temperature=0.8, max_new_tokens=6, pad_token_id=0)
    assert sampled.shape == (2, 11) and int(sampled.max()) < V
    beams = model.generate(ids, num_beams=3, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    assert beams.shape == (2, 11)
    beams_uncached = model.generate(ids, num_beams=3, do_sample=False, max_new_tokens=6, pad_token_id=0,
                                    eos_token_id=None, use_cache=False)
    assert torch.equal(beams, beams_uncached)  # beam reordering of the cache (reorder_cache) keeps it exact


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_decode_work_per_token_matches_what_the_layer_declares(attention, monkeypatch):
    """In a one-token step every linear map sees one token when the attention claims incremental decoding, and the
    attention's maps see the whole prefix when it declares that it recomputes (``unrollattn list`` shows this)."""
    model = build("unrollattn", attention)
    declared = get_attention(attention).decode_recomputes_prefix
    if attention in INCREMENTAL:
        assert not declared
    ids = torch.randint(1, V, (1, 9))
    cache = getattr(model(ids[:, :8], use_cache=True), CACHE_FIELD)
    tokens_seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, *a, **k: tokens_seen.append(x.shape[-2]) or linear(x, *a, **k))
    model(ids[:, 8:], use_cache=True, **{CACHE_FIELD: cache})
    assert max(tokens_seen) == (9 if declared else 1)


@pytest.mark.parametrize("attention, options", [("alibi", {}), ("bilateral", {}), ("gaussian", {}),
                                                ("bilateral", {"tie_bandwidths": True, "spatial_kernel": "laplacian"})])
@torch.no_grad()
def test_decoding_follows_bandwidths_changed_between_calls(attention, options):
    """A decoding step keeps the bandwidths it derived while the parameters stay as they are; an in-place update (an
    optimizer step) or a loaded state dict between two generate calls reaches the next one."""
    model = build("unrollattn", attention, **options)
    ids = torch.randint(1, V, (1, 6))

    def last_step_logits():
        past = getattr(model(ids[:, :-1], use_cache=True), CACHE_FIELD)
        return model(ids[:, -1:], use_cache=True, **{CACHE_FIELD: past}).logits[:, -1]

    model.generate(ids, use_cache=True, **GREEDY)
    for name, param in model.named_parameters():
        if "bandwidth" in name:
            param.mul_(torch.linspace(0.3, 1.7, param.numel()).view_as(param))
    torch.testing.assert_close(last_step_logits(), model(ids).logits[:, -1], rtol=1e-4, atol=1e-5)
    other = build("unrollattn", attention, seed=1, **options)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(last_step_logits(), other(ids).logits[:, -1], rtol=1e-4, atol=1e-5)


def test_attention_without_its_own_cached_step_recomputes():
    """A subclass that changes the token mixing but not the cached step cannot decode with the parent's step."""
    mhsa = get_attention("mhsa")

    class Scaled(mhsa):
        def attend(self, x, attn_mask, is_causal, grid=None):
            return 2 * super().attend(x, attn_mask, is_causal, grid)

    assert not mhsa.decode_recomputes_prefix and Scaled.decode_recomputes_prefix
    layer = Scaled(16, 2).eval()
    x = torch.randn(1, 5, 16)
    cache = DynamicCache()
    out = torch.cat([layer.decode(x[:, :3], cache, 0), layer.decode(x[:, 3:], cache, 0)], 1)
    torch.testing.assert_close(out, layer(x, is_causal=True))


@pytest.mark.parametrize("kind", KINDS)
def test_cache_under_an_unknown_name_fails_loudly(kind):
    """What transformers 5.24's rename did silently (a cache the forward did not know) is now a TypeError."""
    model = build(kind, "mssa")
    ids = torch.randint(1, V, (1, 4))
    if kind == "unrollattn":
        call = lambda: model(ids, kv_cache=DynamicCache(), use_cache=True)  # noqa: E731
    else:  # the swapped attention module itself sees GPT2Block's keywords
        block = model.transformer.h[0]
        call = lambda: block.attn(torch.randn(1, 4, 32), kv_cache=DynamicCache())  # noqa: E731
    with pytest.raises(TypeError, match=rf"KV cache.*transformers {transformers.__version__}"):
        call()


def test_cache_and_past_key_values_are_one_argument():
    model = build("unrollattn", "mhsa")
    ids = torch.randint(1, V, (1, 6))
    first = model(ids[:, :4], past_key_values=DynamicCache(), use_cache=True)
    cache = getattr(first, CACHE_FIELD)
    assert first.past_key_values is cache  # the pre-5.24 field name reads the same cache
    step = model(ids[:, 4:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step, model(ids).logits[:, 4:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pass the cache once"):
        model(ids, cache=DynamicCache(), past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="legacy tuples"):
        model(ids, cache=((torch.zeros(1), torch.zeros(1)),))


def test_return_dict_false_gives_the_tuple():
    model = build("unrollattn", "mssa")
    ids = torch.randint(1, V, (1, 6))
    out = model(ids, labels=ids, use_cache=True)
    loss, logits, cache = model(ids, labels=ids, use_cache=True, return_dict=False)
    torch.testing.assert_close(loss, out.loss)
    torch.testing.assert_close(logits, out.logits)
    assert cache.get_seq_length() == 6


def test_sliding_window_cache_is_refused_clearly():
    model = build("unrollattn", "mhsa")
    cache = DynamicCache()
    cache.layers = [DynamicSlidingWindowLayer(sliding_window=4) for _ in range(2)]
    cache.layer_class_to_replicate = None
    ids = torch.randint(1, V, (1, 6))
    model(ids[:, :3], cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="need every past token"):
        for t in range(3, 6):
            model(ids[:, t:t + 1], cache=cache, use_cache=True)
