"""Text corpora prepared once into memory-mapped token files (docs/data.md sections 3 and 5).

Corpus names (``prepare_corpus(name, tokenizer)``; a comma-separated list means "the first available"):

- ``kjv``: King James Bible from Debian ``bible-kjv`` (``bible -l100000 gen1:1-rev22:21``), one document per book
  (66), chapter headers and one numbered verse per line, as the ``bible`` program prints them.
- ``austen``: the six novels of Debian ``r-cran-janeaustenr``, unpacked by ``install.sh`` (``apt-get download`` +
  ``dpkg-deb -x``, so R itself is never installed) into ``<data root>/debian/r-cran-janeaustenr`` (or installed
  system-wide); the R lazy-load database is read with the ``rdata`` package. One document per novel. Nothing is
  fetched at run time: a missing package is a :class:`CorpusUnavailable` naming the install step.
- ``music21_en``: Austen's *Lady Susan* excerpt shipped by the ``music21`` wheel (optional, 127 kB).
- ``text:<path or glob>``: local UTF-8 text files, one document per file (sorted by path).
- ``<a>+<b>[+...]``: the documents of named corpora one after another (``kjv+austen``: both, the largest English
  text this machine ships); available when every part is.
- ``hf:<dataset>[:<config>]``: a HF ``datasets`` corpus with a ``text`` column (``hf:openwebtext``,
  ``hf:wikitext:wikitext-103-raw-v1``), when the network (or the local HF cache) allows.

Split (fixed, deterministic): for local corpora the last ``val_fraction`` of every document (cut at the first
line start after that point) is validation, the rest training; an ``hf:`` corpus uses its own ``validation``
split when it has one, else every ``round(1/val_fraction)``-th document. Each document part ends with the
tokenizer's end-of-text id.

Storage: ``<data root>/tokens/<corpus>-<tokenizer>-val<fraction>-<key>/`` holds ``train.bin`` and ``val.bin``
(``np.memmap``, uint16 when the vocabulary fits, else uint32) and ``meta.json``. Every file is written under a
temporary name and moved into place with ``os.replace``; ``meta.json`` (token counts and SHA-256 of both files) is
written last and removed first when a directory is re-prepared, and a directory is trusted only when meta.json
matches the files. An interrupted preparation therefore leaves nothing a later run uses; preparing again
reuses complete files. The data root is ``$UNROLLATTN_DATA`` or ``~/.cache/unrollattn``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..utils.io import atomic_path, atomic_write_json, sha256_file
from .tokenizer import ByteTokenizer, get_tokenizer, hub_reachable, tokenizer_key

__all__ = [
    "AUSTEN_DEB", "AUSTEN_INSTALL", "CORPORA", "DATA_ENV", "FORMAT_VERSION", "CorpusUnavailable", "Document",
    "TokenCorpus",
    "austen_documents", "corpus_available", "corpus_key", "data_root", "kjv_documents", "list_corpora",
    "load_documents", "music21_documents", "prepare_corpus", "resolve_corpus", "split_document", "text_documents",
]

DATA_ENV = "UNROLLATTN_DATA"
FORMAT_VERSION = 1
AUSTEN_DEB = "r-cran-janeaustenr"
_AUSTEN_DATA = Path("usr/lib/R/site-library/janeaustenr/data")
_SPLITS = ("train", "val")


class CorpusUnavailable(FileNotFoundError):
    """A corpus cannot be read on this machine; the message says how to install it."""


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a corpus: a name (book, novel, file) and its text."""

    name: str
    text: str


def data_root() -> Path:
    """``$UNROLLATTN_DATA`` or ``~/.cache/unrollattn``."""
    root = os.environ.get(DATA_ENV, "").strip()
    return Path(root).expanduser() if root else Path.home() / ".cache" / "unrollattn"


# ----------------------------------------------------------------------------------------------------- sources


_KJV_HEADER = re.compile(r"^(?P<book>\S.*?) (?P<chapter>\d+)$")


def kjv_documents() -> list[Document]:
    """The King James Bible as 66 documents (one per book), from the Debian ``bible`` program."""
    exe = shutil.which("bible")
    if exe is None:
        raise CorpusUnavailable("corpus 'kjv' needs the Debian package bible-kjv: apt-get install -y bible-kjv")
    out = subprocess.run([exe, "-l100000", "gen1:1-rev22:21"], capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or not out.stdout.strip():
        raise CorpusUnavailable(f"'bible -l100000 gen1:1-rev22:21' failed (exit {out.returncode}): "
                                f"{out.stderr.strip()[:200]}; reinstall with apt-get install -y --reinstall bible-kjv")
    books: list[tuple[str, list[str]]] = []
    for line in out.stdout.splitlines():
        header = _KJV_HEADER.match(line)
        if header:
            if not books or books[-1][0] != header["book"]:
                books.append((header["book"], []))
        elif not books:
            continue  # blank lines before the first header
        books[-1][1].append(line)
    docs = [Document(name, "\n".join(lines).strip("\n") + "\n") for name, lines in books]
    if len(docs) != 66:
        raise ValueError(f"corpus 'kjv': expected 66 books from the bible program, found {len(docs)}")
    return docs


def _austen_candidates(root: Path) -> list[Path]:
    return [Path("/") / _AUSTEN_DATA, root / "debian" / AUSTEN_DEB / _AUSTEN_DATA]


AUSTEN_INSTALL = (f"run `bash install.sh` as root (it unpacks the Debian package {AUSTEN_DEB} into the data root "
                  f"without installing R, and pip-installs rdata)")


def austen_data_dir(root: Path | None = None) -> Path:
    """Directory holding janeaustenr's ``Rdata.rdx`` / ``Rdata.rdb`` (unpacked by install.sh, or installed)."""
    root = data_root() if root is None else Path(root)
    candidates = _austen_candidates(root)
    for cand in candidates:
        if (cand / "Rdata.rdx").is_file() and (cand / "Rdata.rdb").is_file():
            return cand
    raise CorpusUnavailable(f"corpus 'austen' needs the R data of {AUSTEN_DEB} (Rdata.rdx, Rdata.rdb) in one of "
                            f"{', '.join(str(c) for c in candidates)}: {AUSTEN_INSTALL}")


def austen_documents(root: Path | None = None) -> list[Document]:
    """Jane Austen's six novels (one document each, lines joined by newlines) from janeaustenr's R data."""
    try:
        import rdata
    except ImportError:
        raise CorpusUnavailable(f"corpus 'austen' reads R data with the rdata package: pip install rdata, or "
                                f"{AUSTEN_INSTALL}") from None
    import gzip

    data = austen_data_dir(root)

    def convert(raw: bytes) -> Any:
        return rdata.conversion.convert(rdata.parser.parse_data(raw, expand_altrep=True, extension=".rds"))

    index = convert(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    blob = (data / "Rdata.rdb").read_bytes()
    docs = []
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset): int(offset) + int(length)]  # 4-byte length, then a zlib stream
        lines = convert(zlib.decompress(record[4:]))
        docs.append(Document(str(name), "\n".join(str(line) for line in lines).strip("\n") + "\n"))
    if not docs:
        raise ValueError(f"corpus 'austen': no novels found in {data}")
    return docs


def music21_documents() -> list[Document]:
    """``music21/languageExcerpts/trainingData/en.txt`` (Austen's *Lady Susan*); the package is not imported."""
    from importlib.util import find_spec

    spec = find_spec("music21")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailable("corpus 'music21_en' needs the music21 wheel: pip install --no-deps music21==10.5.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "languageExcerpts" / "trainingData" / "en.txt"
    return text_documents(str(path))


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {err.start}); convert it, e.g. "
                         f"iconv -f latin1 -t utf-8") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        text = text[1:]
    if not text.strip():
        raise ValueError(f"{path}: the file is empty (no text to train on)")
    return text


def _text_files(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if any(c in pattern for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise CorpusUnavailable(f"text corpus {pattern!r}: no such file (a path, a directory or a glob pattern)")
    return [f.resolve() for f in files]


def text_documents(pattern: str) -> list[Document]:
    """Local UTF-8 text files (a path, a directory or a glob), one document per file; empty or
    non-UTF-8 files raise ``ValueError`` naming the file."""
    return [Document(str(f), _read_text(f)) for f in _text_files(pattern)]


@dataclasses.dataclass(frozen=True)
class _Source:
    name: str
    description: str
    documents: Callable[[], list[Document]]
    available: Callable[[], bool]


def _kjv_available() -> bool:
    return shutil.which("bible") is not None


def _austen_available() -> bool:
    from importlib.util import find_spec

    if find_spec("rdata") is None:
        return False
    try:
        austen_data_dir()
        return True
    except CorpusUnavailable:
        return False


def _music21_available() -> bool:
    from importlib.util import find_spec

    return find_spec("music21") is not None


CORPORA: dict[str, _Source] = {
    "kjv": _Source("kjv", "King James Bible (Debian bible-kjv), 66 books", kjv_documents, _kjv_available),
    "austen": _Source("austen", "Jane Austen, 6 novels (Debian r-cran-janeaustenr via rdata)", austen_documents,
                      _austen_available),
    "music21_en": _Source("music21_en", "Austen's Lady Susan (music21 languageExcerpts en.txt)", music21_documents,
                          _music21_available),
}


def list_corpora() -> list[str]:
    """The named corpora (``text:`` and ``hf:`` specs come on top)."""
    return list(CORPORA)


def _check_spec(spec: str) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"corpus: expected a name ({', '.join(CORPORA)}), text:<path or glob> or hf:<dataset>, "
                         f"got {spec!r}")
    spec = spec.strip()
    if "+" in spec and not spec.startswith(("text:", "hf:")):
        parts = [p.strip() for p in spec.split("+")]
        if len(parts) < 2 or any(p not in CORPORA for p in parts):
            raise ValueError(f"corpus {spec!r}: expected named corpora ({', '.join(CORPORA)}) joined by '+', "
                             f"such as kjv+austen")
        return "+".join(_check_spec(p) for p in parts)
    if spec.startswith(("text:", "hf:")):
        if not spec.split(":", 1)[1].strip():
            raise ValueError(f"corpus {spec!r}: expected text:<path or glob> or hf:<dataset>[:<config>]")
        return spec
    if spec not in CORPORA:
        import difflib

        close = difflib.get_close_matches(spec, list(CORPORA), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown corpus {spec!r}{hint}; expected one of {', '.join(CORPORA)}, "
                         f"text:<path or glob> or hf:<dataset>[:<config>]")
    return spec


def corpus_available(spec: str) -> bool:
    """Whether :func:`load_documents` can read ``spec`` here (a prepared token cache also counts, see
    :func:`resolve_corpus`). ``hf:`` corpora count as available when the HF hub can be reached."""
    spec = _check_spec(spec)
    if "+" in spec and not spec.startswith("text:"):
        return all(corpus_available(part) for part in spec.split("+"))
    if spec.startswith("text:"):
        try:
            _text_files(spec[5:])
            return True
        except CorpusUnavailable:
            return False
    if spec.startswith("hf:"):
        return hub_reachable()
    return CORPORA[spec].available()


def resolve_corpus(specs: str | Sequence[str], tokenizer=None, val_fraction: float = 0.05,
                   exclude: Iterable[str] = ()) -> str:
    """The first corpus of a comma-separated preference list that is usable here.

    Usable = already prepared for ``tokenizer`` (when given) or readable (:func:`corpus_available`). Names in
    ``exclude`` are skipped. Raises :class:`CorpusUnavailable` listing each corpus with its install line.
    """
    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s and s.strip()]
    if not items:
        raise ValueError(f"corpus: expected one name or a comma-separated list, got {specs!r}")
    items = [_check_spec(s) for s in items]
    excluded = {e.strip() for e in exclude}
    reasons = []
    for spec in items:
        if spec in excluded:
            continue
        if tokenizer is not None and _load_if_complete(_corpus_dir(spec, tokenizer, val_fraction)) is not None:
            return spec
        if corpus_available(spec):
            return spec
        reasons.append(f"{spec}: {_install_hint(spec)}")
    raise CorpusUnavailable("no usable corpus among " + ", ".join(items) + (" (excluding " + ", ".join(sorted(
        excluded)) + ")" if excluded else "") + ". " + "; ".join(reasons))


def _install_hint(spec: str) -> str:
    if "+" in spec and not spec.startswith("text:"):
        return "; ".join(f"{part}: {_install_hint(part)}" for part in spec.split("+") if not corpus_available(part))
    if spec == "kjv":
        return "apt-get install -y bible-kjv"
    if spec == "austen":
        return AUSTEN_INSTALL
    if spec == "music21_en":
        return "pip install --no-deps music21==10.5.0"
    if spec.startswith("hf:"):
        return "needs network access to the HF hub (or the dataset in the local HF cache)"
    return "no such file"


def load_documents(spec: str) -> list[Document]:
    """The documents of a local corpus (``kjv``, ``austen``, ``music21_en``, ``text:...``)."""
    spec = _check_spec(spec)
    if "+" in spec and not spec.startswith("text:"):
        return [doc for part in spec.split("+") for doc in load_documents(part)]
    if spec.startswith("text:"):
        return text_documents(spec[5:])
    if spec.startswith("hf:"):
        raise ValueError(f"{spec}: hf corpora are streamed by prepare_corpus, not loaded as documents")
    return CORPORA[spec].documents()


# ----------------------------------------------------------------------------------------------------- splitting


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val) parts of one document: val is the text from the first line start at or after
    ``len(text) * (1 - val_fraction)`` (the next whitespace if no line starts there); "" if none."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in [0, 1), got {val_fraction!r}")
    if val_fraction == 0.0 or not text:
        return text, ""
    target = int(len(text) * (1.0 - val_fraction))
    cut = text.find("\n", target)
    if cut >= 0:
        cut += 1
    else:
        m = re.compile(r"\s").search(text, target)
        cut = m.start() + 1 if m else len(text)
    if cut >= len(text):
        return text, ""
    return text[:cut], text[cut:]


# ----------------------------------------------------------------------------------------------------- cache


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "corpus"


def corpus_key(spec: str, tokenizer, val_fraction: float) -> str:
    """Directory name of a prepared corpus: corpus, tokenizer, split fraction and a hash of the source identity
    (for ``text:`` corpora the resolved files with their sizes and modification times)."""
    spec = _check_spec(spec)
    identity: dict[str, Any] = {"spec": spec, "format": FORMAT_VERSION, "val_fraction": round(float(val_fraction), 6)}
    if spec.startswith("text:"):
        identity["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in _text_files(spec[5:])]
        name = "text-" + _slug(Path(spec[5:]).name)
    elif spec.startswith("hf:"):
        name = "hf-" + _slug(spec[3:])
    else:
        name = _slug(spec)
    tok = tokenizer_key(tokenizer)
    identity["tokenizer"] = tok
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{name}-{_slug(tok)}-val{val_fraction:g}-{digest}"


def _corpus_dir(spec: str, tokenizer, val_fraction: float, root: Path | None = None) -> Path:
    return (data_root() if root is None else Path(root)) / "tokens" / corpus_key(spec, tokenizer, val_fraction)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclasses.dataclass
class TokenCorpus:
    """A prepared corpus: memory-mapped ``train`` / ``val`` token arrays and their ``meta.json``."""

    path: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    @property
    def name(self) -> str:
        return self.meta["corpus"]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.meta["eos_token_id"])

    def split(self, name: str) -> np.ndarray:
        if name not in _SPLITS:
            raise ValueError(f"split: expected 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val

    def describe(self) -> str:
        return (f"{self.name} ({self.meta['tokenizer']}): {len(self.train):,} train / {len(self.val):,} val tokens "
                f"from {self.meta['documents']} documents")


def _load_if_complete(directory: Path, verify: bool = True) -> TokenCorpus | None:
    """The prepared corpus in ``directory`` if meta.json exists and matches both files, else None."""
    meta_path = directory / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION or set(meta.get("splits", {})) != set(_SPLITS):
            return None
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for split in _SPLITS:
            info = meta["splits"][split]
            path = directory / f"{split}.bin"
            if path.stat().st_size != int(info["tokens"]) * dtype.itemsize:
                return None
            if verify and sha256_file(path) != info["sha256"]:
                return None
            arrays[split] = (np.memmap(path, dtype=dtype, mode="r") if info["tokens"] > 0
                             else np.zeros(0, dtype=dtype))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenCorpus(directory, meta, arrays["train"], arrays["val"])


@contextlib.contextmanager
def _locked(directory: Path):
    """Exclusive lock on ``directory/.lock`` (no-op where fcntl is missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(directory / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_tokens(path: Path, chunks: Iterable[np.ndarray], total: int, dtype: np.dtype) -> str:
    """Write the concatenated ``chunks`` (``total`` tokens) to ``path`` through a temporary file moved into place
    with ``os.replace`` (:func:`unrollattn.utils.io.atomic_path`); return the file's sha256."""
    with atomic_path(path) as tmp:
        if total > 0:
            out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(total,))
            pos = 0
            for chunk in chunks:
                out[pos: pos + len(chunk)] = chunk
                pos += len(chunk)
            if pos != total:
                raise RuntimeError(f"{path.name}: wrote {pos} tokens, expected {total}")
            out.flush()
            del out
        digest = sha256_file(tmp)
    return digest


def _encode_fn(tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    eos = int(tokenizer.eos_token_id)
    if isinstance(tokenizer, ByteTokenizer):
        def encode(texts: list[str]) -> list[np.ndarray]:
            return [np.append(np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64), eos) for t in texts]
    else:
        def encode(texts: list[str]) -> list[np.ndarray]:
            ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            return [np.asarray(list(i) + [eos], dtype=np.int64) for i in ids]
    return encode


def _local_splits(spec: str, val_fraction: float):
    """(documents, DatasetDict with train/val ``text`` columns) of a local corpus."""
    import datasets

    docs = load_documents(spec)
    parts = {"train": [], "val": []}
    for doc in docs:
        train, val = split_document(doc.text, val_fraction)
        if train:
            parts["train"].append(train)
        if val:
            parts["val"].append(val)
    return len(docs), "tail of each document", datasets.DatasetDict(
        {k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()})


def _hf_splits(spec: str, val_fraction: float):
    import datasets

    ds = _load_hf(spec)
    if "train" not in ds or "text" not in ds["train"].column_names:
        raise ValueError(f"corpus {spec!r}: expected a 'train' split with a 'text' column, got splits {list(ds)} "
                         f"with columns {ds[next(iter(ds))].column_names}")
    train = ds["train"].select_columns(["text"])
    for val_name in ("validation", "valid", "val"):
        if val_name in ds:
            return len(train) + len(ds[val_name]), f"the dataset's {val_name!r} split", datasets.DatasetDict(
                {"train": train, "val": ds[val_name].select_columns(["text"])})
    if not 0 < val_fraction < 1:
        raise ValueError(f"{spec}: has no validation split; val_fraction must be in (0, 1), got {val_fraction}")
    every = max(2, round(1 / val_fraction))
    idx = np.arange(len(train))
    rule = f"every {every}-th document (index % {every} == {every - 1})"
    return len(train), rule, datasets.DatasetDict({"train": train.select(idx[idx % every != every - 1]),
                                                   "val": train.select(idx[idx % every == every - 1])})


def _checked_ids(ids: np.ndarray, vocab: int, dtype: np.dtype) -> np.ndarray:
    """One document's token ids in the file dtype; ValueError for an id outside the vocabulary."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"tokenizer produced ids outside [0, {vocab})")
    return ids.astype(dtype)


def _load_hf(spec: str, **kwargs):
    import datasets

    name, _, config = spec[3:].partition(":")
    try:
        return datasets.load_dataset(name, config or None, **kwargs)
    except Exception as err:  # offline, unknown name, ...: one clear message
        raise CorpusUnavailable(f"corpus {spec!r}: datasets.load_dataset({name!r}{', ' + repr(config) if config else ''})"
                                f" failed ({type(err).__name__}: {str(err)[:300]}); hf: corpora need the network "
                                f"or the dataset in the local HF cache") from None


def _prepare_streamed(spec: str, val_fraction: float, encode: Callable, vocab: int, dtype: np.dtype, directory: Path,
                      batch_docs: int = 256) -> tuple[int, str, dict]:
    """Token files of an ``hf:`` corpus read as a ``datasets`` stream (``streaming=True``: no arrow copy on disk)
    in one pass, each document routed by the split rule of :func:`_hf_splits` as it arrives."""
    ds = _load_hf(spec, streaming=True)
    if "train" not in ds:
        raise ValueError(f"corpus {spec!r}: expected a 'train' split, got splits {list(ds)}")
    val_name = next((n for n in ("validation", "valid", "val") if n in ds), None)
    every = max(2, round(1 / val_fraction))
    def text(row: dict) -> str:
        if "text" not in row:
            raise ValueError(f"corpus {spec!r}: expected a 'text' column, got columns {sorted(row)}")
        return row["text"]

    if val_name is not None:
        rule = f"the dataset's {val_name!r} split"
        routed = itertools.chain(((text(row), "train") for row in ds["train"]),
                                 ((text(row), "val") for row in ds[val_name]))
    else:
        rule = f"every {every}-th document (index % {every} == {every - 1})"
        routed = ((text(row), "val" if i % every == every - 1 else "train") for i, row in enumerate(ds["train"]))
    stats = {split: {"tokens": 0, "documents": 0} for split in _SPLITS}
    with contextlib.ExitStack() as stack:
        tmp = {split: stack.enter_context(atomic_path(directory / f"{split}.bin")) for split in _SPLITS}
        files = {split: stack.enter_context(open(path, "wb")) for split, path in tmp.items()}

        def flush(batch: list[tuple[str, str]]) -> None:
            for (_, split), ids in zip(batch, encode([doc for doc, _ in batch])):
                files[split].write(_checked_ids(ids, vocab, dtype).tobytes())
                stats[split]["tokens"] += len(ids)
                stats[split]["documents"] += 1

        batch = []
        for pair in routed:
            batch.append(pair)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        if stats["train"]["tokens"] == 0:
            raise ValueError(f"corpus {spec!r} has no training text")
        for split, handle in files.items():
            handle.close()
            stats[split]["sha256"] = sha256_file(tmp[split])
    return sum(v["documents"] for v in stats.values()), rule, stats


def prepare_corpus(spec: str, tokenizer: Any = "gpt2", *, val_fraction: float = 0.05, root: str | os.PathLike | None = None,
                   num_proc: int | None = None, verify: bool = True, stream: bool = False) -> TokenCorpus:
    """Tokenize corpus ``spec`` once into ``train.bin`` / ``val.bin`` and return the memory-mapped result.

    ``spec`` may be a comma-separated preference list (the first usable corpus is taken). ``tokenizer`` is a
    tokenizer object or a name for :func:`~unrollattn.language.tokenizer.get_tokenizer`. A complete earlier
    preparation is reused (``verify`` re-checks the files' SHA-256 against meta.json). ``stream``: an ``hf:``
    corpus is read as a ``datasets`` stream straight into the token files (no arrow cache of the whole dataset;
    the same tokens and split, so the same cache directory); local corpora ignore it.
    """
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
    root = data_root() if root is None else Path(root)
    spec = resolve_corpus(spec, tok, val_fraction) if "," in spec else _check_spec(spec)
    directory = _corpus_dir(spec, tok, val_fraction, root)
    ready = _load_if_complete(directory, verify)
    if ready is not None:
        return ready
    with _locked(directory):
        ready = _load_if_complete(directory, verify)  # another process may have finished meanwhile
        if ready is not None:
            return ready
        with contextlib.suppress(FileNotFoundError):
            (directory / "meta.json").unlink()  # from now on nothing here is trusted until the new meta.json
        for stale in directory.glob(".*.tmp"):  # temporary files of an interrupted run (atomic_path names)
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        encode = _encode_fn(tok)
        vocab = int(len(tok))
        dtype = _token_dtype(vocab)
        if stream and spec.startswith("hf:"):
            n_docs, rule, meta_splits = _prepare_streamed(spec, val_fraction, encode, vocab, dtype, directory)
            return _finish_preparation(directory, spec, tok, vocab, dtype, val_fraction, rule, n_docs, meta_splits,
                                       t0, verify)
        if spec.startswith("hf:"):
            n_docs, rule, splits = _hf_splits(spec, val_fraction)
            keep_in_memory = False
        else:
            n_docs, rule, splits = _local_splits(spec, val_fraction)
            keep_in_memory = True
        if len(splits["train"]) == 0:
            raise ValueError(f"corpus {spec!r} has no training text")

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            ids = encode(batch["text"])
            return {"ids": ids, "n": [len(i) for i in ids]}

        meta_splits = {}
        for split in _SPLITS:
            data = splits[split].map(tokenize, batched=True, batch_size=64, remove_columns=["text"],
                                     keep_in_memory=keep_in_memory, num_proc=num_proc,
                                     desc=f"tokenizing {spec} {split}")
            total = int(np.sum(data["n"])) if len(data) else 0
            data = data.with_format("numpy", columns=["ids"])
            chunks = (np.asarray(row["ids"]) for row in data)

            digest = _write_tokens(directory / f"{split}.bin", (_checked_ids(c, vocab, dtype) for c in chunks), total,
                                   dtype)
            meta_splits[split] = {"tokens": total, "sha256": digest, "documents": len(data)}
        return _finish_preparation(directory, spec, tok, vocab, dtype, val_fraction, rule, n_docs, meta_splits, t0,
                                   verify)


def _finish_preparation(directory: Path, spec: str, tok: Any, vocab: int, dtype: np.dtype, val_fraction: float,
                        rule: str, n_docs: int, meta_splits: dict, t0: float, verify: bool) -> TokenCorpus:
    """meta.json last (it marks the directory complete), then the verified corpus."""
    meta = {
        "format": FORMAT_VERSION, "corpus": spec, "source": CORPORA[spec].description if spec in CORPORA else spec,
        "tokenizer": tokenizer_key(tok), "vocab_size": vocab, "eos_token_id": int(tok.eos_token_id),
        "dtype": dtype.name, "val_fraction": val_fraction, "split_rule": rule, "documents": n_docs,
        "splits": meta_splits, "prepare_s": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(directory / "meta.json", meta)
    ready = _load_if_complete(directory, verify)
    if ready is None:
        raise RuntimeError(f"prepared corpus in {directory} does not verify against its meta.json")
    return ready
