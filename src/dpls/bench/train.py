"""`dpls bench train`: what a whole training step costs with DPLS instead of cross-entropy.

The loss is a small part of a step, so the question a user asks is "how much slower is my run?".
Each case builds the same model (same seed), the same AdamW and the same synthetic batch, and
times the trainer's own optimizer step (`dpls.train.trainer.train_step`: forward, objective,
backward, clip, the update) with the objective of each loss. Every number is reported beside
the CE step of the same preset and implementation, measured in the same process, because
absolute times on shared machines are not comparable across runs.

The ``nanogpt`` preset is the yardstick: a GPT-2-style model at nanoGPT's README CPU shape
(4 layers, 4 heads, width 128), trained by a step the way nanoGPT's loop takes it
(`dpls.bench.gpt2`). Rows then also carry their speed relative to it.

All cases are built first and then timed in turn, one step each per round, so a change in
the machine's load during the run hits every case alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dpls.bench.gpt2 import GPT2, GPT2Config, plain_optimizer, plain_step
from dpls.distributed.context import DistContext
from dpls.losses.objective import LossConfig, build_objective
from dpls.model import Transformer, model_config
from dpls.train.optim import build_optimizer
from dpls.train.perf import mfu, peak_flops
from dpls.train.trainer import Parts, TrainStep, train_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The yardstick preset: a GPT-2-style model at nanoGPT's README CPU shape, in nanoGPT's kind of
# step; only its own loss ("ce", as F.cross_entropy) and implementation ("torch") apply.
NANOGPT = "nanogpt"
NANOGPT_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "vocab_size": 8192}


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
    ratio_to_ce: float | None = None  # time per step over the CE step's of the same group
    speed_vs_nanogpt: float | None = None  # tokens/s over the nanogpt row's (when timed)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Runner:
    """One case, built and ready: ``step(i)`` takes optimizer step ``i``."""

    case: TrainCase
    model: Any
    step: Callable[[int], None]
    resident_bytes: int  # weights and optimizer state on the device (CUDA), for the peak memory
    times: list[float] = field(default_factory=list)
    peak_step_bytes: int = 0


def build_case(
    case: TrainCase,
    *,
    batch_size: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_model: bool,
    epsilon: float,
    top_k: int,
    vocab_size: int | None = None,
    seed: int = 0,
) -> _Runner:
    """The model, optimizer and batch of ``case``, and its step function.

    A dpls preset takes the trainer's step (`train_step`, as ``dpls train`` runs it between two
    log steps); the ``nanogpt`` preset takes `dpls.bench.gpt2.plain_step`.
    """
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(seed)
    autocast: Any = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    model: nn.Module
    if case.preset == NANOGPT:
        model, step = _nanogpt_step(device, autocast, compile_model, batch_size, block_size, vocab_size, seed)
    else:
        loss_cfg = LossConfig(loss=case.loss, dpls_epsilon=epsilon, dpls_top_k=top_k, loss_impl=case.impl)
        model, step = _trainer_step(
            case, loss_cfg, device, autocast, compile_model, batch_size, block_size, vocab_size, seed
        )
    resident = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else 0
    return _Runner(case, model, step, resident)


def _batch(
    vocab: int, batch_size: int, block_size: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random batch (inputs, targets), the same for every case of a seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch_size, block_size), generator=gen).to(device)
    y = torch.randint(0, vocab, (batch_size, block_size), generator=gen).to(device)
    return x, y


def _nanogpt_step(
    device: torch.device,
    autocast: Any,
    compile_model: bool,
    batch_size: int,
    block_size: int,
    vocab_size: int | None,
    seed: int,
) -> tuple[GPT2, Callable[[int], None]]:
    """The yardstick: the GPT-2-style model in nanoGPT's plain step."""
    shape = {**NANOGPT_SHAPE, **({"vocab_size": vocab_size} if vocab_size is not None else {})}
    model = GPT2(GPT2Config(block_size=block_size, **shape)).to(device)
    optimizer = plain_optimizer(model, device)
    net: Any = torch.compile(model) if compile_model else model
    x, y = _batch(model.config.vocab_size, batch_size, block_size, seed, device)

    def step(i: int) -> None:
        with autocast:
            plain_step(net, optimizer, x, y)

    return model, step


def _trainer_step(
    case: TrainCase,
    loss_cfg: LossConfig,
    device: torch.device,
    autocast: Any,
    compile_model: bool,
    batch_size: int,
    block_size: int,
    vocab_size: int | None,
    seed: int,
) -> tuple[Transformer, Callable[[int], None]]:
    """A dpls preset in the trainer's own step (`train_step`), the same batch every step."""
    overrides: dict[str, Any] = {"block_size": block_size}
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    cfg = model_config(case.preset, **overrides)
    model = Transformer(cfg).to(device)
    step_module: Any = TrainStep(model, build_objective(loss_cfg), fused=case.fused_linear)
    if compile_model:
        step_module = torch.compile(step_module)
    optimizer = build_optimizer(model, learning_rate=3e-4, weight_decay=0.1, betas=(0.9, 0.95), device=device)
    x, y = _batch(cfg.vocab_size, batch_size, block_size, seed, device)
    parts = Parts(
        ctx=DistContext(device=device),
        model=model,
        wrapped=step_module,
        optimizer=optimizer,
        batches=iter(lambda: (x, y), None),  # the same batch forever
        autocast=autocast,
        micro_steps=1,
        grad_clip=1.0,
    )

    def step(i: int) -> None:
        train_step(parts, i, 3e-4, stop_requested=False)

    return model, step


def _time_step(runner: _Runner, i: int, device: torch.device) -> None:
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    runner.step(i)
    _synchronize(device)
    runner.times.append(time.perf_counter() - start)
    if device.type == "cuda":
        runner.peak_step_bytes = max(runner.peak_step_bytes, torch.cuda.max_memory_allocated(device) - before)


def _timing(
    runner: _Runner, batch_size: int, block_size: int, device: torch.device, dtype: torch.dtype
) -> TrainTiming:
    ms = statistics.median(runner.times) * 1e3
    tokens_per_s = batch_size * block_size / (ms / 1e3)
    case = runner.case
    mem = (runner.resident_bytes + runner.peak_step_bytes) / 1e9 if device.type == "cuda" else None
    return TrainTiming(
        preset=case.preset,
        loss=case.loss,
        impl=case.impl,
        fused_linear=case.fused_linear,
        params_m=runner.model.num_params() / 1e6,
        ms_per_step=ms,
        tokens_per_s=tokens_per_s,
        mfu=mfu(runner.model.flops_per_token(block_size), tokens_per_s, peak_flops(device, dtype), 1),
        peak_mem_gb=mem,
    )


def cases_for(presets: list[str], losses: list[str], impls: list[str], fused_linear: bool) -> list[TrainCase]:
    """Every (preset, impl, loss) in that order; the ``nanogpt`` preset is one case (CE, torch)."""
    out = []
    for preset in presets:
        if preset == NANOGPT:
            out.append(TrainCase(preset, "ce", "torch"))
            continue
        out += [TrainCase(preset, loss, impl, fused_linear) for impl in impls for loss in losses]
    return out


def bench_train(
    presets: list[str],
    losses: list[str],
    impls: list[str],
    *,
    fused_linear: bool = False,
    progress: bool = True,
    steps: int,
    warmup: int,
    **kwargs: Any,
) -> list[TrainTiming]:
    """Time every case of `cases_for` in turn (``steps`` rounds of one step each, after
    ``warmup`` untimed ones); each row gets its ratio to the CE step of its (preset, impl)
    group and, when ``nanogpt`` is among the presets, its speed relative to that row."""
    cases = cases_for(presets, losses, impls, fused_linear)
    device = kwargs["device"]
    runners = []
    with tqdm(
        total=len(cases) * (1 + steps), desc="bench train", unit="step", disable=None if progress else True
    ) as bar:
        for case in cases:
            bar.set_postfix_str(f"build {case.preset} {case.loss} {case.impl}")
            runner = build_case(case, **kwargs)
            for i in range(warmup):
                runner.step(i)
            runners.append(runner)
            bar.update()
        bar.set_postfix_str("timing")
        for i in range(steps):
            for runner in runners:
                _time_step(runner, warmup + i, device)
                bar.update()
    rows = [_timing(r, kwargs["batch_size"], kwargs["block_size"], device, kwargs["dtype"]) for r in runners]
    reference = next((r for r in rows if r.preset == NANOGPT), None)
    for r in rows:
        ce = next((c for c in rows if c.loss == "ce" and (c.preset, c.impl) == (r.preset, r.impl)), None)
        r.ratio_to_ce = r.ms_per_step / ce.ms_per_step if ce else None
        r.speed_vs_nanogpt = r.tokens_per_s / reference.tokens_per_s if reference else None
    return rows


def format_table(rows: list[TrainTiming]) -> str:
    nano = any(r.speed_vs_nanogpt is not None for r in rows)
    head = f"{'preset':>8} {'loss':>6} {'impl':>9} {'fused':>5} {'ms/step':>9} {'tok/s':>10} {'MFU':>6} {'peak GB':>8} {'ms × CE':>7}"
    if nano:
        head += f" {'tok/s vs nanogpt':>16}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mfu = f"{100 * r.mfu:5.1f}%" if r.mfu is not None else "   n/a"
        mem = f"{r.peak_mem_gb:8.2f}" if r.peak_mem_gb is not None else "     n/a"
        ratio = f"{r.ratio_to_ce:7.3f}" if r.ratio_to_ce is not None else "    n/a"
        line = (
            f"{r.preset:>8} {r.loss:>6} {r.impl:>9} {r.fused_linear!s:>5} {r.ms_per_step:9.2f} "
            f"{r.tokens_per_s:10.0f} {mfu} {mem} {ratio}"
        )
        if nano:
            line += f" {r.speed_vs_nanogpt:16.3f}"
        lines.append(line)
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
    for preset in presets:
        if preset == NANOGPT:  # its own loss only: nothing to check
            continue
        overrides = {"vocab_size": vocab_size} if vocab_size is not None else {}
        vocab = model_config(preset, **overrides).vocab_size
        for loss in losses:
            for impl in impls:
                cfg = LossConfig(loss=loss, dpls_epsilon=epsilon, dpls_top_k=top_k, loss_impl=impl)
                logits = torch.zeros(1, vocab, device=device)
                build_objective(cfg)(logits, torch.zeros(1, dtype=torch.long, device=device), step=0)
