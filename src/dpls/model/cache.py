"""The key/value cache for generation: each layer keeps what its attention needs of past tokens.

Used only by generation (``Transformer.forward(idx, cache=...)``); training never builds one,
so its forward pass is the plain causal one. What a layer stores is the attention class's
choice: keys and values for MHA / GQA (``n_kv_head`` heads, so GQA's cache is smaller), the
rank-R factors for TPA (the memory saving that motivates it). Buffers are allocated on first
use at ``max_len`` positions and written in place, so a step copies only the new positions.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's cached tensors, each growing along its own sequence dimension."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0  # positions written so far
        self._buffers: list[torch.Tensor] = []

    def extend(self, seq_dim: int, *new: torch.Tensor) -> list[torch.Tensor]:
        """Append ``new`` (same length T along ``seq_dim``) and return every position so far.

        Call once per forward: the layer's length advances by T.
        """
        T = new[0].shape[seq_dim]
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {end} were asked for")
        if not self._buffers:
            for t in new:
                shape = list(t.shape)
                shape[seq_dim] = self.max_len
                self._buffers.append(t.new_empty(shape))
        out = []
        for buf, t in zip(self._buffers, new, strict=True):
            buf.narrow(seq_dim, start, T).copy_(t)
            out.append(buf.narrow(seq_dim, 0, end))
        self.length = end
        return out

    def attention_mask(self, T: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for T new queries against every cached key (call before
        ``extend``): causal from the start, nothing for one query, a shifted causal mask otherwise."""
        if self.length == 0:
            return None, True
        if T == 1:
            return None, False
        mask = torch.ones(T, self.length + T, dtype=torch.bool, device=device).tril(diagonal=self.length)
        return mask, False


class KVCache:
    """The caches of every layer, for a batch of sequences of at most ``max_len`` tokens."""

    def __init__(self, n_layer: int, max_len: int) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len}")
        self.max_len = max_len
        self.layers = [LayerCache(max_len) for _ in range(n_layer)]

    @property
    def pos(self) -> int:
        """Tokens seen so far: the position of the next token."""
        return self.layers[0].length if self.layers else 0
