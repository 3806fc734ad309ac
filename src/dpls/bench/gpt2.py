"""A GPT-2-style model, only as a yardstick for `dpls bench train`.

The question "is ``dpls train`` as fast as nanoGPT?" needs nanoGPT's kind of model beside
ours: LayerNorm instead of RMSNorm, learned absolute positions instead of RoPE, a GELU MLP
of width 4·C instead of SwiGLU, fused query/key/value projection, no biases (nanoGPT's
default), output layer tied to the token embedding. It is trained the way nanoGPT's loop
trains it (`plain_step`): ``F.cross_entropy`` on the logits, the default AdamW of the
device (fused on CUDA only), clip, step. This module is a benchmark contender, not a model
the trainer offers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dpls.train.optim import param_groups


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 8192
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class _SelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.out = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        heads = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(heads[0], heads[1], heads[2], is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, cfg: GPT2Config) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.attn = _SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.n_embd, bias=False)
        self.up = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.down = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT2(nn.Module):
    """``forward(idx [B, T]) -> logits [B, T, V]``; the same surface as `dpls.model.Transformer`
    that the trainer's step uses (``config.vocab_size``, ``hidden_states``, ``output_weight``)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.n_embd, bias=False)
        std, residual_std = 0.02, 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # residual output projections scaled down with depth, as in GPT-2
                nn.init.normal_(p, 0.0, residual_std if name.endswith(("out.weight", "down.weight")) else std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tokens.weight

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tokens(idx) + self.positions(pos)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(idx) @ self.tokens.weight.T

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """``6·N`` over the matmul weights (output layer included) plus the attention's ``12·L·C·T``."""
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        n_matmul = self.num_params() - self.positions.weight.numel()
        return float(6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * T)


def plain_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW as nanoGPT builds it: decay on matrices, fused on CUDA only (the CPU default elsewhere)."""
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=fused)


def plain_step(model: GPT2, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of nanoGPT's loop (no accumulation, no logging): CE on the logits, clip, update."""
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
