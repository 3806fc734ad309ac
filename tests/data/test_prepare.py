"""prepare_files / prepare_stdlib / prepare_fineweb_edu and `dpls prepare`: every document
lands whole in exactly one split, shards are exact, runs resume, nothing foreign is overwritten."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from data_helpers import fake_gpt2
from dpls._io import LOCK_FILE
from dpls.cli import main
from dpls.data import (
    DataMeta,
    TiktokenTokenizer,
    TokenLoader,
    load_tokenizer,
    prepare_files,
    prepare_fineweb_edu,
    prepare_stdlib,
    read_shard,
    stdlib_files,
    validation_batches,
)
from dpls.data import prepare as prep
from dpls.data.tokenizer import EOT


def staging(out):
    """Hidden files a prepare left in ``out``, besides its lock file (which stays, by design)."""
    return [p for p in out.glob(".*") if p.name != LOCK_FILE]


WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def _doc(i: int) -> str:
    rng = np.random.default_rng(i)
    return f"doc {i}: " + " ".join(rng.choice(WORDS, size=int(rng.integers(5, 40))))


def _documents_of(out, split, meta):
    """The split's token stream cut at eot (which precedes every document), decoded."""
    tok = load_tokenizer(out, encoding=fake_gpt2() if meta.tokenizer == "gpt2" else None)
    stream = np.concatenate([np.asarray(read_shard(out / n)) for n in meta.shards(split)])
    assert stream[0] == meta.eot_token
    starts = np.flatnonzero(stream == meta.eot_token)
    bounds = [*starts, len(stream)]
    return [tok.decode(stream[a + 1 : b].tolist()) for a, b in itertools.pairwise(bounds)]


@pytest.fixture
def inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    txt = [_doc(i) for i in range(3)]
    (src / "a.txt").write_text(f"\n{EOT}\n".join(txt))
    jsonl = [_doc(i) for i in range(100, 130)]
    (src / "b.jsonl").write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in jsonl))
    parquet = [_doc(i) for i in range(200, 240)]
    pq.write_table(pa.table({"body": parquet}), src / "c.parquet")
    return src, txt + jsonl + parquet


def test_prepare_files_puts_every_document_in_one_split(tmp_path, inputs):
    src, docs = inputs
    out = tmp_path / "out"
    meta = prepare_files(
        [src / "a.txt", src / "b.jsonl", src / "c.parquet"],
        out,
        vocab_size=300,
        text_field="body",
        shard_tokens=700,
        val_fraction=0.2,
        progress=False,
    )
    assert meta == DataMeta.load(out) and meta.source == "files" and meta.tokenizer == "bpe"
    assert not (out / "progress.json").exists() and not staging(out)  # no staging left
    train, val = _documents_of(out, "train", meta), _documents_of(out, "val", meta)
    assert sorted(train + val) == sorted(docs) and val and train
    assert not set(train) & set(val)
    sizes = [len(read_shard(out / n)) for n in meta.train_shards]
    assert all(s == 700 for s in sizes[:-1]) and 0 < sizes[-1] <= 700 and sum(sizes) == meta.train_tokens
    # the pieces fit together: a loader, the fixed validation set and the tokenizer
    x, _ = TokenLoader(out, batch_size=2, block_size=32).next_batch()
    assert x.max() < meta.vocab_size
    assert validation_batches(out, 32, 4).tokens == meta.val_tokens - len(meta.val_shards)


def test_directory_input_and_gpt2_tokenizer(tmp_path, inputs):
    src, _ = inputs
    (src / "skip.md").write_text("not an input")
    out = tmp_path / "out"
    meta = prepare_files(
        [src], out, tokenizer="gpt2", text_field="body", encoding=fake_gpt2(), progress=False
    )
    assert meta.tokenizer == "gpt2" and meta.tokenizer_file is None and meta.vocab_size == 261
    assert len(_documents_of(out, "train", meta)) + len(_documents_of(out, "val", meta)) == 73


def test_finished_directory_is_reused_and_foreign_ones_refused(tmp_path, inputs):
    src, _ = inputs
    out = tmp_path / "out"
    kwargs = dict(vocab_size=300, text_field="body", progress=False)
    meta = prepare_files([src / "b.jsonl"], out, **kwargs)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_FILE}
    assert prepare_files([src / "b.jsonl"], out, **kwargs) == meta  # same settings: nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_FILE} == stamp
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_files([src / "b.jsonl"], out, **{**kwargs, "vocab_size": 400})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        prepare_files([src / "b.jsonl"], foreign, **kwargs)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK_FILE}


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda d: d / "x.csv", {}, "unsupported"),
        (lambda d: d / "missing.txt", {}, "does not exist"),
        (lambda d: d / "a.txt", {"val_fraction": 1.0}, "val_fraction"),
        (lambda d: d / "a.txt", {"tokenizer": "llama"}, "tokenizer"),
        (lambda d: d / "b.jsonl", {"text_field": "text"}, "no string field 'text'"),
        (lambda d: d / "c.parquet", {"text_field": "text"}, "no column 'text'"),
        (lambda d: d / "one.txt", {}, "at least 2 documents"),
        (lambda d: d / "latin1.jsonl", {}, "latin1.jsonl: not UTF-8"),
        (lambda d: d / "fake.parquet", {}, "fake.parquet: not a readable Parquet"),
        (lambda d: [d, d / "a.txt"], {}, "a.txt' is given twice"),
    ],
)
def test_bad_input_is_refused_before_writing(tmp_path, inputs, make, kwargs, match):
    src, _ = inputs
    (src / "x.csv").write_text("a,b")
    (src / "one.txt").write_text("a single document")
    (src / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    (src / "fake.parquet").write_text("not parquet")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        made = make(src)
        prepare_files(made if isinstance(made, list) else [made], out, progress=False, **kwargs)
    assert not out.exists()


def test_unwritable_output_directory_is_a_clear_error(tmp_path, inputs):
    src, _ = inputs
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory would go")
    with pytest.raises(ValueError, match=r"cannot create the folder .*file/out: a file is in the way"):
        prepare_files([src / "b.jsonl"], blocker / "out", text_field="body", vocab_size=300, progress=False)
    assert blocker.read_text() == "a file where a directory would go"


@pytest.fixture
def fineweb(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [_doc(i) for i in range(300)]
    path = tmp_path / "fw.parquet"
    pq.write_table(
        pa.table({"text": docs, "id": [f"<urn:{i}>" for i in range(300)]}), path, row_group_size=50
    )
    return path, docs


def test_fineweb_from_local_parquet(tmp_path, fineweb):
    path, docs = fineweb
    enc = fake_gpt2()
    out = tmp_path / "fw"
    meta = prepare_fineweb_edu(
        out, data_files=[str(path)], encoding=enc, max_tokens=5000, shard_tokens=900, val_fraction=0.1,
        progress=False,
    )  # fmt: skip
    assert meta.source == "fineweb-edu" and meta.train_tokens + meta.val_tokens == 5000  # exactly max_tokens
    val = _documents_of(out, "val", meta)
    train = _documents_of(out, "train", meta)
    assert val[0] == docs[0]  # the first document is always held out
    # each split holds the parquet's documents in order, whole, but the one cut at max_tokens
    n = len(val) + len(train)
    cut = [d for d in val + train if d not in docs]
    assert len(cut) <= 1 and all(docs[n - 1].startswith(d) for d in cut)
    idx_val, idx_train = (
        [docs.index(d) for d in val if d in docs],
        [docs.index(d) for d in train if d in docs],
    )
    assert idx_val == sorted(idx_val) and idx_train == sorted(idx_train) and len(idx_val) > 1
    assert sorted(idx_val + idx_train) == list(range(n - len(cut)))
    full = sum(1 + len(enc.encode_ordinary(d)) for d in docs[:n])
    assert full >= 5000 > full - 1 - len(enc.encode_ordinary(docs[n - 1]))


def test_fineweb_resumes_to_the_same_shards(tmp_path, fineweb, monkeypatch):
    path, _ = fineweb
    monkeypatch.setattr(prep, "ENCODE_BATCH_CHARS", 2000)
    monkeypatch.setattr(prep, "CHECKPOINT_SECONDS", 0.0)
    kwargs = dict(
        data_files=[str(path)], encoding=fake_gpt2(), shard_tokens=1000, val_fraction=0.1, progress=False
    )
    calls = {"n": 0, "fail_at": None}
    original = TiktokenTokenizer.encode_batch

    def counting(self, texts, num_threads=None):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-run
        return original(self, texts, num_threads)

    monkeypatch.setattr(TiktokenTokenizer, "encode_batch", counting)
    reference = tmp_path / "ref"
    meta = prepare_fineweb_edu(reference, **kwargs)
    full_run = calls["n"]
    assert full_run > 12

    out = tmp_path / "out"
    calls.update(n=0, fail_at=8)
    with pytest.raises(KeyboardInterrupt):
        prepare_fineweb_edu(out, **kwargs)
    assert (out / "progress.json").is_file() and not (out / "meta.json").exists()
    assert json.loads((out / "progress.json").read_text())["documents"] > 0

    calls.update(n=0, fail_at=None)
    resumed = prepare_fineweb_edu(out, **kwargs)
    assert calls["n"] == full_run - 7  # the 7 batches checkpointed before the interruption are not redone
    assert resumed.train_shards == meta.train_shards and resumed.val_shards == meta.val_shards
    for name in meta.train_shards + meta.val_shards:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (out / "progress.json").exists()


def test_crashes_between_staging_and_commit_resume_exactly(tmp_path, fineweb, monkeypatch):
    """Killed after staged tokens hit the disk but before progress.json recorded them, twice."""
    path, _ = fineweb
    monkeypatch.setattr(prep, "ENCODE_BATCH_CHARS", 1500)
    monkeypatch.setattr(prep, "CHECKPOINT_SECONDS", 0.0)
    kwargs = dict(
        data_files=[str(path)], encoding=fake_gpt2(), shard_tokens=1500, val_fraction=0.2, progress=False
    )
    reference = tmp_path / "ref"
    meta = prepare_fineweb_edu(reference, **kwargs)

    original = prep.write_json_atomic
    calls = {"n": 0, "fail_at": 0}

    def crashing(target, obj):
        if target.name == "progress.json":
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise KeyboardInterrupt
        return original(target, obj)

    monkeypatch.setattr(prep, "write_json_atomic", crashing)
    out = tmp_path / "out"
    for fail_at in (2, 4):  # the first checkpoint (nothing committed yet), then a later one
        calls.update(n=0, fail_at=fail_at)
        with pytest.raises(KeyboardInterrupt):
            prepare_fineweb_edu(out, **kwargs)
    assert list(out.glob(".val.staging-*")) and list(out.glob(".train.staging-*"))
    calls.update(n=0, fail_at=0)
    resumed = prepare_fineweb_edu(out, **kwargs)
    assert resumed.train_shards == meta.train_shards and resumed.val_shards == meta.val_shards
    for name in meta.train_shards + meta.val_shards:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not staging(out)


def test_interrupted_before_any_checkpoint_is_still_ours(tmp_path, inputs, monkeypatch):
    src, _ = inputs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_build", interrupted)
    kwargs = dict(vocab_size=300, text_field="body", progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare_files([src / "b.jsonl"], tmp_path / "out", **kwargs)
    monkeypatch.undo()
    assert prepare_files([src / "b.jsonl"], tmp_path / "out", **kwargs).train_tokens > 0


def test_encodings_too_large_for_uint16_get_uint32_shards():
    from types import SimpleNamespace

    from dpls.data.shards import token_dtype

    big = SimpleNamespace(name="cl100k-like", eot_token=100257, n_vocab=100277)
    tok, described = prep._given_tokenizer("gpt2", big)
    assert described == {"encoding": "cl100k-like"}  # the settings of a GPT-2 directory, unchanged
    assert tok.vocab_size == 100277 and token_dtype(tok.vocab_size) == "uint32"


def test_fineweb_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="max_tokens"):
        prepare_fineweb_edu(tmp_path / "o", max_tokens=0, encoding=fake_gpt2())
    with pytest.raises(ValueError, match="data_files"):
        prepare_fineweb_edu(tmp_path / "o", data_files=[str(tmp_path / "nope.parquet")], encoding=fake_gpt2())
    assert not (tmp_path / "o").exists()


def test_stdlib_files_are_the_library_without_tests_or_build_files():
    root, files = stdlib_files()
    assert files == sorted(files) and "os.py" in files and "json/decoder.py" in files
    assert not any(f.startswith(("test/", "site-packages/")) or "/tests/" in f for f in files)
    assert not any(f.split("/")[-1].startswith("_sysconfigdata") for f in files)
    assert (root / "os.py").is_file()


def test_prepare_stdlib_small_sample_is_deterministic(tmp_path):
    a = prepare_stdlib(tmp_path / "a", max_files=16, vocab_size=1024, shard_tokens=20_000, progress=False)
    prepare_stdlib(tmp_path / "b", max_files=16, vocab_size=1024, shard_tokens=20_000, progress=False)
    assert a.source == "stdlib" and a.settings["files"] == 16 and a.val_shards and len(a.train_shards) > 1
    for name in a.train_shards + a.val_shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    tok = load_tokenizer(tmp_path / "a")
    code = "def f(self, x):\n    return x\n"
    assert tok.decode(tok.encode(code)) == code and len(tok.encode(code)) < len(code) / 2
    # the same documents and tokenizer: the same fingerprints, recorded in meta.json
    b = DataMeta.load(tmp_path / "b")
    assert a.corpus_fingerprint == b.corpus_fingerprint and len(a.corpus_fingerprint) == 32
    assert a.tokenizer_fingerprint == tok.fingerprint() == b.tokenizer_fingerprint
    raw = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert raw["corpus_fingerprint"] == a.corpus_fingerprint


def test_max_train_tokens_shrinks_training_only(tmp_path):
    """A data-limited corpus: fewer training tokens, the same tokenizer and validation tokens."""
    kw = dict(max_files=24, vocab_size=512, shard_tokens=20_000, max_bpe_chars=300_000, progress=False)
    full = prepare_stdlib(tmp_path / "full", **kw)
    limit = full.train_tokens // 2
    cut = prepare_stdlib(tmp_path / "cut", max_train_tokens=limit, **kw)
    assert cut.train_tokens == limit and cut.settings["max_train_tokens"] == limit
    assert cut.tokenizer_fingerprint == full.tokenizer_fingerprint
    assert cut.corpus_fingerprint != full.corpus_fingerprint
    assert cut.val_tokens == full.val_tokens
    for name in full.val_shards:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert _documents_of(tmp_path / "cut", "val", cut) == _documents_of(tmp_path / "full", "val", full)
    # the training slice is made of whole training documents (the last one cut), none from validation
    val_docs = set(_documents_of(tmp_path / "full", "val", full))
    train_docs = _documents_of(tmp_path / "cut", "train", cut)
    assert len(train_docs) > 1 and not val_docs.intersection(train_docs)
    full_train = set(_documents_of(tmp_path / "full", "train", full))
    assert set(train_docs[:-1]) <= full_train
    with pytest.raises(ValueError, match="max_train_tokens"):
        prepare_stdlib(tmp_path / "bad", max_train_tokens=0, **kw)
    assert not (tmp_path / "bad").exists()


def test_corpus_fingerprint_changes_with_any_document_or_the_tokenizer(tmp_path):
    """The stdlib corpus differs between Python builds; the fingerprint is what tells them apart."""
    from dpls.data.meta import corpus_fingerprint

    def prepared(name: str, docs: list[str], vocab_size: int = 300) -> DataMeta:
        (tmp_path / "in" / name).mkdir(parents=True)
        src = tmp_path / "in" / name / "docs.jsonl"  # one name: the split hashes it
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return prepare_files([src], tmp_path / name, vocab_size=vocab_size, progress=False)

    docs = [_doc(i) for i in range(60)]
    base = prepared("base", docs)
    same = prepared("same", docs)
    one_char = prepared("one_char", [*docs[:-1], docs[-1] + "."])
    other_tok = prepared("other_tok", docs, vocab_size=280)
    assert base.corpus_fingerprint == same.corpus_fingerprint
    assert base.tokenizer_fingerprint == same.tokenizer_fingerprint
    assert one_char.corpus_fingerprint != base.corpus_fingerprint
    assert other_tok.tokenizer_fingerprint != base.tokenizer_fingerprint
    assert other_tok.corpus_fingerprint != base.corpus_fingerprint
    # recomputed from the directory, it is the recorded one (data made before it was recorded)
    assert corpus_fingerprint(tmp_path / "base", base, base.tokenizer_fingerprint) == base.corpus_fingerprint


def test_cli_prepare(tmp_path, inputs, capsys):
    src, _ = inputs
    out = tmp_path / "cli"
    argv = ["prepare", "files", str(src / "b.jsonl"), "--out", str(out), "--text-field", "body"]
    assert main([*argv, "--vocab-size", "300", "--quiet"]) == 0
    assert "train" in capsys.readouterr().out and DataMeta.load(out).vocab_size <= 300
    bad = tmp_path / "bad"
    assert main(["prepare", "files", str(src / "nope.txt"), "--out", str(bad)]) == 2
    assert main(["prepare", "stdlib", "--out", str(bad), "--vocab-size", "100"]) == 2
    assert main(["prepare", "fineweb-edu", "--out", str(bad), "--max-tokens", "-5"]) == 2
    assert not bad.exists()
    assert main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert "vocab_size" in err and "max_tokens" in err and "choose a source" in err


def test_cli_ctrl_c_is_one_line_and_resumable(tmp_path, inputs, capsys, monkeypatch):
    """Ctrl-C mid-run: exit 130 with how to go on (no traceback), and the same command finishes."""
    src, _ = inputs
    out = tmp_path / "out"
    argv = ["prepare", "files", str(src / "b.jsonl"), "--out", str(out), "--text-field", "body"]
    argv += ["--vocab-size", "300", "--quiet"]
    real = prep._build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_build", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; run the same command again" in err and err.count("\n") == 1
    monkeypatch.setattr(prep, "_build", real)
    assert main(argv) == 0 and DataMeta.load(out).train_tokens > 0
