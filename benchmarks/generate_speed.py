"""Generation speed of a preset model, with and without the key/value cache (tokens/s).

    python benchmarks/generate_speed.py [--preset tiny] [--new 255] [--prompt 1] [--repeats 3]

The weights are a fresh initialisation (speed does not depend on them) and no end-of-text
stops a sample, so every run generates exactly --new tokens. Each setting is timed --repeats
times after one warm-up; the median is reported, with the spread, and the ratio of the two.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dpls.model import Transformer, model_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--new", type=int, default=255, help="tokens to generate")
    parser.add_argument("--prompt", type=int, default=1, help="prompt length in tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(model_config(args.preset)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt))
    print(
        f"preset {args.preset}: {model.num_params() / 1e6:.2f}M parameters, block_size {model.config.block_size}; "
        f"batch {args.batch}, prompt {args.prompt}, new {args.new}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    rates: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeats + 1):
        for use_cache in (True, False):
            gen = torch.Generator().manual_seed(i)
            start = time.perf_counter()
            out = model.generate(prompt, args.new, generator=gen, use_cache=use_cache)
            seconds = time.perf_counter() - start
            assert out.shape[1] == args.prompt + args.new
            if i:  # the first round warms up
                rates[use_cache].append(args.batch * args.new / seconds)
    for use_cache, values in rates.items():
        name = "with cache   " if use_cache else "without cache"
        print(
            f"{name}: {statistics.median(values):8.1f} tokens/s (runs: {', '.join(f'{v:.1f}' for v in values)})"
        )
    print(f"cache speed-up: {statistics.median(rates[True]) / statistics.median(rates[False]):.2f}x")


if __name__ == "__main__":
    main()
