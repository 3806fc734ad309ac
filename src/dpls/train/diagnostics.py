"""Instability diagnostics of log steps: output and attention logits, measured on the device.

Wortsman et al. (2023) reproduce two large-model instabilities at small scale: output logits
that drift (their log-partition log Z grows; z-loss pulls it to 0) and attention logits that
grow without bound (qk-layernorm stops it). On log steps the trainer records, for the
global batch of that step:

- ``logit_max``: the largest |output logit|;
- ``lse_mean``: the mean log Z = logsumexp of the logits over the batch's tokens;
- ``attn_logit_max``: the largest pre-softmax attention logit over layers and heads.

They come from the step's own forward: the logits (or, with ``fused_linear_loss``, which
never forms them, one extra output matmul of the hidden states, in chunks) and each attention
layer's ``q @ kᵀ`` (one extra product per layer: SDPA keeps its scores to itself). ``log Z``
of a row with a target is ``CE + z_y``, and the objective has just computed that row's CE:
so with the objective's ``ce`` no ``logsumexp`` pass over the logits is needed (it cost more
than the loss's own ``log_softmax`` on a CPU). Nothing runs on other steps, and the values
stay on the device until the log row is written. The rule that calls a run diverged is
`dpls.train.watch`.
"""

from __future__ import annotations

import math

import torch

from dpls.distributed import DistContext
from dpls.losses.objective import IGNORE_INDEX
from dpls.losses.softcap import softcap as apply_softcap

DIAGNOSTIC_KEYS = ("logit_max", "lse_mean", "attn_logit_max")
_HIDDEN_CHUNK = 4096  # rows of hidden states per extra output matmul (fused losses)
_LSE_ROWS = 128  # rows per logsumexp


class Diagnostics:
    """Running maxima and sums over one step's micro-batches, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.logit_max = torch.zeros((), device=device)
        self.lse_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.tokens = 0
        self.attn_max = torch.full((), float("-inf"), device=device)

    @torch.no_grad()
    def add_logits(
        self, logits: torch.Tensor, target: torch.Tensor | None = None, ce: torch.Tensor | None = None
    ) -> None:
        """Logits ``[..., V]`` of real tokens (padded columns already dropped). With ``target``
        and ``ce`` (the objective's plain CE of these logits, mean over the targets that are not
        ``IGNORE_INDEX``), ``log Z`` comes from them when every row has a target."""
        lf = logits.detach().reshape(-1, logits.shape[-1])
        if lf.numel() == 0:
            return
        lo, hi = torch.aminmax(lf)  # max |z| without an |z| copy of the logits
        self.logit_max = torch.maximum(self.logit_max, torch.maximum(-lo, hi).float())
        self.tokens += lf.shape[0]
        if target is not None and ce is not None:
            y = target.reshape(-1)
            if bool((y != IGNORE_INDEX).all()):  # a log step reads the device anyway
                z_y = lf.gather(1, y[:, None]).double().sum()
                self.lse_sum += ce.detach().double() * lf.shape[0] + z_y
                return
        # a few rows at a time: logsumexp's [rows, V] temporaries stay small (a full-size one is a
        # fresh allocation every log step, which costs more than the arithmetic on a CPU)
        for i in range(0, lf.shape[0], _LSE_ROWS):
            self.lse_sum += torch.logsumexp(lf[i : i + _LSE_ROWS].float(), dim=-1).double().sum()

    @torch.no_grad()
    def add_hidden(self, hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None) -> None:
        """The same from hidden states ``[..., C]`` and the ``[V, C]`` output weight, chunk by chunk
        (capped by the model's ``logit_softcap``, as its own logits are)."""
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        for i in range(0, h.shape[0], _HIDDEN_CHUNK):
            self.add_logits(apply_softcap(h[i : i + _HIDDEN_CHUNK] @ weight.detach().t(), softcap))

    def add_attention(self, value: torch.Tensor | None) -> None:
        if value is not None:
            self.attn_max = torch.maximum(self.attn_max, value.detach().float())

    def reduce(self, ctx: DistContext) -> dict[str, float]:
        """Over all ranks (two collectives), then one copy to the host."""
        maxima = ctx.all_reduce_max(torch.stack([self.logit_max, self.attn_max]).float())
        sums = ctx.all_reduce_sum(
            torch.stack([self.lse_sum, torch.tensor(float(self.tokens), device=self.lse_sum.device).double()])
        )
        logit_max, attn_max, lse_sum, tokens = [*maxima.tolist(), *sums.tolist()]
        out = {"logit_max": logit_max, "lse_mean": lse_sum / tokens if tokens else math.nan}
        if math.isfinite(attn_max) or math.isnan(attn_max):  # -inf: no layer recorded (none had one)
            out["attn_logit_max"] = attn_max
        return out
