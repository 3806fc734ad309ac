"""Generation metrics against hand counts; prompts, streaming and seeded samples from text."""

from __future__ import annotations

import math

import pytest
import torch

from dpls.eval.generation import (
    GENERATION_METRICS,
    Sampling,
    generation_metrics,
    prompt_ids,
    sample_texts,
    stream_sample,
)
from dpls.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generation_metrics_by_hand():
    samples = [[1, 2, 1, 2, 1, 2, 3], [4, 4, 4, 4, 4]]
    # unigrams: 12 in all; distinct {1, 2, 3, 4} -> 4/12
    # bigrams: 6 + 4 = 10; distinct (1,2), (2,1), (2,3), (4,4) -> 4/10
    # trigrams: 5 + 3 = 8; distinct (1,2,1), (2,1,2), (1,2,3), (4,4,4) -> 4/8
    # 4-grams, first sample: 1212, 2121, 1212 (seen), 2123 -> 1 repeat of 4
    #          second sample: 4444, 4444 (seen) -> 1 repeat of 2; together 2/6
    m = generation_metrics(samples)
    assert list(m) == list(GENERATION_METRICS)
    assert m["distinct_1"] == pytest.approx(4 / 12)
    assert m["distinct_2"] == pytest.approx(4 / 10)
    assert m["distinct_3"] == pytest.approx(4 / 8)
    assert m["repetition_4"] == pytest.approx(2 / 6)
    assert m["mean_length"] == pytest.approx(6.0)


def test_generation_metrics_repetition_is_within_a_sample():
    """The same 4-gram in two different samples is no repetition."""
    m = generation_metrics([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert m["repetition_4"] == 0.0 and m["distinct_1"] == pytest.approx(4 / 8)


def test_generation_metrics_of_short_or_no_samples_are_nan():
    m = generation_metrics([[7], []])
    assert m["distinct_1"] == 1.0 and m["mean_length"] == 0.5
    assert all(math.isnan(m[k]) for k in ("distinct_2", "distinct_3", "repetition_4"))
    assert all(math.isnan(v) for v in generation_metrics([]).values())


class ByteTokenizer:
    """Bytes 0..255 as tokens, end-of-text 256: multi-byte characters span several tokens."""

    eot = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


class NoEotTokenizer(ByteTokenizer):
    eot = None


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, block_size=48, n_layer=1, n_head=2, n_embd=16)
    return Transformer(cfg).eval()


def test_prompt_starts_a_document():
    tok = ByteTokenizer()
    assert prompt_ids(tok, "hé") == [256, 104, 195, 169]
    assert prompt_ids(tok, "") == [256]
    with pytest.raises(ValueError, match=r"empty.*end-of-text"):
        prompt_ids(NoEotTokenizer(), "")
    assert prompt_ids(NoEotTokenizer(), "a") == [97]


def test_streamed_pieces_are_whole_characters_and_add_up():
    tok, model = ByteTokenizer(), _model()
    with torch.no_grad():  # uniform logits: random bytes, many of them parts of characters
        model.model.embed_tokens.weight.zero_()
    sampling = Sampling(max_new_tokens=20, temperature=1.0, seed=0)
    gen = torch.Generator().manual_seed(0)
    pieces = list(stream_sample(model, tok, "x", sampling, gen))
    final = pieces[-1][1]
    assert "".join(p for p, _ in pieces) == final.text == tok.decode(final.tokens)
    assert all(not p.endswith("\ufffd") for p, _ in pieces[:-1])
    assert len(final.tokens) + final.ended <= 20


def test_sample_texts_is_deterministic_for_a_seed():
    tok, model = ByteTokenizer(), _model()
    s = Sampling(max_new_tokens=15, temperature=1.5, seed=3)
    a = sample_texts(model, tok, ["a", "b"], s, num_samples=2)
    b = sample_texts(model, tok, ["a", "b"], s, num_samples=2)
    c = sample_texts(
        model, tok, ["a", "b"], Sampling(max_new_tokens=15, temperature=1.5, seed=4), num_samples=2
    )
    tokens = [[x.tokens for x in row] for row in a]
    assert tokens == [[x.tokens for x in row] for row in b]
    assert tokens != [[x.tokens for x in row] for row in c]
    assert [len(row) for row in a] == [2, 2] and a[0][0].prompt == "a"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=2.0), "top_p"),
    ],
)
def test_sampling_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_context_overflow_names_the_room_left():
    tok, model = ByteTokenizer(), _model()
    with pytest.raises(ValueError, match=r"block_size 48.*at most 45 new tokens"):
        next(stream_sample(model, tok, "ab", Sampling(max_new_tokens=46), torch.Generator()))


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from data_helpers import make_text_data, train_tiny_run

    root = tmp_path_factory.mktemp("gen")
    data = make_text_data(root / "data")
    return train_tiny_run(data, root / "run", steps=3), data


def test_validation_prompts_are_document_openings(text_run):
    from dpls.data.shards import read_shard
    from dpls.eval.generation import validation_prompts

    _, data = text_run
    prompts = validation_prompts(data, 5, 4)
    val = read_shard(data / "val_000000.bin").tolist()
    starts = [i for i, t in enumerate(val) if t == 0 and i + 5 <= len(val) and 0 not in val[i + 1 : i + 5]]
    assert prompts == [val[i : i + 5] for i in starts[:5]]
    assert validation_prompts(data, 3, 10_000) == []  # no document that long


def test_run_samples_is_seeded_and_measured(text_run, monkeypatch):
    from dpls.eval.generation import run_samples

    run, data = text_run
    kwargs = dict(num_samples=4, prompt_tokens=3, max_new_tokens=10, device="cpu")
    a = run_samples(run, data, seed=1, **kwargs)
    assert a == run_samples(run, data, seed=1, **kwargs) and a["notes"] == []
    assert a["samples"] != run_samples(run, data, seed=2, **kwargs)["samples"]
    assert len(a["prompts"]) == len(a["samples"]) == 4 and set(a["metrics"]) == set(GENERATION_METRICS)
    assert a["settings"]["max_new_tokens"] == 10 and 0 <= a["metrics"]["mean_length"] <= 10
    # a tokenizer that cannot be loaded here (GPT-2's, offline): token ids instead of text
    import dpls.data.tokenizer

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(dpls.data.tokenizer, "load_tokenizer", offline)
    b = run_samples(run, data, seed=1, **kwargs)
    assert b["metrics"] == a["metrics"] and "no network" in b["notes"][0]
    assert all(p.replace(" ", "").isdigit() for p in b["prompts"])
    # nothing to prompt with: no samples, a note, no error
    monkeypatch.undo()
    c = run_samples(run, data, seed=1, **{**kwargs, "prompt_tokens": 10_000})
    assert c["samples"] == [] and c["metrics"] == {} and "no validation document" in c["notes"][0]
