"""`dpls export-hf CHECKPOINT DIR`: a Hugging Face model directory with its tokenizer."""

from __future__ import annotations

import argparse
from typing import Any

from dpls.cli._common import usage_errors


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=(
            "Write a checkpoint (or the latest checkpoint of a run directory) as a Hugging Face "
            "directory (config.json, model.safetensors, tokenizer) that AutoModelForCausalLM / "
            "AutoTokenizer.from_pretrained load offline, in the stock class that computes the same "
            "logits: LlamaForCausalLM, Qwen3ForCausalLM for qk_norm, VaultGemmaForCausalLM for "
            "logit_softcap."
        ),
    )
    parser.add_argument("checkpoint", help="a checkpoint directory or a run directory")
    parser.add_argument("out_dir", metavar="DIR", help="directory to create (must not exist or be empty)")
    parser.add_argument("--force", action="store_true", help="replace DIR if it already holds files")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from dpls.eval.export_hf import export_hf

    with usage_errors():
        out = export_hf(args.checkpoint, args.out_dir, overwrite=args.force)
    print(f"wrote {out}")
    return 0
