"""Deterministic batches from token shards: the training stream and the fixed validation set.

Training: the corpus is cut into non-overlapping windows of ``block_size + 1`` tokens (input
and its next-token targets; a window never crosses a shard). Each epoch visits every window
once, in an order drawn from ``(seed, epoch)``. All ranks compute the same global order and
each micro-step consumes ``batch_size × world_size`` windows of it, rank ``r`` taking the
``r``-th slice: together the ranks see exactly what one process with the global batch would.
The position in that order is the whole state, so a resumed loader continues exactly.

Validation: consecutive windows over the val split, always the same, every token after the
first of each shard predicted once (a shard's shorter tail is its own batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpls.data.meta import DataError, DataMeta
from dpls.data.shards import read_shard, shard_token_count


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive(world_size=world_size)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")


def _open_split(data_dir: str | Path, split: str) -> tuple[DataMeta, list[np.ndarray]]:
    data_dir = Path(data_dir)
    meta = DataMeta.load(data_dir)
    return meta, [read_shard(data_dir / name) for name in meta.shards(split)]


class TokenLoader:
    """``next_batch() -> (x, y)``: int64 CPU tensors ``[batch_size, block_size]``, ``y`` = ``x``
    shifted by one. Deterministic for ``seed``; ranks get disjoint slices of one global order."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        batch_size: int = 8,
        block_size: int = 256,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_positive(batch_size=batch_size, block_size=block_size)
        _check_rank(rank, world_size)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.meta, self._shards = _open_split(data_dir, split)
        per_shard = [max(len(s) - 1, 0) // block_size for s in self._shards]
        self._first_window = np.cumsum([0, *per_shard])  # window id -> shard via searchsorted
        self.num_windows = int(self._first_window[-1])
        longest = max((len(t) for t in self._shards), default=0)
        if (
            self.num_windows < self.global_batch
            and longest <= block_size
            and sum(map(len, self._shards)) > block_size
        ):
            raise DataError(
                f"the {split} shards of {str(data_dir)!r} are too small: the longest holds {longest} tokens, "
                f"less than one window of {block_size + 1} (windows do not cross shards); prepare the data "
                "again with a larger --shard-tokens, or use a smaller block_size"
            )
        if self.num_windows < self.global_batch:
            raise DataError(
                f"the {split} split of {str(data_dir)!r} has {self.num_windows} windows of {block_size + 1} "
                f"tokens, fewer than one global batch (batch_size {batch_size} × world_size {world_size}); "
                "use a smaller batch_size or block_size, or more data"
            )
        self.epoch = 0
        self.position = 0  # windows of the current epoch's order already consumed (all ranks)
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Micro-steps per epoch; the last ``num_windows % global_batch`` windows of each
        epoch's order are skipped (a different set each epoch)."""
        return self.num_windows // self.global_batch

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._order = rng.permutation(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def _window(self, window_id: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first_window, window_id, side="right")) - 1
        start = (window_id - int(self._first_window[shard])) * self.block_size
        return self._shards[shard][start : start + self.block_size + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.global_batch > self.num_windows:
            self.epoch += 1
            self.position = 0
        lo = self.position + self.rank * self.batch_size
        ids = self._epoch_order()[lo : lo + self.batch_size]
        self.position += self.global_batch
        buf = np.stack([self._window(int(i)) for i in ids]).astype(np.int64)
        tokens = torch.from_numpy(buf)
        return tokens[:, :-1], tokens[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands: enough for ``load_state_dict`` to continue exactly."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "split": self.split,
            "block_size": self.block_size,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. The stream is defined by the data, ``block_size`` and the
        seed, which must match; ``batch_size`` and ``world_size`` may differ (the position
        counts windows of the global order)."""
        for key in ("block_size", "num_windows", "split"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state is for {key}={state[key]!r}, this loader has {key}={getattr(self, key)!r}: "
                    "it was saved for different data or settings"
                )
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"loader state is for seed={state['seed']}, this loader has seed={self.seed}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_windows:
            raise ValueError(f"loader state out of range: epoch {epoch}, position {position}")
        self.epoch, self.position = epoch, position


@dataclass(frozen=True)
class _Window:
    shard: int
    start: int
    length: int  # predicted tokens: the window spans length + 1 tokens


def _validation_windows(lengths: list[int], block_size: int, max_tokens: int | None) -> list[_Window]:
    windows: list[_Window] = []
    budget = max_tokens if max_tokens is not None else sum(lengths)
    for shard, n in enumerate(lengths):
        for start in range(0, max(n - 1, 0), block_size):
            length = min(block_size, n - 1 - start, budget)
            if length <= 0:
                return windows
            windows.append(_Window(shard, start, length))
            budget -= length
    return windows


class ValidationSet:
    """The fixed validation batches; iterate as often as you like, always the same batches.

    ``tokens``: how many target tokens one pass yields (on this rank); ``len()``: batches.
    """

    def __init__(self, shards: list[np.ndarray], windows: list[_Window], batch_size: int) -> None:
        self._shards = shards
        self._batches: list[list[_Window]] = []
        for w in windows:  # consecutive windows of equal length share a batch
            last = self._batches[-1] if self._batches else None
            if last is not None and len(last) < batch_size and last[-1].length == w.length:
                last.append(w)
            else:
                self._batches.append([w])
        self.tokens = sum(w.length for w in windows)

    def _select(self, rank: int, world_size: int) -> ValidationSet:
        view = object.__new__(ValidationSet)
        view._shards = self._shards
        view._batches = self._batches[rank::world_size]
        view.tokens = sum(w.length for b in view._batches for w in b)
        return view

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self._batches:
            buf = np.stack([self._shards[w.shard][w.start : w.start + w.length + 1] for w in batch])
            tokens = torch.from_numpy(buf.astype(np.int64))
            yield tokens[:, :-1], tokens[:, 1:]


def validation_batches(
    data_dir: str | Path,
    block_size: int,
    batch_size: int,
    max_tokens: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> ValidationSet:
    """The fixed validation set: consecutive non-overlapping windows over the val shards.

    With ``max_tokens`` it stops after exactly that many predicted tokens (the last window
    cut short). With ``world_size > 1`` each rank gets every ``world_size``-th batch, so the
    ranks together cover the set once.
    """
    _check_positive(block_size=block_size, batch_size=batch_size)
    _check_rank(rank, world_size)
    if max_tokens is not None:
        _check_positive(max_tokens=max_tokens)
    _, shards = _open_split(data_dir, "val")
    windows = _validation_windows([len(s) for s in shards], block_size, max_tokens)
    if not windows:
        raise DataError(f"the val split of {str(data_dir)!r} has no token to predict")
    full = ValidationSet(shards, windows, batch_size)
    return full if world_size == 1 else full._select(rank, world_size)


def val_token_count(data_dir: str | Path, block_size: int, max_tokens: int | None = None) -> int:
    """How many tokens ``validation_batches`` predicts in one pass (all ranks together)."""
    _check_positive(block_size=block_size)
    meta = DataMeta.load(data_dir)
    lengths = [shard_token_count(Path(data_dir) / name) for name in meta.val_shards]
    return sum(w.length for w in _validation_windows(lengths, block_size, max_tokens))
