#!/usr/bin/env python3
"""Activation checkpointing: peak memory and step time of one training step per mode.

    python3 benchmarks/activation_checkpointing.py                    # CPU: small preset, T=1024, B=2
    python3 benchmarks/activation_checkpointing.py --steps 5 --threads 2   # step time on an idle machine
    python3 benchmarks/activation_checkpointing.py --device cuda --model 760m --block-size 2048 --batch-size 8

A training step is the model's forward, cross-entropy on its logits, the backward and an AdamW
update, on fixed random tokens (the same in every mode). Each mode's losses are compared with
``none``'s (bit for bit on CPU). Memory:

* CPU: each mode runs in a fresh process; ``peak`` is the process's peak resident memory over the
  measured steps (VmHWM, reset after the model and optimizer exist), ``base`` what it held before
  them (weights, AdamW state after a first step);
* CUDA: ``torch.cuda.max_memory_allocated`` over the measured steps, ``base`` the memory allocated
  before them.

Step time is the median over ``--steps`` measured steps, after one warm-up step; on a shared
machine it says nothing (memory does not depend on the load). Nothing needs installing: ``src/``
is put on the path. ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

MODES = ("none", "selective", "full")
GIB = 1 << 30


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs sets the peak resident memory (VmHWM) to the current one."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(mode: str, args: argparse.Namespace) -> dict:
    """One mode, in this process: base and peak memory (bytes), step times (s), losses."""
    from dpls.model import Transformer, model_config

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    cfg = model_config(args.model, vocab_size=args.vocab_size, block_size=args.block_size)
    with torch.device(device):
        model = Transformer(cfg)
    model.set_activation_checkpointing(mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size + 1), generator=gen)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> float:
        with autocast:
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    losses = [step()]  # warm-up: AdamW's moments exist from here on
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
    return {"mode": mode, "base": base, "peak": peak, "step_s": times, "losses": losses}


def _in_fresh_process(mode: str, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, __file__, *argv, "--worker", mode]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="small", help="a dpls preset (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="measured steps after one warm-up step")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return 0
    modes = args.modes.split(",")
    if args.device == "cpu":  # a fresh process per mode: peak RSS is a process-wide number
        keys = ("device", "model", "vocab_size", "block_size", "batch_size", "steps", "threads")
        argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys if getattr(args, k) is not None]
        results = [_in_fresh_process(mode, argv) for mode in modes]
    else:
        results = [measure(mode, args) for mode in modes]
        torch.cuda.empty_cache()
    ref = next((r for r in results if r["mode"] == "none"), results[0])
    print(
        f"{args.model}, T={args.block_size}, B={args.batch_size}, V={args.vocab_size}, {args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'mode':<10} {'base GiB':>9} {'peak GiB':>9} {'peak-base':>10} {'× none':>7} {'step s':>8} {'× none':>7}  losses"
    )
    for r in results:
        extra, ref_extra = r["peak"] - r["base"], ref["peak"] - ref["base"]
        step, ref_step = statistics.median(r["step_s"]), statistics.median(ref["step_s"])
        same = "same as none" if r["losses"] == ref["losses"] else f"differ: {r['losses']} vs {ref['losses']}"
        print(
            f"{r['mode']:<10} {r['base'] / GIB:9.2f} {r['peak'] / GIB:9.2f} {extra / GIB:10.2f} "
            f"{extra / ref_extra:7.2f} {step:8.2f} {step / ref_step:7.2f}  {same}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
