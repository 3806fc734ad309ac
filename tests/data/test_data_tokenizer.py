"""Tokenizers: the trained byte-level BPE, GPT-2 through an injected tiktoken encoding, and
``load_tokenizer`` finding the right one from data, run and checkpoint directories."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dpls
from data_helpers import fake_gpt2
from dpls.data import BPETokenizer, DataError, DataMeta, TiktokenTokenizer, load_tokenizer, train_bpe
from dpls.data.tokenizer import EOT

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)  # squares\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=300)


def test_fingerprint_tells_tokenizers_apart_that_the_vocabulary_size_cannot(bpe):
    again = train_bpe(CORPUS, vocab_size=300)
    other = train_bpe([c.upper() for c in CORPUS], vocab_size=bpe.vocab_size)
    assert other.vocab_size == bpe.vocab_size  # same size, other tokens
    assert bpe.fingerprint() == again.fingerprint() != other.fingerprint()
    gpt2 = TiktokenTokenizer(fake_gpt2())
    assert gpt2.fingerprint() == TiktokenTokenizer(fake_gpt2()).fingerprint() != bpe.fingerprint()
    assert all(len(t.fingerprint()) == 32 for t in (bpe, gpt2))


def test_bpe_learns_merges_and_reserves_eot(bpe):
    assert bpe.kind == "bpe" and 257 < bpe.vocab_size <= 300
    assert bpe.decode([bpe.eot]) == EOT
    ids = bpe.encode("    return a + b\n")
    assert len(ids) < len("    return a + b\n")  # merges learned from the corpus compress it
    assert bpe.eot not in bpe.encode("plain text")
    literal = f"x = '{EOT}'"
    assert bpe.eot not in bpe.encode(literal)  # ordinary encoding, like tiktoken's encode_ordinary
    assert bpe.decode(bpe.encode(literal)) == literal


@given(text=st.text(max_size=200))
@settings(max_examples=50)
def test_bpe_round_trips_any_text(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_training_is_deterministic_and_saves(bpe, tmp_path):
    again = train_bpe(CORPUS, vocab_size=300)
    sample = "class Q:\n    def f(self):\n        return self.x\n"
    assert again.encode(sample) == bpe.encode(sample) and again.vocab_size == bpe.vocab_size
    bpe.save(tmp_path / "tokenizer.json")
    loaded = BPETokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.encode(sample) == bpe.encode(sample) and loaded.eot == bpe.eot
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(sample) == bpe.encode(sample)
    assert bpe.encode_batch([sample, "x = 1"]) == [bpe.encode(sample), bpe.encode("x = 1")]


def test_bpe_vocab_size_is_checked():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size"):  # over 65,536 is fine: uint32 shards
        train_bpe(CORPUS, vocab_size=2**32 + 1)


@given(text=st.text(max_size=100))
@settings(max_examples=30)
def test_tiktoken_wrapper_with_injected_encoding(text):
    tok = TiktokenTokenizer(fake_gpt2())
    assert tok.kind == "gpt2" and tok.eot == 260 and tok.vocab_size == 261
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "the thing"], num_threads=2) == [ids, tok.encode("the thing")]
    assert tok.encode("the") == [258]
    assert tok.encode(EOT) != [260]  # ordinary encoding: special tokens in text are just text


def _data_dir(root, bpe):
    root.mkdir(parents=True)
    bpe.save(root / "tokenizer.json")
    DataMeta(
        tokenizer="bpe",
        tokenizer_file="tokenizer.json",
        vocab_size=bpe.vocab_size,
        eot_token=bpe.eot,
        train_shards=["train_000000.bin"],
        val_shards=["val_000000.bin"],
        train_tokens=1,
        val_tokens=1,
        source="test",
    ).save(root)
    return root


def test_load_tokenizer_from_data_run_and_checkpoint_dirs(bpe, tmp_path):
    data = _data_dir(tmp_path / "data", bpe)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_0000100"
    ckpt.mkdir(parents=True)
    shutil.copytree(data, run / "tokenizer")  # what the trainer does
    text = "def g(y):\n    return y\n"
    for place in (data, run, ckpt, data / "meta.json"):
        assert load_tokenizer(place).encode(text) == bpe.encode(text)
    assert dpls.load_tokenizer(ckpt).decode(bpe.encode(text)) == text  # the public name


def test_load_tokenizer_through_the_run_config(bpe, tmp_path):
    data = _data_dir(tmp_path / "data", bpe)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'data_dir = "{data}"\n')
    with pytest.raises(DataError, match=r"no meta\.json"):  # the data layer knows no run config
        load_tokenizer(run)
    assert dpls.load_tokenizer(run).eot == bpe.eot  # the run layer follows it to the data


def test_load_tokenizer_gpt2_meta_uses_injected_encoding(tmp_path):
    enc = fake_gpt2()
    DataMeta(
        tokenizer="gpt2",
        tokenizer_file=None,
        vocab_size=261,
        eot_token=260,
        train_shards=["t.bin"],
        val_shards=["v.bin"],
        train_tokens=1,
        val_tokens=1,
        source="test",
    ).save(tmp_path)
    assert load_tokenizer(tmp_path, encoding=enc).encode("the") == [258]


def test_load_tokenizer_errors(bpe, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    empty = tmp_path / "a" / "b" / "c" / "d" / "e"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match=r"no meta\.json found"):
        load_tokenizer(empty)
    data = _data_dir(tmp_path / "data", bpe)
    (data / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(data)
    other = train_bpe(CORPUS[:4], vocab_size=270)
    other.save(data / "tokenizer.json")
    with pytest.raises(DataError, match="does not match"):
        load_tokenizer(data)
