"""`dpls sample RUN_OR_CHECKPOINT`: text sampled from a trained model.

Sample continuations of a prompt from a run's latest checkpoint (or a given checkpoint),
with the run's tokenizer. The prompt is read after <|endoftext|>, as every training
document starts; an empty prompt starts a new document. A sample ends at <|endoftext|>
or after --max-new-tokens. Samples are printed one after another, separated by a line of
dashes; on a terminal the tokens appear as they are generated.

Sampling: --temperature 0 is greedy decoding (the most likely token, no randomness);
otherwise the logits are divided by the temperature, then --top-k and then --top-p filter
them. The same --seed, checkpoint and device give the same text. The context does not
slide: the prompt plus --max-new-tokens must fit in the model's block_size.

Nothing is written to disk. --verbose reports tokens/s on stderr.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import dpls
from dpls.cli import output_lost
from dpls.cli._common import doc_parser, usage_errors


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = doc_parser(subparsers, name, help_text, __doc__)
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run directory or a checkpoint")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", default="", help="text to continue (default: empty, a new document)")
    source.add_argument("--prompt-file", default=None, help="read the prompt from this file (UTF-8)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to draw (default: %(default)s)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: %(default)s)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy (default: %(default)s)"
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass p"
    )
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="report tokens/s per sample on stderr")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from dpls.eval.evaluate import resolve_device
    from dpls.eval.generation import check_fits, make_generator, prompt_ids, stream_sample

    with usage_errors():
        # every argument, then the run, then the prompt against the model: all before sampling
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be a positive integer, got {args.num_samples}")
        sampling = _sampling(args)
        prompt = _read_prompt(args)
        device = resolve_device(args.device)
        tokenizer = dpls.load_tokenizer(args.checkpoint)
        model = dpls.load_model(args.checkpoint, device=device)
        if sampling.top_k is not None and sampling.top_k > model.config.vocab_size:
            raise ValueError(f"--top-k must be in [1, {model.config.vocab_size}], got {sampling.top_k}")
        check_fits(model, prompt_ids(tokenizer, prompt), sampling.max_new_tokens)

    out = sys.stdout
    live = out.isatty()
    generator = make_generator(sampling.seed, device)
    total_tokens, total_seconds = 0, 0.0
    for i in range(args.num_samples):
        if i:
            out.write("\n" + "-" * 40 + "\n")
        out.write(prompt)
        for piece, so_far in stream_sample(model, tokenizer, prompt, sampling, generator, device):
            sample = so_far
            if live:
                out.write(piece)
                out.flush()
            if output_lost():  # the reader went away (`| head`): nothing more to sample for
                return 0
        if not live:
            out.write(sample.text)
        out.flush()
        if output_lost():
            return 0
        generated = len(sample.tokens) + int(sample.ended)
        total_tokens, total_seconds = total_tokens + generated, total_seconds + sample.seconds
        if args.verbose:
            end = "end of text" if sample.ended else "max_new_tokens"
            print(
                f"\n[sample {i + 1}: {generated} tokens ({end}) in {sample.seconds:.2f} s, "
                f"{sample.tokens_per_s:,.1f} tokens/s]",
                file=sys.stderr,
            )
    out.write("\n")
    if args.verbose and args.num_samples > 1 and total_seconds > 0:
        print(
            f"[{total_tokens} tokens in {total_seconds:.2f} s: {total_tokens / total_seconds:,.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


def _sampling(args: argparse.Namespace) -> Any:
    from dpls.eval.generation import Sampling

    names = {
        "max_new_tokens": "--max-new-tokens",
        "temperature": "--temperature",
        "top_k": "--top-k",
        "top_p": "--top-p",
        "seed": "--seed",
    }
    try:
        return Sampling(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as err:  # name the option as the user typed it
        message = str(err)
        for key, flag in names.items():
            if message.startswith(key):
                message = flag + message[len(key) :]
        raise ValueError(message) from None


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompt-file: cannot read {args.prompt_file!r}: {err}") from None
