"""GPT-2 baseline tiers: module swap (patch_gpt2), the in-house twin, and AttentionInterface kernels."""
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import unrollattn.language as L
from unrollattn.language.gpt2 import GPT2UnrollAttention
from unrollattn.language.hf_attention import HF_KERNELS, gaussian_logits, make_attention_function

V = 97


def gpt2_config(**kw):
    cfg = dict(n_embd=32, n_head=4, n_layer=2, n_positions=64, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    cfg.update(kw)
    return GPT2Config(**cfg)


def gpt2(attn_implementation=None, **kw):
    cfg = gpt2_config(**kw)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return GPT2LMHeadModel(cfg).eval()



def left_padded(ids, pad=3):
    mask = torch.ones_like(ids)
    ids = ids.clone()
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)  # GPT2Model does not derive positions from the padding mask


# ------------------------------------------------------------------------------------------------ module swap

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_mhsa_patch_with_copied_weights_keeps_logits(impl):
    model = gpt2(impl)
    ids = torch.randint(0, V, (2, 9))
    padded, mask = left_padded(ids)
    reference = model(ids).logits
    reference_padded = model(padded, attention_mask=mask, position_ids=positions(mask)).logits
    L.patch_gpt2(model, "mhsa", copy_weights=True)
    assert all(isinstance(block.attn, GPT2UnrollAttention) for block in model.transformer.h)
    torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=1e-5)
    out = model(padded, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(out[mask.bool()], reference_padded[mask.bool()], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention, options", [("mhsa", {}), ("mssa", {}), ("mssa", {"nonlinearity": "relu"}),
                                                ("gaussian", {})], ids=["mhsa", "mssa", "mssa-relu", "gaussian"])
def test_patched_gpt2_trains_and_generates_with_cache(attention, options):
    model = L.patch_gpt2(gpt2(), attention, **options)
    assert model.config.unrollattn_patch == {"attention": attention, "options": options}
    ids = torch.randint(0, V, (2, 7))
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.transformer.h[0].attn.parameters() if p.requires_grad)
    model.eval()
    padded, mask = left_padded(ids)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(padded, attention_mask=mask, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(padded, attention_mask=mask, use_cache=False, **kw))
    alone = model.generate(ids[1:, 3:], use_cache=True, **kw)
    assert torch.equal(cached[1, 7:], alone[0, 4:])


def test_mssa_patch_caches_shared_projection_and_is_smaller():
    base = sum(p.numel() for p in gpt2().parameters())
    model = L.patch_gpt2(gpt2(), "mssa")
    assert base - sum(p.numel() for p in model.parameters()) == 2 * (2 * (32 * 32 + 32))  # no W_K, W_V per layer
    cache = model(torch.randint(0, V, (2, 5)), use_cache=True).past_key_values
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert keys.shape == (2, 4, 5, 8) and values.shape == (2, 4, 5, 0)  # U_k^T z once: keys are the values


@pytest.mark.parametrize("attention", ["mhsa", "mssa"])
def test_patched_gpt2_with_static_cache(attention):
    model = L.patch_gpt2(gpt2(), attention)
    padded, mask = left_padded(torch.randint(0, V, (2, 7)))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=mask)
    static = model.generate(padded, cache_implementation="static", **kw)
    assert torch.equal(static, model.generate(padded, use_cache=False, **kw))


def test_patch_initialises_like_gpt2():
    model = L.patch_gpt2(gpt2(n_embd=256, n_layer=8, n_head=4), "mssa")
    layer = model.transformer.h[0].attn.layer
    assert layer.subspace.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # / sqrt(2 n_layer)
    assert not layer.subspace.bias.any() and not layer.proj.bias.any()


def test_patch_rejects_bad_requests():
    with pytest.raises(ValueError, match="unknown attention"):
        L.patch_gpt2(gpt2(), "no_such_attention")
    with pytest.raises(ValueError, match="copy_weights"):
        L.patch_gpt2(gpt2(), "mssa", copy_weights=True)
    with pytest.raises(ValueError, match="transformer.h"):
        L.patch_gpt2(torch.nn.Linear(2, 2), "mssa")


def test_in_house_transformer_equals_gpt2():
    model = gpt2()
    twin = L.transformer_from_gpt2(model)
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(twin(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in twin.parameters()) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ AttentionInterface kernels

@pytest.fixture
def cleanup_registrations():
    names = []
    yield names
    for name in names:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
        if name in HF_KERNELS:
            HF_KERNELS.unregister(name)


def test_kernels_registered_with_eager_mask():
    assert {"unrollattn_gaussian", "unrollattn_dot"} <= set(L.list_hf_kernels())
    for name in ("unrollattn_gaussian", "unrollattn_dot"):
        assert AttentionInterface._global_mapping[name] is HF_KERNELS.get(name)
        assert AttentionMaskInterface._global_mapping[name] is eager_mask
    assert "unrollattn_mssa_qq" not in AttentionInterface._global_mapping  # learned operators need a module swap


def test_gaussian_kernel_in_gpt2_is_causal():
    model = AutoModelForCausalLM.from_config(gpt2_config(), attn_implementation="unrollattn_gaussian").eval()
    assert model.config._attn_implementation == "unrollattn_gaussian"
    ids = torch.randint(0, V, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % V
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4
    model.set_attn_implementation("sdpa")  # a different kernel: the registered one was really used
    assert (model(ids).logits - a).abs().max() > 1e-6


def test_gaussian_kernel_receives_padding_mask():
    model = AutoModelForCausalLM.from_config(gpt2_config(), attn_implementation="unrollattn_gaussian").eval()
    ids = torch.randint(0, V, (2, 8))
    padded, mask = left_padded(ids)
    out = model(padded, attention_mask=mask, position_ids=positions(mask)).logits
    alone = model(ids[1:, 3:]).logits  # only a mask that reaches the kernel can hide the 3 pad tokens
    torch.testing.assert_close(out[1, 3:], alone[0], rtol=0, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(padded, attention_mask=mask, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(padded, attention_mask=mask, use_cache=False, **kw))


def test_without_mask_function_the_mask_is_dropped(cleanup_registrations):
    seen = {}

    def spy(tag):
        inner = make_attention_function(gaussian_logits)

        def fn(module, query, key, value, attention_mask, **kwargs):
            seen[tag] = attention_mask
            return inner(module, query, key, value, attention_mask, **kwargs)
        return fn

    AttentionInterface.register("unrollattn_test_nomask", spy("nomask"))
    AttentionInterface.register("unrollattn_test_masked", spy("masked"))
    AttentionMaskInterface.register("unrollattn_test_masked", eager_mask)
    cleanup_registrations += ["unrollattn_test_nomask", "unrollattn_test_masked"]
    ids = torch.randint(0, V, (2, 6))
    padded, mask = left_padded(ids)
    for name in ("unrollattn_test_nomask", "unrollattn_test_masked"):
        AutoModelForCausalLM.from_config(gpt2_config(), attn_implementation=name)(padded, attention_mask=mask)
    assert seen["nomask"] is None  # the HF gotcha: padding (and causal) information silently lost
    assert seen["masked"].shape == (2, 1, 6, 6) and seen["masked"].is_floating_point()


def test_dot_kernel_matches_sdpa():
    model = AutoModelForCausalLM.from_config(gpt2_config(), attn_implementation="unrollattn_dot").eval()
    ids = torch.randint(0, V, (2, 9))
    ours = model(ids).logits
    model.set_attn_implementation("sdpa")
    torch.testing.assert_close(ours, model(ids).logits, rtol=0, atol=1e-5)


def test_gaussian_logits_are_negative_squared_distances():
    q, k = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 7, 8, dtype=torch.float64)
    scaling = 8 ** -0.5
    direct = -torch.cdist(q, k).pow(2) / (2 / scaling)  # -||q_i - k_j||^2 / h^2, h^2 = 2 sqrt(d) (C.9)
    torch.testing.assert_close(gaussian_logits(q, k, scaling=scaling).softmax(-1), direct.softmax(-1))


def test_kernel_without_mask_falls_back_to_module_is_causal():
    fn = HF_KERNELS.get("unrollattn_gaussian")
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    causal_module, plain_module = torch.nn.Module(), torch.nn.Module()
    causal_module.is_causal, plain_module.is_causal = True, False
    bool_mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(fn(causal_module, q, k, v, None)[0], fn(plain_module, q, k, v, bool_mask)[0])
    assert fn(causal_module, q, k, v, None)[0].shape == (1, 5, 2, 4)
    assert (fn(plain_module, q, k, v, None)[0] - fn(causal_module, q, k, v, None)[0]).abs().max() > 1e-4


def test_register_custom_kernel(cleanup_registrations):
    def laplace(query, key, *, scaling, module=None):  # -||q - k||_1 * scaling
        return -torch.cdist(query, key, p=1) * scaling

    name = L.register_hf_kernel("test_laplace", laplace)
    cleanup_registrations.append(name)
    assert name == "unrollattn_test_laplace" and AttentionMaskInterface._global_mapping[name] is eager_mask
    model = AutoModelForCausalLM.from_config(gpt2_config(), attn_implementation=name).eval()
    ids = torch.randint(0, V, (1, 6))
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % V
    torch.testing.assert_close(model(ids).logits[:, :4], model(changed).logits[:, :4], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        L.register_hf_kernel("", laplace)


def test_the_gpt2_anchor_runs_torchs_tanh_gelu_which_equals_hfs_default():
    import unrollattn

    fast = unrollattn.build_model("gpt2_tiny", n_layer=1).double().eval()
    assert fast.config.activation_function == "gelu_pytorch_tanh"
    slow = unrollattn.build_model("gpt2_tiny", n_layer=1, activation_function="gelu_new").double().eval()
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, fast.config.vocab_size, (2, 12))
    torch.testing.assert_close(fast(ids).logits, slow(ids).logits, rtol=0, atol=1e-12)
