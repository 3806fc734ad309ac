"""A vocabulary over 65,536: a Hugging Face tokenizer given by path (or Hub name) prepares
uint32 shards that say so, and (slow) the whole pipeline runs on them: training, evaluation,
sampling, export and a tiny study."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import large_vocab_documents, large_vocab_tokenizer
from dpls.cli import main
from dpls.data import DataMeta, load_tokenizer, prepare_files, prepare_fineweb_edu, read_shard
from dpls.data import prepare as prep
from dpls.data.shards import shard_header
from dpls.data.tokenizer import EOT, BPETokenizer, hf_tokenizer

VOCAB = 70_000


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return large_vocab_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", VOCAB)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    rows = [json.dumps({"text": d}) for d in large_vocab_documents(400)]
    (src / "docs.jsonl").write_text("\n".join(rows) + "\n")
    return src / "docs.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_file, corpus) -> Path:
    out = tmp_path_factory.mktemp("data") / "big"
    prepare_files([corpus], out, tokenizer=str(tokenizer_file), shard_tokens=4096, progress=False)
    return out


def _all_tokens(root: Path, meta: DataMeta) -> np.ndarray:
    return np.concatenate([read_shard(root / n) for n in meta.train_shards + meta.val_shards])


def test_a_given_tokenizer_over_65536_makes_uint32_shards(data, tokenizer_file, corpus):
    meta = DataMeta.load(data)
    raw = json.loads((data / "meta.json").read_text())
    assert raw["token_dtype"] == meta.token_dtype == "uint32" and raw["vocab_size"] == VOCAB
    assert (
        meta.tokenizer == "bpe" and (data / "tokenizer.json").is_file()
    )  # copied: the directory stands alone
    assert meta.eot_token == VOCAB - 1  # the separator itself is past uint16
    for name in meta.train_shards + meta.val_shards:
        assert shard_header(data / name)[0] == "uint32"
        assert np.fromfile(data / name, dtype="<i4", count=2).tolist() == [20240801, 7]
    tokens = _all_tokens(data, meta)
    assert tokens.dtype == np.uint32 and tokens.max() == VOCAB - 1 and (tokens > 65535).mean() > 0.5
    # every document, encoded by the tokenizer, is in the shards after its separator
    tok = load_tokenizer(data)
    assert tok.vocab_size == VOCAB and tok.eot == VOCAB - 1
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert sum(1 + len(tok.encode(d)) for d in docs) == len(tokens) == meta.train_tokens + meta.val_tokens
    assert tok.decode(tok.encode(docs[0])) == docs[0]
    # the same tokenizer again: the directory is finished, nothing is redone
    assert (
        prepare_files([corpus], data, tokenizer=str(tokenizer_file), shard_tokens=4096, progress=False)
        == meta
    )


def test_a_folder_holding_tokenizer_json_and_the_cli(tmp_path, tokenizer_file, corpus, capsys):
    out = tmp_path / "cli"
    args = ["prepare", "files", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer_file.parent)]
    assert main([*args, "--shard-tokens", "4096", "--quiet"]) == 0
    assert f"vocab {VOCAB}" in capsys.readouterr().out
    assert DataMeta.load(out).token_dtype == "uint32"
    missing = tmp_path / "nowhere" / "tokenizer.json"
    assert (
        main(["prepare", "files", str(corpus), "--out", str(tmp_path / "x"), "--tokenizer", str(missing)])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_hub_name_goes_through_from_pretrained(monkeypatch, tokenizer_file):
    """The real download path (tokenizers' ``from_pretrained``), fed a local file here; a failed
    download is one DataError naming the name and the way out."""
    from tokenizers import Tokenizer

    asked = []

    def from_pretrained(name, *args, **kwargs):
        asked.append(name)
        if name != "org/big-vocab":
            raise RuntimeError("Repository Not Found")
        return Tokenizer.from_file(str(tokenizer_file))

    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(from_pretrained))
    tok = hf_tokenizer("org/big-vocab")
    assert asked == ["org/big-vocab"] and tok.vocab_size == VOCAB
    with pytest.raises(
        ValueError, match=r"cannot load the tokenizer 'org/missing' from the Hugging Face Hub"
    ):
        hf_tokenizer("org/missing")


def test_a_tokenizer_without_an_end_of_text_token_is_refused(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match=r"none of the end-of-text tokens <\|endoftext\|>"):
        hf_tokenizer(tmp_path / "t.json")


def test_other_end_of_text_names_are_found(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "<|end_of_text|>": 2}, unk_token="[UNK]"))
    tok.add_special_tokens([AddedToken("<|end_of_text|>", special=True)])  # LLaMA-3's separator
    tok.save(str(tmp_path / "t.json"))
    assert hf_tokenizer(tmp_path / "t.json").eot == 2 and EOT not in tok.get_vocab()


def test_uint32_prepare_resumes_to_the_same_shards(tmp_path, tokenizer_file, corpus, monkeypatch):
    """Staging files hold uint32 tokens too: an interrupted run resumes to the very same shards."""
    monkeypatch.setattr(prep, "ENCODE_BATCH_CHARS", 3000)
    monkeypatch.setattr(prep, "CHECKPOINT_SECONDS", 0.0)
    kwargs = dict(tokenizer=str(tokenizer_file), shard_tokens=1000, progress=False)
    reference = prepare_files([corpus], tmp_path / "ref", **kwargs)
    original, calls = BPETokenizer.encode_batch, {"n": 0}

    def interrupted(self, texts, num_threads=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, texts, num_threads)

    monkeypatch.setattr(BPETokenizer, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_files([corpus], tmp_path / "out", **kwargs)
    assert list((tmp_path / "out").glob(".*.staging-*"))
    monkeypatch.setattr(BPETokenizer, "encode_batch", original)
    resumed = prepare_files([corpus], tmp_path / "out", **kwargs)
    assert (
        resumed.train_shards == reference.train_shards
        and resumed.corpus_fingerprint == reference.corpus_fingerprint
    )
    for name in reference.train_shards + reference.val_shards:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_fineweb_takes_a_given_tokenizer(tmp_path, tokenizer_file):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = large_vocab_documents(60, seed=1)
    pq.write_table(pa.table({"text": docs, "id": [str(i) for i in range(60)]}), tmp_path / "fw.parquet")
    out = tmp_path / "fw"
    meta = prepare_fineweb_edu(
        out, data_files=[str(tmp_path / "fw.parquet")], tokenizer=str(tokenizer_file), shard_tokens=1000,
        val_fraction=0.1, progress=False,
    )  # fmt: skip
    assert meta.token_dtype == "uint32" and meta.vocab_size == VOCAB and (out / "tokenizer.json").is_file()
    assert (
        meta.settings["tokenizer"] == str(tokenizer_file.resolve())
        and "tokenizer_fingerprint" in meta.settings
    )
    with pytest.raises(ValueError, match="not 'bpe'"):
        prepare_fineweb_edu(tmp_path / "o", tokenizer="bpe")


# -- the pipeline end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_train_eval_sample_export_and_study_over_65536(data, tmp_path, capsys, one_thread, monkeypatch):
    """A tiny model on the 70,000-token data with the output layer padded (70,016 rows)."""
    from data_helpers import train_tiny_run
    from dpls.runs.checkpoint import load_model, read_model_config

    run = train_tiny_run(
        data, tmp_path / "run", steps=4, n_layer=1, n_embd=16, n_head=2, block_size=32, batch_size=2,
        pad_vocab_to=64, eval_tokens=128,
    )  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["val_ce"])
    checkpoint = run / "checkpoints" / "step_0000004"
    mc = read_model_config(checkpoint)
    assert mc["vocab_size"] == VOCAB and mc["pad_vocab_to"] == 64
    model = load_model(run)
    assert model(torch.tensor([[VOCAB - 1, 69_998]])).shape[-1] == 70_016

    assert main(["eval", str(run), "--out", str(tmp_path / "m.json"), "--tokens", "128"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["tokens"] == 128

    capsys.readouterr()
    assert (
        main(["sample", str(run), "--prompt", "w65001 w65010", "--max-new-tokens", "6", "--seed", "1"]) == 0
    )
    sampled = capsys.readouterr().out
    assert sampled.startswith("w65001 w65010") and all(
        w[0] == "w" or w in (EOT, "[UNK]") for w in sampled.split()
    )

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB and config["eos_token_id"] == VOCAB - 1

    from dpls.study.runner import run_study
    from dpls.study.spec import parse_spec

    spec = {
        "name": "bigvocab",
        "out_dir": str(tmp_path / "study"),
        "data_dir": str(data),
        "fork_step": 2,
        "seeds": [0, 1],
        "iters_per_arm": 2,
        "train": {
            "model": "tiny",
            "n_layer": 1,
            "n_embd": 16,
            "n_head": 2,
            "block_size": 32,
            "batch_size": 2,
        },
        "eval": {"tokens": 128, "samples": 2, "sample_tokens": 4, "sample_prompt_tokens": 4},
        "arms": [{"name": "ce", "loss": "ce"}, {"name": "dpls", "loss": "dpls", "dpls_top_k": 5}],
    }
    report = run_study(parse_spec(spec), progress=False)
    summary = json.loads((report.parent / "summary.json").read_text())
    assert set(summary["arms"]) == {"ce", "dpls"}
