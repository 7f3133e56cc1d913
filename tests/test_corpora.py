"""Corpus preparation: fixed split, memory-mapped token files, reuse, crash safety, errors, Debian corpora."""
import json
import os
import re
import shutil
from importlib.util import find_spec

import numpy as np
import pytest

from unrollattn.language import corpora
from unrollattn.language.tokenizer import ByteTokenizer

TEXT_A = "".join(f"Line {i} of the first file, where the quick brown fox jumps.\n" for i in range(60))
TEXT_B = "Second file.\nIt has a few lines.\nAnd an ending that stays in validation.\n" * 8


@pytest.fixture()
def text_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(corpora.DATA_ENV, str(tmp_path / "data"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (src / "b.txt").write_text(TEXT_B, encoding="utf-8")
    return src


def _decode_split(corpus, split):
    tok = ByteTokenizer()
    ids = np.asarray(corpus.split(split), dtype=np.int64)
    return [tok.decode(part.tolist()) for part in np.split(ids, np.flatnonzero(ids == tok.eos_token_id) + 1) if len(part)]


def test_split_document_is_fixed_and_cuts_at_line_starts():
    train, val = corpora.split_document(TEXT_A, 0.1)
    assert train + val == TEXT_A and train.endswith("\n") and val.startswith("Line 55 ")  # first line start >= 90%
    assert 0.05 < len(val) / len(TEXT_A) <= 0.1
    assert corpora.split_document(TEXT_A, 0.1) == (train, val)
    assert corpora.split_document("one line without a break but spaces", 0.3) == ("one line without a break ", "but spaces")
    assert corpora.split_document("short", 0.05) == ("short", "")
    with pytest.raises(ValueError, match="val_fraction"):
        corpora.split_document("x", 1.0)


def test_prepare_text_corpus_byte_tokens_round_trip(text_dir, tmp_path):
    corpus = corpora.prepare_corpus(f"text:{text_dir}/*.txt", "byte", val_fraction=0.1)
    assert corpus.path.parent == tmp_path / "data" / "tokens"
    assert corpus.train.dtype == np.uint16 and isinstance(corpus.train, np.memmap)
    expected = [corpora.split_document(t, 0.1) for t in (TEXT_A, TEXT_B)]
    # each document part is followed by the end-of-text id 256
    assert _decode_split(corpus, "train") == [e[0] + "<|endoftext|>" for e in expected]
    assert _decode_split(corpus, "val") == [e[1] + "<|endoftext|>" for e in expected]
    meta = json.loads((corpus.path / "meta.json").read_text())
    assert meta["splits"]["train"]["tokens"] == len(corpus.train) == sum(len(e[0].encode()) + 1 for e in expected)
    assert (meta["vocab_size"], meta["eos_token_id"], meta["documents"], meta["tokenizer"]) == (257, 256, 2, "byte")
    assert meta["split_rule"] == "tail of each document"


def test_prepare_twice_reuses_and_key_tracks_content(text_dir):
    spec = f"text:{text_dir}"
    first = corpora.prepare_corpus(spec, "byte")
    stamps = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    second = corpora.prepare_corpus(spec, "byte")
    assert second.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == stamps
    assert corpora.corpus_key(spec, ByteTokenizer(), 0.05) != corpora.corpus_key(spec, ByteTokenizer(), 0.1)
    (text_dir / "b.txt").write_text(TEXT_B + "More text.\n", encoding="utf-8")
    assert corpora.prepare_corpus(spec, "byte").path != first.path


def test_interrupted_preparation_leaves_nothing_trusted(text_dir, monkeypatch):
    spec = f"text:{text_dir}/a.txt"
    directory = corpora._corpus_dir(spec, ByteTokenizer(), 0.05)
    real_write_json = corpora.atomic_write_json
    real_sha = corpora.sha256_file

    # 1) crash after train.bin's bytes are in its temporary file, before it is moved into place
    def crash_sha(path):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(corpora, "sha256_file", crash_sha)
    with pytest.raises(KeyboardInterrupt):
        corpora.prepare_corpus(spec, "byte")
    assert sorted(p.name for p in directory.iterdir()) == [".lock"]  # no half file, no temporary left over

    # 2) crash after both token files are complete but before meta.json
    monkeypatch.setattr(corpora, "sha256_file", real_sha)

    def crash_meta(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(corpora, "atomic_write_json", crash_meta)
    with pytest.raises(OSError, match="disk full"):
        corpora.prepare_corpus(spec, "byte")
    assert {"train.bin", "val.bin"} <= {p.name for p in directory.iterdir()}
    assert not (directory / "meta.json").exists()
    assert corpora._load_if_complete(directory) is None

    # 3) the next run prepares again and gets the same result as a clean run
    monkeypatch.setattr(corpora, "atomic_write_json", real_write_json)
    good = corpora.prepare_corpus(spec, "byte")
    assert (directory / "meta.json").exists()
    clean = corpora.prepare_corpus(spec, "byte", root=directory.parent.parent.parent / "clean")
    assert np.array_equal(good.train, clean.train) and np.array_equal(good.val, clean.val)


def test_damaged_token_file_is_not_trusted(text_dir):
    spec = f"text:{text_dir}/a.txt"
    corpus = corpora.prepare_corpus(spec, "byte")
    path, train = corpus.path, np.array(corpus.train)
    del corpus
    data = bytearray((path / "train.bin").read_bytes())
    data[10] ^= 0xFF  # same size, different content
    (path / "train.bin").write_bytes(bytes(data))
    assert corpora._load_if_complete(path) is None
    assert np.array_equal(corpora.prepare_corpus(spec, "byte").train, train)
    with open(path / "val.bin", "r+b") as f:  # truncated
        f.truncate(4)
    assert corpora._load_if_complete(path, verify=False) is None
    assert len(corpora.prepare_corpus(spec, "byte").val) > 2


def test_bad_text_files_raise_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(corpora.DATA_ENV, str(tmp_path / "data"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"empty\.txt: the file is empty"):
        corpora.prepare_corpus(f"text:{tmp_path}/empty.txt", "byte")
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 text \(invalid byte at offset 3\)"):
        corpora.prepare_corpus(f"text:{tmp_path}/latin1.txt", "byte")
    with pytest.raises(FileNotFoundError, match="no such file"):
        corpora.prepare_corpus(f"text:{tmp_path}/missing/*.txt", "byte")
    with pytest.raises(ValueError, match="unknown corpus 'kvj' \\(did you mean 'kjv'\\?\\)"):
        corpora.prepare_corpus("kvj", "byte")
    with pytest.raises(ValueError, match="text:<path or glob>"):
        corpora.prepare_corpus("text:", "byte")


def test_missing_corpora_name_their_install_lines(tmp_path, monkeypatch):
    monkeypatch.setenv(corpora.DATA_ENV, str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(corpora.CorpusUnavailable, match="apt-get install -y bible-kjv"):
        corpora.kjv_documents()
    monkeypatch.setattr(corpora, "_austen_candidates", lambda root: [tmp_path / "nowhere"])
    with pytest.raises(corpora.CorpusUnavailable, match="r-cran-janeaustenr.*nowhere.*`bash install.sh` as root"):
        corpora.austen_data_dir()
    monkeypatch.setitem(corpora.CORPORA, "kjv", corpora.CORPORA["kjv"].__class__(
        "kjv", "", corpora.kjv_documents, lambda: False))
    with pytest.raises(corpora.CorpusUnavailable, match="kjv: apt-get install -y bible-kjv; hf:openwebtext: needs network"):
        corpora.resolve_corpus("kjv,hf:openwebtext")


def test_a_missing_austen_corpus_never_runs_a_package_manager(tmp_path, monkeypatch):
    """Fetching belongs in install.sh: at run time a missing corpus is a message naming that step."""
    monkeypatch.setenv(corpora.DATA_ENV, str(tmp_path / "data"))
    monkeypatch.setattr(corpora, "_austen_candidates", lambda root: [root / "debian" / corpora.AUSTEN_DEB / "data"])
    monkeypatch.setattr(corpora.shutil, "which", lambda name: f"/usr/bin/{name}")  # apt-get, dpkg-deb "installed"

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"ran {args[0] if args else kwargs.get('args')!r} at run time")

    monkeypatch.setattr(corpora.subprocess, "run", no_subprocess)
    monkeypatch.setattr(corpora.subprocess, "Popen", no_subprocess)
    assert not corpora.corpus_available("austen")
    with pytest.raises(corpora.CorpusUnavailable, match=f"{re.escape(str(tmp_path))}.*bash install.sh"):
        corpora.austen_data_dir()
    with pytest.raises(corpora.CorpusUnavailable, match="bash install.sh"):
        corpora.load_documents("austen")
    with pytest.raises(corpora.CorpusUnavailable, match="austen: run `bash install.sh` as root"):
        corpora.resolve_corpus("austen")
    assert not (tmp_path / "data").exists()  # nothing fetched, nothing unpacked


def test_preference_list_takes_the_first_usable(text_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not corpora.corpus_available("hf:openwebtext")
    spec = f"text:{text_dir}/a.txt"
    assert corpora.resolve_corpus(f"hf:openwebtext, {spec}") == spec
    assert corpora.resolve_corpus(f"{spec},text:{text_dir}/b.txt", exclude=[spec]) == f"text:{text_dir}/b.txt"
    corpus = corpora.prepare_corpus(f"hf:openwebtext,{spec}", "byte")
    assert corpus.name == spec


@pytest.mark.skipif(shutil.which("bible") is None, reason="apt-get install -y bible-kjv")
def test_kjv_books_and_byte_preparation(tmp_path):
    docs = corpora.kjv_documents()
    assert len(docs) == 66 and docs[0].name == "Genesis" and docs[-1].name == "Revelation"
    assert docs[0].text.startswith("Genesis 1\n\n  1 In the beginning God created the heaven and the earth.")
    assert docs[-1].text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    corpus = corpora.prepare_corpus("kjv", "byte", root=tmp_path)
    n_bytes = sum(len(d.text.encode()) for d in docs)
    parts = corpus.meta["splits"]["train"]["documents"] + corpus.meta["splits"]["val"]["documents"]
    assert corpus.meta["splits"]["train"]["documents"] == 66 and parts >= 130  # a very short book may have no val part
    assert len(corpus.train) + len(corpus.val) == n_bytes + parts  # one end-of-text per document part
    assert 0.045 < len(corpus.val) / n_bytes < 0.055


def _austen_ready() -> bool:
    if find_spec("rdata") is None:
        return False
    try:
        corpora.austen_data_dir()
        return True
    except corpora.CorpusUnavailable:
        return False


@pytest.mark.skipif(not _austen_ready(), reason=corpora.AUSTEN_INSTALL)
def test_austen_novels_from_the_debian_package():
    docs = corpora.austen_documents()
    assert [d.name for d in docs] == ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                                      "sensesensibility"]
    assert docs[0].text.startswith("EMMA\n\nBy Jane Austen")
    assert 3_900_000 < sum(len(d.text) for d in docs) < 4_200_000


@pytest.mark.skipif(find_spec("music21") is None, reason="pip install --no-deps music21==10.5.0")
def test_music21_excerpt():
    (doc,) = corpora.music21_documents()
    assert doc.name.endswith(os.path.join("trainingData", "en.txt")) and "Lady Susan" in doc.text[:2000]


def test_named_corpora_join_with_plus(tmp_path, monkeypatch):
    """``a+b``: the documents of both, in order, prepared under their own key; unavailable when a part is."""
    monkeypatch.setenv(corpora.DATA_ENV, str(tmp_path / "data"))
    sources = {"first": corpora._Source("first", "A", lambda: [corpora.Document("a", TEXT_A)], lambda: True),
               "second": corpora._Source("second", "B", lambda: [corpora.Document("b", TEXT_B)], lambda: True),
               "absent": corpora._Source("absent", "C", lambda: [], lambda: False)}
    monkeypatch.setattr(corpora, "CORPORA", sources)
    assert [d.name for d in corpora.load_documents("first + second")] == ["a", "b"]
    assert corpora.corpus_available("first+second") and not corpora.corpus_available("first+absent")
    assert corpora.resolve_corpus("first+absent,first+second") == "first+second"
    joined = corpora.prepare_corpus("first+second", ByteTokenizer(), val_fraction=0.1)
    alone = corpora.prepare_corpus("first", ByteTokenizer(), val_fraction=0.1)
    assert len(joined.split("train")) > len(alone.split("train"))
    assert _decode_split(joined, "train") == [corpora.split_document(t, 0.1)[0] + "<|endoftext|>"
                                              for t in (TEXT_A, TEXT_B)]
    for bad in ("first+", "first+hf:wikitext", "first+text:x.txt", "first+nope"):
        with pytest.raises(ValueError, match="named corpora .* joined by '\\+'"):
            corpora.load_documents(bad)


@pytest.mark.parametrize("with_validation", [False, True])
def test_a_streamed_hf_corpus_gives_the_same_tokens_as_a_downloaded_one(tmp_path, monkeypatch, with_validation):
    """prepare_corpus(stream=True) reads an hf: corpus as a datasets stream in one pass (no arrow copy) and writes
    the same train/val tokens, split rule and cache directory as the downloaded form."""
    import datasets

    texts = [f"document {i}: " + "words and more words " * (i % 5 + 1) for i in range(23)]
    calls = []

    def fake_load_dataset(name, config=None, streaming=False):
        calls.append(streaming)
        parts = {"train": texts[:18], **({"validation": texts[18:]} if with_validation else {})}
        if streaming:
            return datasets.IterableDatasetDict({k: datasets.IterableDataset.from_generator(
                lambda v=v: ({"text": t} for t in v)) for k, v in parts.items()})
        return datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in parts.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    streamed = corpora.prepare_corpus("hf:fake", "byte", val_fraction=0.2, root=tmp_path / "a", stream=True)
    downloaded = corpora.prepare_corpus("hf:fake", "byte", val_fraction=0.2, root=tmp_path / "b")
    assert calls == [True, False]
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(streamed.split(split)), np.asarray(downloaded.split(split))), split
    meta_s, meta_d = (json.loads((c.path / "meta.json").read_text()) for c in (streamed, downloaded))
    assert meta_s["split_rule"] == meta_d["split_rule"]
    assert meta_s["documents"] == meta_d["documents"] == (23 if with_validation else 18)
    assert {k: meta_s["splits"][k]["tokens"] for k in ("train", "val")} == {
        k: meta_d["splits"][k]["tokens"] for k in ("train", "val")}
    assert streamed.path.name == downloaded.path.name  # the same cache key: streaming does not change the tokens
    assert corpora.prepare_corpus("hf:fake", "byte", val_fraction=0.2, root=tmp_path / "a", stream=True).path == \
        streamed.path and calls == [True, False]  # reused, not streamed again


def test_a_streamed_hf_corpus_without_a_text_column_is_a_clear_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, streaming=False: datasets.IterableDatasetDict(
        {"train": datasets.IterableDataset.from_generator(lambda: ({"body": "x"} for _ in range(3)))}))
    with pytest.raises(ValueError, match="expected a 'text' column, got columns \\['body'\\]"):
        corpora.prepare_corpus("hf:fake", "byte", root=tmp_path, stream=True)
    assert not list((tmp_path / "tokens").rglob("*.bin"))  # nothing half-written is left as a token file
