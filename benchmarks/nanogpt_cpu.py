"""`dpls train` against nanoGPT's own train.py at nanoGPT's README CPU shape, in one sitting.

    python benchmarks/nanogpt_cpu.py --nanogpt PATH --data DIR [--iters 60] [--repeats 2] [--threads 1]

PATH is a checkout of karpathy/nanoGPT (not part of this project, never copied into it); DIR a
`dpls prepare` data directory (its vocabulary sets V; the README comparison uses 8192). Both
programs train on the same tokens: DIR's training shards are written out in nanoGPT's format
(raw uint16 ``train.bin``, ``val.bin``, ``meta.pkl`` with the vocabulary size) in a scratch
directory that nanoGPT runs from. The shape is the README's CPU command: 4 layers, 4 heads,
width 128, block 64, batch 12, no dropout, no compile, float32, log every step.

Runs alternate (nanoGPT, CE, DPLS, nanoGPT, ...) so that a change of load hits all of them.
Each run's rate is the median over its steps after the first ``--skip`` of the wall time between
two consecutive logged steps (nanoGPT's own ``time`` per iteration; our rows' ``elapsed_s``):
everything the loop does per step, logging included.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}


def nanogpt_dataset(data: Path, dest: Path) -> int:
    """DIR's shards as nanoGPT's ``train.bin`` / ``val.bin`` / ``meta.pkl``; returns V."""
    from dpls.data.meta import DataMeta
    from dpls.data.shards import read_shard

    meta = DataMeta.load(data)
    dest.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        tokens = np.concatenate([read_shard(data / name) for name in meta.shards(split)])
        tokens.astype(np.uint16).tofile(dest / f"{split}.bin")
    with open(dest / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": meta.vocab_size}, f)
    return meta.vocab_size


def run_nanogpt(checkout: Path, work: Path, iters: int, env: dict[str, str]) -> list[float]:
    """Seconds per iteration as nanoGPT's train.py prints them."""
    if not (work / "configurator.py").exists():  # train.py reads it from its working directory
        (work / "configurator.py").symlink_to(checkout / "configurator.py")
    args = [f"--{k}={v}" for k, v in SHAPE.items()]
    cmd = [
        sys.executable,
        str(checkout / "train.py"),
        str(checkout / "config" / "train_shakespeare_char.py"),
        "--dataset=dpls",
        "--device=cpu",
        "--compile=False",
        "--eval_iters=20",
        "--eval_interval=100000",
        "--log_interval=1",
        f"--max_iters={iters}",
        "--lr_decay_iters=2000",
        "--dropout=0.0",
        f"--out_dir={work / 'out-nanogpt'}",
        *args,
    ]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=True).stdout
    return [float(ms) / 1e3 for ms in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", out, re.M)]


def run_dpls(data: Path, work: Path, loss: str, iters: int, env: dict[str, str]) -> list[float]:
    """Seconds between consecutive logged steps of ``dpls train`` (every step is logged)."""
    out_dir = work / f"dpls-{loss}"
    shutil.rmtree(out_dir, ignore_errors=True)
    keys = {
        **SHAPE,
        "model": "tiny",
        "loss": loss,
        "data_dir": data,
        "out_dir": out_dir,
        "gradient_accumulation_steps": 1,
        "max_iters": iters,
        "lr_decay_iters": 2000,
        "log_interval": 1,
        "eval_interval": 100000,
        "eval_tokens": 20 * 12 * 64,
        "checkpoint_interval": 100000,
        "device": "cpu",
        "dtype": "float32",
        "compile": "false",
        "progress": "false",
    }
    cmd = [sys.executable, "-m", "dpls", "train", *(f"--{k}={v}" for k, v in keys.items())]
    subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if "loss" in r]
    return [b - a for a, b in itertools.pairwise(elapsed)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--data", type=Path, required=True, help="a dpls prepare data directory")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of each median")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every run")
    parser.add_argument("--losses", default="ce,dpls")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        parser.error(f"--nanogpt {args.nanogpt}: no train.py there")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    tokens = SHAPE["batch_size"] * SHAPE["block_size"]
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="nanogpt_cpu_") as tmp:
        work = Path(tmp)
        vocab = nanogpt_dataset(args.data, work / "data" / "dpls")
        print(f"V={vocab}, shape {SHAPE}, {args.iters} iterations, {args.threads} thread(s)", flush=True)
        for rep in range(args.repeats):
            runs = {"nanoGPT": lambda: run_nanogpt(args.nanogpt, work, args.iters, env)}
            for loss in args.losses.split(","):
                runs[f"dpls train --loss={loss}"] = lambda loss=loss: run_dpls(
                    args.data, work, loss, args.iters, env
                )
            for name, run in runs.items():
                seconds = run()[args.skip :]
                rate = tokens / statistics.median(seconds)
                rates.setdefault(name, []).append(rate)
                print(
                    f"repeat {rep + 1}: {name:<24} {rate:8,.0f} tokens/s ({len(seconds)} steps)", flush=True
                )
    ref = rates["nanoGPT"]
    print("\nper repeat, relative to nanoGPT in the same repeat:")
    for name, values in rates.items():
        ratios = ", ".join(f"{v / r:.3f}" for v, r in zip(values, ref))
        print(f"  {name:<24} {', '.join(f'{v:,.0f}' for v in values)} tokens/s; ratio {ratios}")


if __name__ == "__main__":
    main()
