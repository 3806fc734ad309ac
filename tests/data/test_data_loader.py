"""TokenLoader (deterministic, resumable, disjoint ranks) and the fixed validation set."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_helpers import write_data_dir
from dpls.data import DataError, TokenLoader, val_token_count, validation_batches

# Token i of the corpus is i (train) or 30000 + i (val): every window is identifiable by its start.
TRAIN = (1000, 457, 800)
VAL = (300, 129)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return _make(root, TRAIN, VAL)


def _make(root, train, val):
    """Shards of consecutive token ids (train from 0, val from 30000): every window is traceable."""

    def consecutive(sizes, start):
        ends = np.cumsum([start, *sizes])
        return [np.arange(a, b, dtype=np.uint16) for a, b in itertools.pairwise(ends)]

    write_data_dir(root, consecutive(train, 0), consecutive(val, 30000), vocab_size=65536, tokenizer="gpt2")
    return root


def _windows(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_batches_are_shifted_windows(data_dir):
    loader = TokenLoader(data_dir, batch_size=4, block_size=16, seed=1)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(y, x + 1)  # consecutive tokens: the targets are the next tokens
    shard_starts = (0, 1000, 1457)
    for start in _windows(x):  # windows start on the block grid of their shard, never cross it
        shard = max(s for s in shard_starts if s <= start)
        assert (start - shard) % 16 == 0


def test_one_epoch_visits_every_window_once_then_reshuffles(data_dir):
    loader = TokenLoader(data_dir, batch_size=5, block_size=16, seed=3)
    expected = sum((n - 1) // 16 for n in TRAIN)
    assert loader.num_windows == expected
    epoch0 = [w for _ in range(loader.steps_per_epoch) for w in _windows(loader.next_batch()[0])]
    assert len(set(epoch0)) == len(epoch0) == loader.steps_per_epoch * 5
    assert loader.epoch == 0
    epoch1 = [w for _ in range(loader.steps_per_epoch) for w in _windows(loader.next_batch()[0])]
    assert loader.epoch == 1 and len(set(epoch1)) == len(epoch1)
    assert epoch1 != epoch0


def test_deterministic_for_a_seed(data_dir):
    def first(seed):
        loader = TokenLoader(data_dir, batch_size=3, block_size=32, seed=seed)
        return [loader.next_batch()[0] for _ in range(6)]

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


@given(world=st.integers(2, 4), batch=st.integers(1, 3), steps=st.integers(1, 30))
@settings(max_examples=15)
def test_ranks_split_the_global_batch(data_dir, world, batch, steps):
    single = TokenLoader(data_dir, batch_size=batch * world, block_size=16, seed=7)
    ranks = [
        TokenLoader(data_dir, batch_size=batch, block_size=16, seed=7, rank=r, world_size=world)
        for r in range(world)
    ]
    for _ in range(steps):
        whole = single.next_batch()[0]
        parts = [loader.next_batch()[0] for loader in ranks]
        assert torch.equal(torch.cat(parts), whole)  # disjoint slices that make up the global batch


@given(before=st.integers(0, 120), after=st.integers(1, 40))
@settings(max_examples=15)
def test_resume_continues_exactly(data_dir, before, after):
    loader = TokenLoader(data_dir, batch_size=4, block_size=24, seed=5)
    for _ in range(before):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(after)]
    resumed = TokenLoader(data_dir, batch_size=4, block_size=24, seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(p, resumed.next_batch()[0]) for p in expected)


def test_resume_with_other_ranks_keeps_the_global_stream(data_dir):
    single = TokenLoader(data_dir, batch_size=4, block_size=16, seed=2)
    for _ in range(7):
        single.next_batch()
    state = single.state_dict()
    ranks = [
        TokenLoader(data_dir, batch_size=2, block_size=16, seed=2, rank=r, world_size=2) for r in range(2)
    ]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), single.next_batch()[0])


def test_state_from_other_settings_is_refused(data_dir):
    state = TokenLoader(data_dir, batch_size=2, block_size=16).state_dict()
    with pytest.raises(ValueError, match="block_size"):
        TokenLoader(data_dir, batch_size=2, block_size=32).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(data_dir, batch_size=2, block_size=16, seed=9).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(block_size=-1), "block_size"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(world_size=0), "world_size"),
        (dict(split="test"), "split"),
        (dict(batch_size=200, block_size=16), "fewer than one global batch"),
    ],
)
def test_bad_arguments(data_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenLoader(data_dir, **kwargs)


def test_missing_data_dir_and_corrupt_shard(tmp_path):
    with pytest.raises(DataError, match=r"no meta\.json"):
        TokenLoader(tmp_path / "nowhere")
    root = _make(tmp_path, (100,), (50,))
    (root / "train_000000.bin").write_bytes(b"\0" * 2000)
    with pytest.raises(ValueError, match=r"train_000000\.bin"):
        TokenLoader(root, batch_size=1, block_size=8)


def test_validation_covers_every_token_once_and_is_fixed(data_dir):
    batches = validation_batches(data_dir, block_size=50, batch_size=3)
    seen = [t for x, y in batches for t in y.flatten().tolist()]
    # every val token except each shard's first is predicted exactly once, with its predecessor as input
    expected = [30000 + i for i in range(1, 300)] + [30300 + i for i in range(1, 129)]
    assert sorted(seen) == expected
    for x, y in batches:
        assert torch.equal(y, x + 1) and x.shape[0] <= 3
    again = list(validation_batches(data_dir, block_size=50, batch_size=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again)) and len(again) == len(batches)
    assert batches.tokens == len(expected) == val_token_count(data_dir, 50)


@given(max_tokens=st.integers(1, 500))
@settings(max_examples=20)
def test_validation_max_tokens_is_exact(data_dir, max_tokens):
    batches = validation_batches(data_dir, block_size=32, batch_size=4, max_tokens=max_tokens)
    total = sum(y.numel() for _, y in batches)
    assert total == batches.tokens == min(max_tokens, 299 + 128) == val_token_count(data_dir, 32, max_tokens)
    capped = [t for _, y in batches for t in y.flatten().tolist()]
    full = [
        t for _, y in validation_batches(data_dir, block_size=32, batch_size=4) for t in y.flatten().tolist()
    ]
    assert capped == full[:total]  # the capped set is a prefix of the full one


def test_validation_ranks_partition_the_set(data_dir):
    full = [y for _, y in validation_batches(data_dir, 20, 2)]
    parts = [list(validation_batches(data_dir, 20, 2, rank=r, world_size=3)) for r in range(3)]
    merged = sorted(t for part in parts for _, y in part for t in y.flatten().tolist())
    assert merged == sorted(t for y in full for t in y.flatten().tolist())
    with pytest.raises(ValueError, match="max_tokens"):
        validation_batches(data_dir, 20, 2, max_tokens=0)
