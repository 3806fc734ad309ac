"""Per-token statistics of a data directory: training-set counts (`token_counts`) and the bytes of
text each token stands for (`Tokenizer.byte_lengths`), exact for byte-level BPEs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_helpers import fake_gpt2, write_data_dir
from dpls.data import TiktokenTokenizer, token_counts, train_bpe

CORPUS = ["def add(a, b):\n    return a + b\n", "class Point:\n    pass\n"] * 20


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=300)


@given(text=st.text(max_size=120))
@settings(max_examples=40)
def test_byte_level_bpe_and_gpt2_bytes_are_exact(bpe, text):
    """Any text (multi-byte characters split over byte tokens included): the bytes of its tokens add
    up to its UTF-8 bytes."""
    for tok in (bpe, TiktokenTokenizer(fake_gpt2())):
        lengths, exact = tok.byte_lengths()
        assert exact and len(lengths) == tok.vocab_size and lengths[tok.eot] == 0
        assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_other_tokenizers_decode_each_id_and_say_it_is_not_exact():
    """A tokenizer.json whose decoder is not byte-level (here a word-level one with SentencePiece's
    word-start marker): each id decoded alone, flagged as not exact; special tokens have no bytes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from dpls.data import BPETokenizer

    vocab = {"<|endoftext|>": 0, "▁hi": 1, "é": 2, "<pad>": 3}
    raw = HFTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.add_special_tokens(["<|endoftext|>", "<pad>"])
    lengths, exact = BPETokenizer(raw).byte_lengths()
    assert not exact and lengths == [0, 2, 2, 0]  # "▁hi" decoded alone is "hi": its space is lost


def test_token_counts_read_the_training_shards_only(tmp_path):
    train = [np.array([1, 1, 2, 5, 5, 5]), np.array([2, 0, 5])]
    write_data_dir(tmp_path, train, [np.array([3, 3, 3, 3])], vocab_size=7)
    assert token_counts(tmp_path, 7).tolist() == [1, 2, 2, 0, 0, 4, 0]
    # a cap counts the same leading share of every shard: 4 of 9 tokens, so ⌈6·4/9⌉ = 3 and ⌈3·4/9⌉ = 2
    assert token_counts(tmp_path, 7, max_tokens=4).tolist() == [1, 2, 2, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="max_tokens"):
        token_counts(tmp_path, 7, max_tokens=0)
