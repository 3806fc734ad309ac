"""Token shards (llm.c layout) and meta.json: round trips and every way a file can be broken."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data_helpers import write_data_dir
from dpls.data import DataError, DataMeta, ShardError, read_shard, shard_token_count, write_shard
from dpls.data.shards import HEADER_BYTES, LAYOUTS, MAGIC, shard_header, token_dtype


@given(tokens=arrays(np.uint16, st.integers(0, 3000)))
def test_round_trip(tmp_path_factory, tokens):
    path = tmp_path_factory.mktemp("shard") / "train_000000.bin"
    write_shard(path, tokens)
    back = read_shard(path)
    assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == MAGIC and header[1] == 1 and header[2] == len(tokens) and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * len(tokens)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


@given(tokens=arrays(np.uint32, st.integers(0, 3000)))
def test_uint32_round_trip_is_named_by_the_header(tmp_path_factory, tokens):
    path = tmp_path_factory.mktemp("shard") / "train_000000.bin"
    write_shard(path, tokens, "uint32")
    back = read_shard(path)
    assert back.dtype == np.uint32 and np.array_equal(back, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert (header[0], header[1]) == LAYOUTS["uint32"] == (20240801, 7)  # llm.c's LLaMA-3 layout
    assert header[2] == len(tokens) and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 4 * len(tokens)
    assert shard_header(path) == ("uint32", len(tokens))


def test_the_vocabulary_picks_the_dtype():
    assert [token_dtype(v) for v in (1, 50257, 65536, 65537, 151936, 2**32)] == [
        "uint16",
        "uint16",
        "uint16",
        "uint32",
        "uint32",
        "uint32",
    ]
    for bad in (0, 2**32 + 1):
        with pytest.raises(ValueError, match="vocab_size"):
            token_dtype(bad)


def test_uint32_range_and_dtype_names_are_checked(tmp_path):
    write_shard(tmp_path / "a.bin", [0, 70000, 2**32 - 1], "uint32")
    assert read_shard(tmp_path / "a.bin").tolist() == [0, 70000, 2**32 - 1]
    with pytest.raises(ValueError, match="uint32"):
        write_shard(tmp_path / "b.bin", [2**32], "uint32")
    with pytest.raises(ValueError, match="uint16, uint32"):
        write_shard(tmp_path / "b.bin", [1], "int64")
    assert not (tmp_path / "b.bin").exists()


def test_write_accepts_int_lists_and_checks_range(tmp_path):
    write_shard(tmp_path / "a.bin", [0, 1, 65535])
    assert read_shard(tmp_path / "a.bin").tolist() == [0, 1, 65535]
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "b.bin", [65536])
    with pytest.raises(ValueError, match="uint16"):
        write_shard(tmp_path / "b.bin", np.array([-1]))
    assert not (tmp_path / "b.bin").exists()


def _corrupt(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: _corrupt(p, 0, 123), "magic"),
        (lambda p: _corrupt(p, 4, 2), "version"),
        (lambda p: _corrupt(p, 0, 20240801), "version 1, expected 7"),
        (lambda p: (_corrupt(p, 0, 20240801), _corrupt(p, 4, 7)), "10 uint32 tokens"),  # uint16 body
        (lambda p: _corrupt(p, 8, 11), "corrupt"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1]), "corrupt"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "truncated"),
        (lambda p: p.unlink(), "does not exist"),
    ],
    ids=[
        "magic",
        "version",
        "uint32-magic",
        "uint32-header",
        "count",
        "short-body",
        "short-header",
        "missing",
    ],
)
def test_broken_shards_name_the_file(tmp_path, damage, match):
    path = tmp_path / "val_000003.bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    damage(path)
    with pytest.raises(ShardError, match=match) as err:
        read_shard(path)
    assert "val_000003.bin" in str(err.value)


def _data_dir(tmp_path, train=(100, 50), val=(30,)):
    def shards(sizes):
        return [np.arange(n, dtype=np.uint16) % 97 for n in sizes]

    return write_data_dir(tmp_path, shards(train), shards(val), vocab_size=97)


def test_meta_round_trip_and_shard_checks(tmp_path):
    meta = _data_dir(tmp_path)
    assert DataMeta.load(tmp_path) == meta
    write_shard(tmp_path / "train_000001.bin", np.arange(49, dtype=np.uint16))
    with pytest.raises(DataError, match="train shards hold 149 tokens"):
        DataMeta.load(tmp_path)
    DataMeta.load(tmp_path, check_shards=False)  # the tokenizer's copy has no shards to check
    (tmp_path / "train_000001.bin").unlink()
    with pytest.raises(ShardError, match=r"train_000001\.bin"):
        DataMeta.load(tmp_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("vocab_size"), "vocab_size"),
        (lambda m: m.update(tokenizer="sentencepiece"), "tokenizer"),
        (lambda m: m.update(eot_token=97), "eot_token"),
        (lambda m: m.update(vocab_size=70000), "vocab_size"),
        (lambda m: m.update(train_shards=["../x.bin"]), "plain file names"),
        (lambda m: m.update(tokenizer_file=None), "tokenizer_file"),
        (lambda m: m.update(train_tokens="150"), "wrong type"),
    ],
)
def test_bad_meta_is_a_clear_error(tmp_path, edit, match):
    _data_dir(tmp_path)
    raw = json.loads((tmp_path / "meta.json").read_text())
    edit(raw)
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=match):
        DataMeta.load(tmp_path)


def test_missing_or_garbled_meta(tmp_path):
    with pytest.raises(DataError, match=r"no meta\.json"):
        DataMeta.load(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        DataMeta.load(tmp_path)
    assert shard_token_count(write_shard(tmp_path / "x.bin", [1, 2, 3])) == 3


def test_meta_records_the_dtype_and_must_agree_with_the_shards(tmp_path):
    meta = _data_dir(tmp_path)
    raw = json.loads((tmp_path / "meta.json").read_text())
    assert raw["token_dtype"] == meta.token_dtype == "uint16"
    raw.pop("token_dtype")  # a directory made before the dtype was recorded: uint16
    (tmp_path / "meta.json").write_text(json.dumps(raw))
    assert DataMeta.load(tmp_path).token_dtype == "uint16"
    (tmp_path / "meta.json").write_text(json.dumps({**raw, "token_dtype": "uint32"}))
    with pytest.raises(DataError, match=r"train_000000\.bin.*holds uint16 tokens.*token_dtype uint32"):
        DataMeta.load(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({**raw, "token_dtype": "int8"}))
    with pytest.raises(DataError, match="token_dtype must be one of"):
        DataMeta.load(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({**raw, "vocab_size": 70000}))
    with pytest.raises(DataError, match="needs uint32 shards"):
        DataMeta.load(tmp_path)
