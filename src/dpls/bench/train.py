"""`dpls bench train`: what a whole training step costs with DPLS instead of cross-entropy.

The loss is a small part of a step, so the question a user asks is "how much slower is my run?".
Each case builds the same model (same seed), the same AdamW and the same synthetic batch, then
times optimizer steps (forward, backward, clip, update) with the objective of each loss. Every
number is reported beside the CE step of the same preset and implementation, measured in the
same process, because absolute times on shared machines are not comparable across runs.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainCase:
    """One timed configuration: a preset trained with one loss through one implementation."""

    preset: str
    loss: str
    impl: str = "auto"
    fused_linear: bool = False


@dataclass
class TrainTiming:
    preset: str
    loss: str
    impl: str
    fused_linear: bool
    params_m: float
    ms_per_step: float
    tokens_per_s: float
    mfu: float | None
    peak_mem_gb: float | None
    ratio_to_ce: float | None = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(
    case: TrainCase,
    *,
    batch_size: int,
    block_size: int,
    steps: int,
    warmup: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_model: bool,
    epsilon: float,
    top_k: int,
    vocab_size: int | None = None,
    seed: int = 0,
) -> TrainTiming:
    """Median milliseconds per optimizer step of ``case`` (after ``warmup`` untimed steps)."""
    from dpls.losses.objective import LossConfig, build_objective
    from dpls.model import Transformer, model_config
    from dpls.train.optim import build_optimizer
    from dpls.train.perf import mfu, peak_flops
    from dpls.train.trainer import TrainStep

    overrides: dict[str, Any] = {"block_size": block_size}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    cfg = model_config(case.preset, **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg).to(device)
    loss_cfg = LossConfig(loss=case.loss, dpls_epsilon=epsilon, dpls_top_k=top_k, loss_impl=case.impl)
    step_module = TrainStep(model, build_objective(loss_cfg), fused=case.fused_linear)
    if compile_model:
        step_module = torch.compile(step_module)
    optimizer = build_optimizer(model, learning_rate=3e-4, weight_decay=0.1, betas=(0.9, 0.95), device=device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (batch_size, block_size), generator=gen).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch_size, block_size), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def one_step(i: int) -> None:
        with autocast:
            out = step_module(x, y, step=i)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        one_step(i)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        _synchronize(device)
        start = time.perf_counter()
        one_step(warmup + i)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    tokens_per_s = batch_size * block_size / (ms / 1e3)
    peak = peak_flops(device, dtype)
    mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return TrainTiming(
        preset=case.preset,
        loss=case.loss,
        impl=case.impl,
        fused_linear=case.fused_linear,
        params_m=model.num_params() / 1e6,
        ms_per_step=ms,
        tokens_per_s=tokens_per_s,
        mfu=mfu(model.flops_per_token(block_size), tokens_per_s, peak, 1),
        peak_mem_gb=mem,
    )


def bench_train(
    presets: list[str],
    losses: list[str],
    impls: list[str],
    *,
    fused_linear: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> list[TrainTiming]:
    """Time every (preset, impl, loss); each row gets its ratio to the CE step of its group."""
    from tqdm import tqdm

    rows: list[TrainTiming] = []
    bar = tqdm(
        total=len(presets) * len(impls) * len(losses), desc="bench train", unit="case", disable=not progress
    )
    for preset in presets:
        for impl in impls:
            group = []
            for loss in losses:
                bar.set_postfix_str(f"{preset} {loss} {impl}")
                group.append(time_case(TrainCase(preset, loss, impl, fused_linear), **kwargs))
                bar.update()
            ce = next((r for r in group if r.loss == "ce"), None)
            for r in group:
                r.ratio_to_ce = r.ms_per_step / ce.ms_per_step if ce else None
            rows.extend(group)
    bar.close()
    return rows


def format_table(rows: list[TrainTiming]) -> str:
    head = f"{'preset':>8} {'loss':>6} {'impl':>9} {'fused':>5} {'ms/step':>9} {'tok/s':>10} {'MFU':>6} {'peak GB':>8} {'vs CE':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else "   n/a"
        mem = f"{r.peak_mem_gb:8.2f}" if r.peak_mem_gb is not None else "     n/a"
        ratio = f"{r.ratio_to_ce:6.3f}" if r.ratio_to_ce is not None else "   n/a"
        lines.append(
            f"{r.preset:>8} {r.loss:>6} {r.impl:>9} {r.fused_linear!s:>5} {r.ms_per_step:9.2f} "
            f"{r.tokens_per_s:10.0f} {mfu} {mem} {ratio}"
        )
    return "\n".join(lines)


def check_cases(
    presets: list[str],
    losses: list[str],
    impls: list[str],
    *,
    vocab_size: int | None,
    epsilon: float,
    top_k: int,
    device: torch.device,
) -> None:
    """Every loss key is checked before the first (possibly minutes-long) case, as the trainer
    does: build each objective and evaluate it once on one token of the preset's vocabulary,
    on the benchmark's device (an implementation's availability depends on it). Raises
    ``ValueError`` naming the bad key."""
    from dpls.losses.objective import LossConfig, build_objective
    from dpls.model import model_config

    for preset in presets:
        overrides = {"vocab_size": vocab_size} if vocab_size is not None else {}
        vocab = model_config(preset, **overrides).vocab_size
        for loss in losses:
            for impl in impls:
                cfg = LossConfig(loss=loss, dpls_epsilon=epsilon, dpls_top_k=top_k, loss_impl=impl)
                logits = torch.zeros(1, vocab, device=device)
                build_objective(cfg)(logits, torch.zeros(1, dtype=torch.long, device=device), step=0)
