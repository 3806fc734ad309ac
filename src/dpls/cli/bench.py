"""``dpls bench loss`` / ``dpls bench train``: performance comparisons as ratios measured in one run.

The measurements live in `dpls.bench.loss` and `dpls.bench.train`; this module parses and
checks the arguments (a bad one is a one-line usage error before any case runs) and prints.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

import torch

from dpls._io import write_owned_json
from dpls.bench import loss as loss_bench
from dpls.bench import train as train_bench
from dpls.cli import UsageError
from dpls.cli._common import check_output_file, usage_errors
from dpls.eval.evaluate import resolve_device
from dpls.losses.cpu_kernel import describe as cpu_search
from dpls.model import PRESETS


def register(subparsers, name: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCH")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    loss = sub.add_parser(
        "loss",
        help="time and peak memory of the loss forward+backward vs F.cross_entropy",
        description="Time and peak extra memory of one loss forward+backward for every contender "
        "(F.cross_entropy, the published dense formulation, each DPLS implementation, plug-ins), "
        "as ratios to F.cross_entropy measured in the same run.",
    )
    loss.add_argument("--n", type=int, default=4096, help="tokens (rows of the logits), default 4096")
    loss.add_argument("--v", type=int, default=32000, help="vocabulary size, default 32000")
    loss.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (default float32)")
    loss.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda if available, else cpu)")
    loss.add_argument("--top-k", type=int, default=100, help="k of DPLS, default 100")
    loss.add_argument("--epsilon", type=float, default=0.1, help="ε of DPLS, default 0.1")
    loss.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per contender (median), default 5"
    )
    loss.add_argument("--impls", default=None, help="comma-separated contenders (default: all available)")
    loss.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    loss.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    loss.set_defaults(func=_run_loss)

    train = sub.add_parser(
        "train",
        help="training throughput and memory of the loss variants (tokens/s, MFU)",
        description="Training steps (forward, loss, backward, AdamW) of each model preset with each loss "
        "and implementation, on random tokens: tokens/s, MFU and peak memory, each as a ratio to CE "
        "measured in the same run (ratios, not absolute numbers, carry over between machines).",
    )
    _add_train_arguments(train)
    train.set_defaults(func=_run_train)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--presets",
        default="124m,350m",
        help="comma-separated model presets, and 'nanogpt': a GPT-2-style model at nanoGPT's README CPU "
        "shape in nanoGPT's kind of step, the yardstick for the 'tok/s vs nanogpt' column "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument(
        "--losses", default="ce,dpls", help="comma-separated losses, ce first (default: %(default)s)"
    )
    parser.add_argument(
        "--impls", default="auto", help="comma-separated loss implementations (default: %(default)s)"
    )
    parser.add_argument(
        "--fused-linear", action="store_true", help="fuse the output projection into the loss"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)"
    )
    parser.add_argument(
        "--block-size", type=int, default=1024, help="tokens per sequence (default: %(default)s)"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="vocabulary size (default: the preset's)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (default: %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps before timing (default: %(default)s)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu | cuda[:i] (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(train_bench.DTYPES), default=None, help="default: bf16 on GPU, else float32"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--epsilon", type=float, default=0.1, help="ε of DPLS (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=100, help="k of DPLS (default: %(default)s)")
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the rows as JSON (never over a file dpls did not write)",
    )


def _run_train(args: argparse.Namespace) -> int:
    nanogpt = train_bench.NANOGPT
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in presets if p not in PRESETS and p != nanogpt]
    if unknown:
        raise UsageError(f"unknown preset(s) {unknown}; allowed: {sorted(PRESETS)} and {nanogpt!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch_size", "block_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    with usage_errors():
        device = resolve_device(args.device)
    dtype = (
        train_bench.DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    losses = [x for x in args.losses.split(",") if x]
    impls = [x for x in args.impls.split(",") if x]
    if not losses or not impls:
        raise UsageError("--losses and --impls must each name at least one")
    with usage_errors():
        train_bench.check_cases(
            presets,
            losses,
            impls,
            vocab_size=args.vocab_size,
            epsilon=args.epsilon,
            top_k=args.top_k,
            device=device,
        )
    check_output_file(args.json, "--json")
    rows = train_bench.bench_train(
        presets,
        losses,
        impls,
        fused_linear=args.fused_linear,
        batch_size=args.batch_size,
        block_size=args.block_size,
        vocab_size=args.vocab_size,
        steps=args.steps,
        warmup=args.warmup,
        device=device,
        dtype=dtype,
        compile_model=args.compile,
        epsilon=args.epsilon,
        top_k=args.top_k,
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device: {name}, dtype: {str(dtype).removeprefix('torch.')}, batch {args.batch_size}×{args.block_size}"
        + (f", top-k search: {cpu_search()}" if device.type == "cpu" else "")
    )
    print(train_bench.format_table(rows))
    if args.json:
        extra = {"cpu_top_k_search": cpu_search()} if device.type == "cpu" else {}
        write_owned_json(args.json, {"device": name, **extra, "rows": [asdict(r) for r in rows]})
    return 0


def _config(args: argparse.Namespace):
    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.v < 1:
        raise UsageError(f"--v must be >= 1, got {args.v}")
    if not 1 <= args.top_k <= args.v:
        raise UsageError(f"--top-k must be in [1, --v={args.v}], got {args.top_k}")
    if not 0.0 <= args.epsilon < 1.0:
        raise UsageError(f"--epsilon must be in [0, 1), got {args.epsilon}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    if args.dtype not in loss_bench.DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(loss_bench.DTYPES)}, got {args.dtype!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device {device!r} is not a device: {err}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda[:i], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but no CUDA device is available")
    _check_fits(args.n, args.v, loss_bench.DTYPES[args.dtype], dev)
    impls = None
    if args.impls:
        impls = tuple(s.strip() for s in args.impls.split(",") if s.strip())
    return loss_bench.LossBenchConfig(
        n=args.n,
        v=args.v,
        dtype=args.dtype,
        device=device,
        top_k=args.top_k,
        epsilon=args.epsilon,
        repeats=args.repeats,
        impls=impls,
        memory=not args.no_memory,
    )


def _check_fits(n: int, v: int, dtype: torch.dtype, device: torch.device) -> None:
    """The [n, v] logits and their gradient must fit in the device's memory: otherwise the
    allocation fails with an allocator message (or the machine swaps) after setup."""
    need = 2 * n * v * torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UsageError(
            f"--n {n} x --v {v}: the logits and their gradient alone need {need / 2**30:,.1f} GiB, "
            f"more than the {have / 2**30:,.1f} GiB of {device.type}; lower --n or --v"
        )


def _run_loss(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg.impls is not None:
        table = loss_bench.load_contenders(torch.device(cfg.device))
        unknown = [n for n in cfg.impls if n not in table]
        if unknown:
            raise UsageError(
                f"--impls: unknown or unavailable {unknown}; available here: {', '.join(sorted(table))}"
            )
    check_output_file(args.json, "--json")
    rows = loss_bench.bench_loss(cfg)
    print(loss_bench.format_table(rows, cfg))
    if args.json:
        loss_bench.write_json(args.json, rows, cfg)
    return 0
