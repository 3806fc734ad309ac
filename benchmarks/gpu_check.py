#!/usr/bin/env python3
"""One-call GPU check of the fused DPLS kernels: correctness at full size, then timings.

    python3 benchmarks/gpu_check.py            # on a CUDA machine, from the repository root (< 5 min)
    python3 benchmarks/gpu_check.py --sweep    # also the launch-shape sweep (block_v, num_warps, ...)
    python3 benchmarks/gpu_check.py --smoke    # tiny sizes; also runs on a CPU (Triton interpreter)
    python3 benchmarks/gpu_check.py --resources  # no GPU needed: registers / spills of each launch
    python3 benchmarks/gpu_check.py --activation-checkpointing --skip-checks --skip-timings   # AC only

Nothing needs installing: ``src/`` is put on the path. Liger-Kernel and cut-cross-entropy are
timed when they import; if not, wheels found in ``.whl/`` (or ``$DPLS_WHEELS``) are installed with
``pip --no-deps`` into a temporary folder first. With ``$OUT`` set, the full results go to
``$OUT/gpu_check.json`` and the printed tables to ``$OUT/gpu_check.txt``. Timing stops starting new
variants after ``$GPU_CHECK_BUDGET_S`` seconds (default 230, so that a plain run ends within 5
minutes). Exit status 1 when a correctness check fails.

1. *Ceilings*: device-to-device copy bandwidth and a bf16 matmul rate, measured here.
2. *Correctness* against a float64 reference computed on the GPU in row chunks (ties broken by
   lowest index, as the kernel does): N=32768 × V=50304 bf16 (k = 100 and 1024), V = 256k, fp32,
   fp16, per-token ε, heavy ties, −inf logits (a padded vocabulary, a masked first block), the
   adaptive ε computed in the kernel, the fallback paths, a run twice for bitwise determinism, and
   the fused linear loss against the dense one.
3. *Timings* (median of CUDA-event timed steps, forward + backward) and peak extra memory of every
   contender of ``dpls.bench.contenders_gpu``, as ratios to ``F.cross_entropy`` of the same run, then
   the issue-18 targets as ratios to Liger's kernels of the same run.
4. *Sweep* (``--sweep``) of the kernel's launch shape (block, warps, the two-launch split, the
   selection launch's warps, scratch cap, programs per SM).
5. *Activation checkpointing* (``--activation-checkpointing``): peak memory and median step time
   of a 760m training step (T = 2048, B = 4, bf16 autocast, AdamW) with ``none``, ``selective`` and
   ``full``, and whether the losses equal ``none``'s (`benchmarks/activation_checkpointing.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SMOKE = "--smoke" in sys.argv
if SMOKE and not __import__("torch").cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LINES: list[str] = []
T_START = time.time()
BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", 230))  # stop timing new variants past this


def over_budget() -> bool:
    return time.time() - T_START > BUDGET_S


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def install_wheels() -> None:
    """Make liger_kernel / cut_cross_entropy importable from carried wheels (no network needed)."""
    missing = [m for m in ("liger_kernel", "cut_cross_entropy") if importlib.util.find_spec(m) is None]
    folder = Path(os.environ.get("DPLS_WHEELS", ROOT / ".whl"))
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not missing or not wheels:
        return
    target = Path(tempfile.mkdtemp(prefix="dpls-bench-wheels-"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target)]
    result = subprocess.run([*cmd, *map(str, wheels)], capture_output=True, text=True)
    if result.returncode == 0:
        sys.path.append(str(target))
        importlib.invalidate_caches()
    else:
        say(f"(could not install carried wheels: {result.stderr.strip()[-300:]})")


# --- timing ------------------------------------------------------------------------------------


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, *, reps: int, warmup: int = 2, setup=None) -> list[float]:
    """Per-call milliseconds of ``fn`` (``setup`` runs before each call, untimed on the GPU)."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    sync()
    out = []
    for _ in range(reps):
        if setup:
            setup()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def peak_extra_gb(fn, setup=None) -> float | None:
    """Peak memory of one call of ``fn`` above what was allocated before it, in GB."""
    if not torch.cuda.is_available():
        return None
    if setup:
        setup()
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 1e9


def ceilings(dev: torch.device) -> dict:
    """The two numbers of the method: copy bandwidth (bytes read + written) and a bf16 matmul rate."""
    n = (1 << 30) if not SMOKE else (1 << 16)
    a = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    b = torch.empty_like(a)
    ms = statistics.median(time_ms(lambda: b.copy_(a), reps=10))
    m = 8192 if not SMOKE else 64
    x = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    mm_ms = statistics.median(time_ms(lambda: x @ y, reps=10))
    return {"copy_GBps": 2 * 4 * n / ms / 1e6, "bf16_matmul_TFLOPs": 2 * m**3 / mm_ms / 1e9}


# --- float64 reference, chunked on the device --------------------------------------------------


def reference_rows(logits, target, eps, k, on_grad=None, *, chunk=1024):
    """Per-row loss and NLL in float64; ``on_grad(start, grad_rows)`` receives the unscaled gradient.

    Rows are processed in chunks on the logits' device, so full-size references fit in memory.
    """
    losses, nlls = [], []
    for s in range(0, logits.shape[0], chunk):
        z = logits[s : s + chunk].double()
        y = target[s : s + chunk]
        valid = y != -100
        ys = torch.where(valid, y, 0)
        e = eps[s : s + chunk].double() if isinstance(eps, torch.Tensor) else torch.full_like(z[:, 0], eps)
        lse = torch.logsumexp(z, 1)
        zy = z.gather(1, ys[:, None])[:, 0]
        order = torch.sort(-z, dim=1, stable=True).indices[:, :k]  # ties: lowest index first
        top = z.gather(1, order).sum(1)
        losses.append(torch.where(valid, lse - (1 - e) * zy - e / k * top, 0.0))
        nlls.append(torch.where(valid, lse - zy, 0.0))
        if on_grad is not None:
            g = torch.softmax(z, 1)
            g.scatter_add_(1, order, (-e / k)[:, None].expand(-1, order.shape[1]).contiguous())
            g.scatter_add_(1, ys[:, None], -(1 - e)[:, None])
            on_grad(s, g * valid[:, None])
    return torch.cat(losses), torch.cat(nlls)


@dataclass
class Check:
    name: str
    n: int
    v: int
    dtype: str
    k: int
    passed: bool = False
    loss_err: float = float("nan")
    nll_err: float = float("nan")
    grad_err: float = float("nan")
    note: str = ""
    extra: dict = field(default_factory=dict)


def make_logits(n, v, dtype, dev, kind="gauss", seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    z = torch.randn(n, v, generator=g, device=dev) * 3
    if kind == "ties":  # few distinct values: the threshold is tied in most rows
        z = torch.round(z)
    if kind == "masked":  # a padded vocabulary (last 47 entries), and a masked first block every 4th row
        z[:, v - 47 :] = -float("inf")
        z[::4, : min(2048, v // 4)] = -float("inf")
    return z.to(dtype)


def _check_once(c, n, v, dtype, k, dev, eps, kind, config, inplace, reduction):
    from dpls.losses.triton_impl import triton_dpls_loss

    z = make_logits(n, v, dtype, dev, kind)
    if kind == "masked":  # targets on entries that are finite in every row
        y = torch.randint(min(2048, v // 4), v - 47, (n,), device=dev)
    else:
        y = torch.randint(0, v, (n,), device=dev)
    y[torch.rand(n, device=dev) < 0.1] = -100
    if eps == "per_token":
        eps = torch.rand(n, device=dev) * 0.5
    x = z.clone().requires_grad_(True)
    loss, nll = triton_dpls_loss(x, y, eps, k, -100, "none", True, inplace, config=config)
    loss.backward(torch.ones_like(loss))
    grad = x.grad
    half = dtype in (torch.bfloat16, torch.float16)
    g_tol = 4 * torch.finfo(dtype).eps if half else 1e-5
    worst = [0.0]

    def compare(s, g_ref):
        err = (grad[s : s + g_ref.shape[0]].double() - g_ref).abs().max().item()
        worst[0] = max(worst[0], err / max(g_ref.abs().max().item(), 1e-12))

    ref_loss, ref_nll = reference_rows(z, y, eps, k, compare)
    c.loss_err = ((loss.double() - ref_loss).abs() / ref_loss.abs().clamp(min=1)).max().item()
    c.nll_err = ((nll.double() - ref_nll).abs() / ref_nll.abs().clamp(min=1)).max().item()
    c.grad_err = worst[0]
    # the reduced loss through autograd, its scaled gradient included
    x2 = z.clone().requires_grad_(True)
    reduced = triton_dpls_loss(x2, y, eps, k, -100, reduction, False, inplace, config=config)
    reduced.backward()
    n_valid = max(int((y != -100).sum()), 1)
    scale = 1 / n_valid if reduction == "mean" else 1.0
    ref_reduced = ref_loss.sum().item() * scale
    c.extra["reduced_err"] = abs(reduced.item() - ref_reduced) / max(abs(ref_reduced), 1)
    g_max = grad.double().abs().max().item() * scale
    c.extra["reduced_grad_err"] = (x2.grad.double() - grad.double() * scale).abs().max().item() / max(
        g_max, 1e-12
    )
    c.passed = (
        c.loss_err < 2e-5
        and c.nll_err < 2e-5
        and c.grad_err <= g_tol
        and c.extra["reduced_err"] < 2e-5
        and c.extra["reduced_grad_err"] <= 2 * g_tol
        and bool(torch.isfinite(loss).all())
    )


def run_check(
    name, n, v, dtype, k, dev, *, eps=0.1, kind="gauss", config=None, inplace=True, reduction="mean"
):
    c = Check(name, n, v, str(dtype).replace("torch.", ""), k)
    try:
        _check_once(c, n, v, dtype, k, dev, eps, kind, config, inplace, reduction)
    except Exception as err:  # report and go on: one broken case must not hide the others
        c.note = f"{type(err).__name__}: {err}"[:300]
        traceback.print_exc()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return c


def determinism_check(n, v, dev) -> Check:
    from dpls.losses.triton_impl import triton_dpls_loss

    c = Check("bitwise determinism (two runs)", n, v, "bfloat16", 100)
    z = make_logits(n, v, torch.bfloat16, dev, seed=3)
    y = torch.randint(0, v, (n,), device=dev)
    outs = []
    for _ in range(2):
        x = z.clone().requires_grad_(True)
        loss = triton_dpls_loss(x, y, 0.1, 100, -100, "none", False, True)
        loss.backward(torch.ones_like(loss))
        outs.append((loss.detach().clone(), x.grad.clone()))
    c.passed = torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    c.note = "" if c.passed else "outputs differ between two runs: a race?"
    return c


def adaptive_check(n, v, dtype, dev, mode) -> Check:
    """ε_i computed inside the kernel against float64 statistics, and the loss with those ε_i."""
    from dpls.losses.triton_impl import triton_adaptive_dpls_loss

    c = Check(f"adaptive eps in kernel ({mode}, gamma=1.5)", n, v, str(dtype).replace("torch.", ""), 100)
    z = make_logits(n, v, dtype, dev, seed=11)
    z[: n // 2] *= 3  # confident rows too
    y = torch.randint(0, v, (n,), device=dev)
    y[::10] = -100
    x = z.clone().requires_grad_(True)
    loss, _, eps = triton_adaptive_dpls_loss(
        x, y, epsilon=0.2, epsilon_mode=mode, gamma=1.5, top_k=100, reduction="none", inplace_backward=True
    )
    loss.backward(torch.ones_like(loss))
    zd = z.double()
    lse = torch.logsumexp(zd, 1)
    if mode == "confidence":
        stat = -torch.expm1(zd.amax(1) - lse)
    else:
        p = torch.softmax(zd, 1)
        stat = (lse - (p * zd).sum(1)) / math.log(v)
    want = torch.where(y != -100, 0.2 * stat.clamp(0, 1) ** 1.5, 0.0)
    c.extra["eps_err"] = ((eps.double() - want).abs() / want.abs().clamp(min=1e-3)).max().item()
    worst = [0.0]

    def compare(s, g_ref):
        err = (x.grad[s : s + g_ref.shape[0]].double() - g_ref).abs().max().item()
        worst[0] = max(worst[0], err / max(g_ref.abs().max().item(), 1e-12))

    ref_loss, _ = reference_rows(z, y, want, 100, compare)
    c.loss_err = ((loss.double() - ref_loss).abs() / ref_loss.abs().clamp(min=1)).max().item()
    c.grad_err = worst[0]
    g_tol = 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 1e-5
    c.passed = c.extra["eps_err"] < 1e-4 and c.loss_err < 2e-5 and c.grad_err <= g_tol
    return c


def linear_check(n, h, v, dtype, dev, *, chunk) -> Check:
    from dpls.losses.triton_linear import triton_dpls_linear_loss

    c = Check(f"fused linear vs dense (chunk {chunk})", n, v, str(dtype).replace("torch.", ""), 100)
    g = torch.Generator(device=dev).manual_seed(5)
    hid = torch.randn(n, h, generator=g, device=dev).to(dtype)
    w = (torch.randn(v, h, generator=g, device=dev) / h**0.5).to(dtype)
    y = torch.randint(0, v, (n,), device=dev)
    hl, wl = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = triton_dpls_linear_loss(hl, wl, None, y, 0.1, 100, -100, "mean", False, chunk)
    loss.backward()
    hd, wd = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logits = (hd @ wd.t()).float()  # dense path with float32 loss arithmetic
    from dpls.losses import dpls_loss

    ref = dpls_loss(logits, y, epsilon=0.1, top_k=100, impl="chunked")
    ref.backward()
    c.loss_err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1)
    c.extra["grad_hidden_err"] = ((hl.grad.float() - hd.grad.float()).norm() / hd.grad.float().norm()).item()
    c.extra["grad_weight_err"] = ((wl.grad.float() - wd.grad.float()).norm() / wd.grad.float().norm()).item()
    tol = 1e-2 if dtype != torch.float32 else 1e-4
    c.grad_err = max(c.extra["grad_hidden_err"], c.extra["grad_weight_err"])
    c.passed = c.loss_err < tol and c.grad_err < 3 * tol
    return c


# --- timings -----------------------------------------------------------------------------------


@dataclass
class Timing:
    table: str
    name: str
    objective: str
    ms: float
    net_ms: float
    spread_ms: float
    peak_extra_gb: float | None
    ratio: float | None = None
    note: str = ""


def time_contenders(problem, family: str, dev, reps: int) -> list[Timing]:
    from dpls.bench.contenders_gpu import gpu_contenders

    n, v = problem.n, problem.v
    label = f"{family} N={n} V={v} {str(problem.dtype).replace('torch.', '')} k={problem.top_k}"
    if family == "linear":
        label += f" H={problem.hidden}"
    g = torch.Generator(device=dev).manual_seed(7)
    target = torch.randint(0, v, (n,), device=dev, generator=g)
    rows: list[Timing] = []
    if family == "logits":
        base = (torch.randn(n, v, generator=g, device=dev) * 3).to(problem.dtype)
        leaf = base.clone().requires_grad_(True)

        def refresh():  # in-place contenders overwrite the logits: every step starts from the same ones
            with torch.no_grad():
                leaf.copy_(base)
            leaf.grad = None

        copy_ms = statistics.median(time_ms(refresh, reps=reps))
        inputs = {"logits": leaf, "target": target}
    else:
        hid = torch.randn(n, problem.hidden, generator=g, device=dev).to(problem.dtype).requires_grad_(True)
        w = (torch.randn(v, problem.hidden, generator=g, device=dev) / problem.hidden**0.5).to(problem.dtype)
        w.requires_grad_(True)

        def refresh():
            hid.grad = None
            w.grad = None

        copy_ms = 0.0
        inputs = {"hidden": hid, "weight": w, "target": target}
    for c in gpu_contenders(family, dev):
        if over_budget():
            rows.append(Timing(label, c.name, c.objective, float("nan"), float("nan"), 0.0, None,
                               note="skipped: time budget"))  # fmt: skip
            continue
        try:
            step = c.make(problem)
            times = time_ms(lambda step=step: step(inputs), reps=reps, setup=refresh)
            med = statistics.median(times)
            spread = (max(times) - min(times)) if len(times) > 1 else 0.0
            peak = peak_extra_gb(lambda step=step: step(inputs), setup=refresh)
            rows.append(Timing(label, c.name, c.objective, med, med - (copy_ms if family == "logits" else 0),
                               spread, peak))  # fmt: skip
        except Exception as err:
            rows.append(Timing(label, c.name, c.objective, float("nan"), float("nan"), 0.0, None,
                               note=f"{type(err).__name__}: {err}"[:200]))  # fmt: skip
        refresh()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base_name = "torch CE" if family == "logits" else "torch dense CE"
    ref = next((r.net_ms for r in rows if r.name == base_name), None)
    for r in rows:
        r.ratio = r.net_ms / ref if ref and ref > 0 else None
    if family == "logits":
        rows.append(Timing(label, "(refresh copy, subtracted above)", "-", copy_ms, copy_ms, 0.0, None))
    return rows


def forward_only(problem, dev, reps) -> list[Timing]:
    """Evaluation cost: loss only (no gradient), ours against F.cross_entropy."""
    from dpls.losses.triton_impl import triton_dpls_loss

    g = torch.Generator(device=dev).manual_seed(8)
    z = (torch.randn(problem.n, problem.v, generator=g, device=dev) * 3).to(problem.dtype)
    y = torch.randint(0, problem.v, (problem.n,), device=dev, generator=g)
    label = f"forward only N={problem.n} V={problem.v} k={problem.top_k}"
    cases = {
        "torch CE": lambda: F.cross_entropy(z, y),
        "triton DPLS (+nll)": lambda: triton_dpls_loss(
            z, y, problem.epsilon, problem.top_k, -100, "mean", True, False
        ),
        "triton CE": lambda: triton_dpls_loss(z, y, 0.0, problem.top_k, -100, "mean", False, False),
    }
    rows = []
    with torch.no_grad():
        for name, fn in cases.items():
            t = time_ms(fn, reps=reps)
            rows.append(
                Timing(label, name, "-", statistics.median(t), statistics.median(t), max(t) - min(t), None)
            )
    for r in rows:
        r.ratio = r.ms / rows[0].ms
    return rows


def sweep(problem, dev, reps, variants) -> list[Timing]:
    """Our in-place DPLS under several launch shapes (copy of the logits subtracted)."""
    from dpls.losses.triton_impl import choose_config, triton_dpls_loss

    g = torch.Generator(device=dev).manual_seed(9)
    base = (torch.randn(problem.n, problem.v, generator=g, device=dev) * 3).to(problem.dtype)
    y = torch.randint(0, problem.v, (problem.n,), device=dev, generator=g)
    leaf = base.clone().requires_grad_(True)

    def refresh():
        with torch.no_grad():
            leaf.copy_(base)
        leaf.grad = None

    copy_ms = statistics.median(time_ms(refresh, reps=reps))
    default = choose_config(problem.v, problem.dtype, dev, problem.top_k)
    label = f"sweep N={problem.n} V={problem.v} k={problem.top_k} (default {asdict(default)})"
    rows = []
    for changes in variants:
        cfg = replace(default, **changes)
        name = ", ".join(f"{k}={v}" for k, v in changes.items()) or "default"
        if over_budget():
            rows.append(
                Timing(
                    label, name, "dpls", float("nan"), float("nan"), 0.0, None, note="skipped: time budget"
                )
            )
            continue

        def step(cfg=cfg):
            triton_dpls_loss(
                leaf, y, problem.epsilon, problem.top_k, -100, "mean", False, True, config=cfg
            ).backward()

        try:
            t = time_ms(step, reps=reps, setup=refresh)
            med = statistics.median(t)
            rows.append(Timing(label, name, "dpls", med, med - copy_ms, max(t) - min(t), None))
        except Exception as err:
            rows.append(Timing(label, name, "dpls", float("nan"), float("nan"), 0.0, None,
                               note=f"{type(err).__name__}: {err}"[:200]))  # fmt: skip
    best = min((r.net_ms for r in rows if r.net_ms == r.net_ms), default=None)
    for r in rows:
        r.ratio = r.net_ms / best if best else None
    return rows


def targets(rows: list[Timing]) -> dict:
    """Issue 18's targets as ratios within this run: ours over Liger's kernels on the same inputs."""

    def net(table_start: str, name: str) -> Timing | None:
        return next((r for r in rows if r.table.startswith(table_start) and r.name == name), None)

    out: dict = {}
    say("\nissue 18 targets (ratios of net ms within this run)")
    for label, table_start, ours, theirs, limit in [
        ("DPLS in-place k=100 / Liger CE", "logits N=32768 V=50304 bfloat16 k=100", "triton DPLS in-place",
         "liger CE", 1.2),
        ("DPLS in-place k=1024 / Liger CE", "logits N=32768 V=50304 bfloat16 k=1024", "triton DPLS in-place",
         "liger CE", 1.5),
        ("our CE / Liger CE", "logits N=32768 V=50304 bfloat16 k=100", "triton CE in-place", "liger CE", 1.0),
        ("conf-eps in-kernel / unfused", "logits N=32768 V=50304 bfloat16 k=100",
         "triton DPLS conf-eps in-kernel", "triton DPLS conf-eps unfused", 1.0),
        ("fused-linear DPLS / Liger FLCE", "linear N=32768", "triton fused-linear DPLS", "liger fused-linear CE",
         1.05),
    ]:  # fmt: skip
        a, b = net(table_start, ours), net(table_start, theirs)
        if a is None or b is None or not (a.net_ms > 0 and b.net_ms > 0):
            say(f"  {label:<36} -  (not timed in this run)")
            continue
        ratio = a.net_ms / b.net_ms
        out[label] = {"ratio": ratio, "ours_ms": a.net_ms, "theirs_ms": b.net_ms, "target": limit}
        say(f"  {label:<36} {ratio:6.2f}  (target <= {limit}; {a.net_ms:.2f} / {b.net_ms:.2f} ms)")
    mem = net("linear N=32768", "triton fused-linear DPLS")
    if mem is not None and mem.peak_extra_gb is not None:
        out["fused-linear DPLS peak GB"] = mem.peak_extra_gb
        say(f"  {'fused-linear DPLS peak extra GB':<36} {mem.peak_extra_gb:6.2f}  (target <= 0.3)")
    return out


def resources() -> int:
    """Registers, stack and spills of each launch of the row kernel, from sm_90 cubins compiled here.

    Needs no GPU (Triton compiles for a named target; its own ``cuobjdump`` reads the cubin).
    Occupancy follows: 65536 registers per multiprocessor / (registers × 32 × warps).
    """
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dpls.losses import _triton_kernels as kern

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    ptr = {"fp32": "*fp32", "bf16": "*bf16"}
    say(f"{'launch':<44} {'regs':>5} {'stack':>6} {'programs/SM':>12}")
    for dtype, phase, warps, block, top_r in [
        ("bf16", 0, 8, 2048, 4), ("bf16", 1, 8, 2048, 4), ("bf16", 1, 16, 2048, 4), ("bf16", 2, 8, 2048, 1),
        ("fp32", 1, 16, 2048, 4), ("fp32", 2, 8, 2048, 1), ("bf16", 1, 4, 1024, 4), ("bf16", 2, 4, 1024, 1),
    ]:  # fmt: skip
        types = {"x_ptr": ptr[dtype], "g_ptr": ptr[dtype], "scratch_ptr": ptr[dtype], "target_ptr": "*i64",
                 "stat_i_ptr": "*i32", "x_stride": "i64", "g_stride": "i64", "eps_value": "fp32", "gamma": "fp32"}  # fmt: skip
        consts = {"KEY_BITS": 16 if dtype == "bf16" else 32, "BLOCK_V": block, "CAP": 0 if phase == 2 else 2 * block,
                  "TOP_R": top_r, "TOPK_MODE": 1, "EPS_PER_ROW": False, "EPS_MODE": 0,
                  "WRITE_GRAD": phase != 1, "SCALE_MODE": 0, "PHASE": phase}  # fmt: skip
        names = kern._dpls_rows_kernel.arg_names
        sig = {
            n: "constexpr" if n in consts else types.get(n, "*fp32" if n.endswith("_ptr") else "i32")
            for n in names
        }
        src = ASTSource(fn=kern._dpls_rows_kernel, signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            report = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", report)
        regs, stack = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        per_sm = 65536 // (max(8, -(-regs // 8) * 8) * 32 * warps) if regs else 0
        say(
            f"  {dtype} phase {phase} block {block:<5} warps {warps:<3} top_r {top_r:<2}    {regs:>5} {stack:>6} {per_sm:>12}"
        )
    return 0


def activation_checkpointing(dev: torch.device) -> list[dict]:
    """Peak memory above the weights and AdamW state, and step time, per activation_checkpointing mode."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from activation_checkpointing import MODES, measure

    shape = dict(model="760m", vocab_size=50304, block_size=2048, batch_size=4, steps=5)
    if SMOKE:
        shape = dict(model="tiny", vocab_size=300, block_size=64, batch_size=2, steps=1)
    rows = []
    say(f"\nactivation checkpointing: {shape}")
    for mode in MODES:
        r = measure(mode, SimpleNamespace(device=str(dev), **shape))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        r.update(extra_gb=(r["peak"] - r["base"]) / 1e9, median_step_ms=1e3 * statistics.median(r["step_s"]))
        r["losses_as_none"] = r["losses"] == rows[0]["losses"] if rows else True
        rows.append(r)
        say(f"  {mode:<10} peak above weights+AdamW {r['extra_gb']:7.2f} GB ({r['extra_gb'] / max(rows[0]['extra_gb'], 1e-9):.2f}× none)  "
            f"step {r['median_step_ms']:9.1f} ms ({r['median_step_ms'] / rows[0]['median_step_ms']:.2f}× none)  "
            f"losses {'= none' if r['losses_as_none'] else 'differ: ' + str(r['losses'])}")  # fmt: skip
    return rows


def table(rows: list[Timing]) -> None:
    current = None
    for r in rows:
        if r.table != current:
            current = r.table
            say(f"\n{current}")
            say(
                f"  {'contender':<36} {'obj':<5} {'ms':>9} {'net ms':>9} {'spread':>7} {'ratio':>7} {'peak GB':>8}"
            )
        ratio = f"{r.ratio:7.2f}" if r.ratio is not None else "      -"
        peak = f"{r.peak_extra_gb:8.2f}" if r.peak_extra_gb is not None else "       -"
        say(
            f"  {r.name:<36} {r.objective:<5} {r.ms:9.3f} {r.net_ms:9.3f} {r.spread_ms:7.3f} {ratio} {peak} {r.note}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script itself)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-timings", action="store_true")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--sweep", action="store_true", help="also time the launch-shape sweep")
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="also measure activation checkpointing (760m, T=2048, B=4): peak memory and step time",
    )
    parser.add_argument(
        "--resources",
        action="store_true",
        help="only print each launch's registers and spills (no GPU needed)",
    )
    args = parser.parse_args()
    if args.resources:
        return resources()
    install_wheels()
    import triton

    from dpls.bench.contenders_gpu import LossProblem

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = {"torch": torch.__version__, "triton": triton.__version__, "device": str(dev)}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(name=p.name, sms=p.multi_processor_count, l2_mb=getattr(p, "L2_cache_size", 0) / 2**20)
    for pkg in ("liger_kernel", "cut_cross_entropy"):
        env[pkg] = importlib.util.find_spec(pkg) is not None
    say(f"env: {env}")
    results: dict = {"env": env}
    results["ceilings"] = ceilings(dev)
    say(f"ceilings: {results['ceilings']}")

    big = not SMOKE
    N, V, BIGV = (32768, 50304, 262144) if big else (16, 300, 1000)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    checks: list[Check] = []
    if not args.skip_checks:
        small_cfg = None
        if SMOKE:
            from dpls.losses.triton_impl import KernelConfig

            small_cfg = KernelConfig(block_v=64, num_warps=1, programs=2, cap=128)
        cases = [
            ("bf16 k=100 in-place, mean", N, V, bf16, 100, {}),
            ("bf16 k=1024 in-place, sum", N, V, bf16, 1024, {"reduction": "sum"}),
            ("bf16 V=256k k=100", N // 8, BIGV, bf16, 100, {}),
            ("bf16 V=256k k=1024", N // 8, BIGV, bf16, 1024, {}),
            ("fp32 k=100 not in-place", N // 4, V, fp32, 100, {"inplace": False}),
            ("fp16 k=100", N // 4, V, fp16, 100, {}),
            ("bf16 per-token eps", N // 4, V, bf16, 100, {"eps": "per_token"}),
            ("bf16 heavy ties (rounded logits)", N // 4, V, bf16, 100, {"kind": "ties"}),
            ("fp32 heavy ties", N // 8, V, fp32, 1000, {"kind": "ties"}),
            ("k = V (label smoothing)", N // 8, V, bf16, V, {}),
            ("eps = 0 (cross-entropy)", N // 8, V, bf16, 100, {"eps": 0.0}),
            ("-inf: padded vocab, masked first blocks", N // 8, V, bf16, 100, {"kind": "masked"}),
            ("-inf, fp32, k=1024", N // 16, V, fp32, min(1024, V // 2), {"kind": "masked"}),
        ]
        if big:
            from dpls.losses.triton_impl import KernelConfig

            cases += [
                ("fallback: shallow lanes, scratch", N // 16, V, bf16, 100,
                 {"config": KernelConfig(top_r=1)}),
                ("fallback: shallow lanes, cap=0 (count over the row)", N // 16, V, bf16, 100,
                 {"config": KernelConfig(top_r=2, cap=0)}),
                ("k=1000 on 512 lanes (block 512)", N // 16, V, bf16, 1000,
                 {"config": KernelConfig(block_v=512, num_warps=4, cap=1024)}),
                ("block 1024, 4 warps", N // 8, V, fp32, 100, {"config": KernelConfig(block_v=1024, num_warps=4)}),
                ("block 4096, 16 warps", N // 8, V, bf16, 100,
                 {"config": KernelConfig(block_v=4096, num_warps=16, cap=8192)}),
            ]  # fmt: skip
        for name, n, v, dtype, k, kw in cases:
            if small_cfg is not None:
                kw = {"config": small_cfg, **kw}
            t0 = time.time()
            c = run_check(name, n, v, dtype, min(k, v), dev, **kw)
            c.extra["seconds"] = round(time.time() - t0, 2)
            checks.append(c)
            say(f"check {'PASS' if c.passed else 'FAIL'} {name}: loss {c.loss_err:.2e} nll {c.nll_err:.2e} "
                f"grad {c.grad_err:.2e} {c.extra} {c.note}")  # fmt: skip
        for mode in ("confidence", "entropy"):
            c = adaptive_check(N // 8 if big else 16, V, bf16, dev, mode)
            checks.append(c)
            say(f"check {'PASS' if c.passed else 'FAIL'} {c.name}: loss {c.loss_err:.2e} grad {c.grad_err:.2e} "
                f"{c.extra}")  # fmt: skip
        if big:
            checks.append(determinism_check(N // 4, V, dev))
            say(f"check {'PASS' if checks[-1].passed else 'FAIL'} {checks[-1].name} {checks[-1].note}")
        for dtype in (fp32, bf16):
            c = linear_check(
                4096 if big else 16, 1024 if big else 16, V, dtype, dev, chunk=1024 if big else 4
            )
            checks.append(c)
            say(f"check {'PASS' if c.passed else 'FAIL'} {c.name} {c.dtype}: loss {c.loss_err:.2e} {c.extra}")
    results["checks"] = [asdict(c) for c in checks]

    timings: list[Timing] = []
    if not args.skip_timings:
        reps = args.reps if big else 2
        problems = [
            ("logits", LossProblem(N, V, bf16, 0.1, 100)),
            ("logits", LossProblem(N, V, bf16, 0.1, min(1024, V))),
            ("logits", LossProblem(N // 8, BIGV, bf16, 0.1, 100)),
            ("logits", LossProblem(N // 4, V, fp32, 0.1, 100)),
            ("linear", LossProblem(N, V, bf16, 0.1, 100, hidden=1024 if big else 16)),
        ]
        for family, problem in problems:
            timings += time_contenders(problem, family, dev, reps)
        timings += forward_only(LossProblem(N, V, bf16, 0.1, 100), dev, reps)
        if dev.type == "cuda" and args.sweep:
            variants = [
                {},
                {"split": False},  # one launch: the selection's registers for the final pass too
                {"select_warps": 8},
                {"split": False, "block_v": 1024, "num_warps": 4},
                {"block_v": 1024, "num_warps": 4},
                {"block_v": 1024, "num_warps": 8},
                {"block_v": 2048, "num_warps": 4},
                {"block_v": 2048, "num_warps": 16},
                {"block_v": 4096, "num_warps": 8, "cap": 8192},
                {"block_v": 4096, "num_warps": 16, "cap": 8192},
                {"programs_per_sm": 1},
                {"programs_per_sm": 2},
                {"programs_per_sm": 8},
                {"programs": 1 << 30},  # one program per row
                {"num_stages": 1},
                {"num_stages": 3},
                {"top_r": 2},  # shallow lanes: most rows take the fallback (compaction + bisection)
                {"top_r": 3},
                {"top_r": 6},
                {"cap": 0, "top_r": 2},  # fallback counting over the row itself
            ]
            timings += sweep(LossProblem(N, V, bf16, 0.1, 100), dev, reps, variants)
            timings += sweep(LossProblem(N // 8, BIGV, bf16, 0.1, 1024), dev, reps, variants[:7])
            timings += sweep(LossProblem(N // 4, V, fp32, 0.1, 100), dev, reps, variants[:7])
        table(timings)
        results["targets"] = targets(timings)
    results["timings"] = [asdict(t) for t in timings]
    if args.activation_checkpointing:
        results["activation_checkpointing"] = activation_checkpointing(dev)
    failed = [c.name for c in checks if not c.passed]
    say(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed {failed if failed else ''}; "
        f"total {time.time() - T_START:.0f} s")  # fmt: skip
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        Path(out, "gpu_check.txt").write_text("\n".join(LINES) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
