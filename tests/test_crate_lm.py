"""Causal CRATE LM with CRATE-alpha's residual sparse coding (the recipe's ``crate_alpha`` variant) learns: a tiny model
leaves the unigram loss within a few optimiser steps on a tiny deterministic corpus (regression test for the
quick-preset CRATE that stayed at the unigram loss)."""
import math

import torch

from unrollattn.language import UnrollAttnConfig, UnrollAttnForCausalLM
from unrollattn.layers.blocks import SparseCodingStep
from unrollattn.registry import build_model

V = 16


def _train(block_options, n_layer, steps=25):
    torch.manual_seed(0)
    successor = torch.randperm(V)  # the corpus: each token determines the next one (bigram entropy 0)
    starts = torch.randint(0, V, (steps, 8))
    model = UnrollAttnForCausalLM(UnrollAttnConfig(attention="mssa", block="crate", block_options=block_options,
                                                   n_layer=n_layer, n_embd=32, n_head=4, vocab_size=V, n_positions=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for s in range(steps):
        seq = [starts[s]]
        for _ in range(31):
            seq.append(successor[seq[-1]])
        ids = torch.stack(seq, 1)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss.item()


def test_crate_alpha_lm_leaves_the_unigram_loss():
    model, loss = _train({"ista": "alpha"}, n_layer=12)
    assert isinstance(model.transformer.h[0].block.ista, SparseCodingStep)
    assert loss < 0.85 * math.log(V)  # unigram loss = log V on this corpus


def test_crate_alpha_preset_matches_gpt2_tiny_parameters_and_scales_its_decoder():
    alpha = build_model("crate_alpha_lm_tiny", vocab_size=V)
    gpt2 = build_model("gpt2_tiny", vocab_size=V, bos_token_id=None, eos_token_id=None)
    n_alpha, n_gpt2 = (sum(p.numel() for p in m.parameters()) for m in (alpha, gpt2))
    assert abs(n_alpha / n_gpt2 - 1) < 0.01
    decoder = alpha.transformer.h[0].block.ista.decoder.weight  # residual branch: GPT-2's 1/sqrt(#branches) scaling
    assert decoder.std().item() < 0.02 / math.sqrt(12)
