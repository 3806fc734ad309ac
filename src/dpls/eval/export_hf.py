"""Export a checkpoint as a Hugging Face model directory, tokenizer included.

The class is the stock one that computes the same function (`dpls.model.hf_architecture`):
``LlamaForCausalLM``, ``Qwen3ForCausalLM`` for ``qk_norm``, ``VaultGemmaForCausalLM`` for
``logit_softcap``. The model's parameter names are already Hugging Face Llama's (and Qwen3's), so
the weights are copied into ``model.safetensors`` (a tied output projection is left out, as
``tie_word_embeddings`` tells Hugging Face to re-tie it; the rows of a padded vocabulary are
dropped; VaultGemma's norms and embedding are re-expressed: `dpls.model.hf_state_dict`), and
``config.json`` comes from `dpls.model.to_hf_config`. The tokenizer is the run's own:

* the trained byte-level BPE (``tokenizer.json``) becomes a ``PreTrainedTokenizerFast``
  with ``<|endoftext|>`` as bos / eos (the token every document starts with);
* a GPT-2-tokenised run gets GPT-2's tokenizer, rebuilt offline from tiktoken's
  ``gpt2`` ranks when tiktoken has them cached (it cannot download here).

The directory is written under a temporary name and renamed into place, so an
interrupted export never leaves a half directory under the real name.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from dpls._io import apply_umask, check_writable_dir, mark_owned, mkdtemp_beside, unowned_files
from dpls.data.checks import check_same_tokenizer
from dpls.model import MODEL_TYPES, ModelConfig, hf_architecture, hf_state_dict, to_hf_config
from dpls.runs.checkpoint import (
    load_model,
    read_model_config,
    reads_checkpoint,
    resolve_checkpoint,
    trained_tokenizer,
)
from dpls.runs.layout import CHECKPOINTS_DIR, TOKENIZER_DIR, config_path, read_toml

EOT = "<|endoftext|>"
EXPORT_MARKER = "dpls_export.json"  # provenance; also how the lm-eval cache knows it is current
HF_CACHE = "hf"  # RUN/hf/step_NNNNNNN: where `cached_export` keeps exports


def _run_dir(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS_DIR else checkpoint.parent


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def find_tokenizer(checkpoint: Path) -> dict[str, Any]:
    """Where the run's tokenizer is and what it is: ``{"kind": "bpe"|"gpt2", "file", "eot"}``.

    Looked for in ``RUN/tokenizer/`` (copied there by the trainer), then in the run's data
    directory (its ``meta.json`` names the tokenizer).
    """
    places = [_run_dir(checkpoint) / TOKENIZER_DIR]
    cfg_file = config_path(checkpoint)
    data_dir = read_toml(cfg_file).get("data_dir") if cfg_file.is_file() else None
    if data_dir:
        places.append(Path(data_dir))
    expected = trained_tokenizer(checkpoint)
    for place in places:
        if (place / "meta.json").is_file():  # a data_dir prepared again since: other ids
            check_same_tokenizer(expected, place, f"the checkpoint {checkpoint} was trained with")
        meta = _read_json(place / "meta.json")
        kind = meta.get("tokenizer")
        file = place / str(meta.get("tokenizer_file") or "tokenizer.json")
        if kind == "gpt2":
            return {"kind": "gpt2", "file": None, "eot": meta.get("eot_token"), "where": place}
        if file.is_file():
            return {"kind": "bpe", "file": file, "eot": meta.get("eot_token"), "where": place}
    raise ValueError(
        f"no tokenizer found for {checkpoint}: looked for tokenizer.json / meta.json in "
        + ", ".join(str(p) for p in places)
    )


def _bpe_tokenizer(info: dict[str, Any], block_size: int) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_file(str(info["file"]))
    eot = EOT if raw.token_to_id(EOT) is not None else None
    if eot is None and info.get("eot") is not None:
        eot = raw.id_to_token(int(info["eot"]))
    special = {"eos_token": eot, "bos_token": eot} if eot is not None else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, model_max_length=block_size, clean_up_tokenization_spaces=False, **special
    )


def _gpt2_tokenizer(block_size: int) -> Any:
    """GPT-2's tokenizer rebuilt from tiktoken's ``gpt2`` ranks (no network needed if cached)."""
    import tiktoken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as err:
        raise ValueError(
            "exporting a GPT-2-tokenised run needs GPT-2's tokenizer files, and tiktoken could not load "
            f"its 'gpt2' encoding offline ({type(err).__name__}: {err}). Run once with network access "
            "(or point TIKTOKEN_CACHE_DIR at a cache holding them), then export again."
        ) from err
    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / "gpt2.tiktoken"
        lines = (f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in enc._mergeable_ranks.items())
        ranks.write_text("\n".join(lines) + "\n")
        raw = TikTokenConverter(
            vocab_file=str(ranks), pattern=enc._pat_str, extra_special_tokens=enc._special_tokens
        ).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token=EOT, bos_token=EOT, model_max_length=block_size
    )


def _portable_tokenizer_class(path: Path) -> None:
    """Name the class every transformers version knows (5.x writes its new ``TokenizersBackend``)."""
    cfg = _read_json(path)
    if cfg.get("tokenizer_class") not in (None, "PreTrainedTokenizerFast"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _fingerprint(checkpoint: Path) -> list[list[Any]]:
    """(name, size, mtime) of every file of a checkpoint: changes whenever it is rewritten."""
    return sorted(
        [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoint.iterdir() if p.is_file()
    )


def check_exportable(checkpoint: str | Path) -> tuple[Path, Any, dict[str, Any]]:
    """(checkpoint dir, ModelConfig, tokenizer info), or `ValueError` saying why it cannot export."""
    ckpt = resolve_checkpoint(checkpoint)
    cfg = ModelConfig.from_dict(read_model_config(ckpt))
    arch = hf_architecture(cfg)  # raises for what no stock class computes (TPA, qk_norm with a soft-cap)
    if importlib.util.find_spec(f"transformers.models.{MODEL_TYPES[arch]}") is None:
        raise ValueError(
            f"this model exports as {arch}, which the installed transformers does not have; "
            "upgrade it (pip install -U transformers)"
        )
    return ckpt, cfg, find_tokenizer(ckpt)


_LEGACY_EXPORT_FILES = {
    EXPORT_MARKER,
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _check_replaceable(out: Path, ckpt: Path) -> None:
    """``overwrite`` replaces an earlier export only: a folder holding nothing but files dpls
    wrote there (its manifest says so), never the checkpoint being exported, a run, data, a
    regular file or a folder of the user's."""
    if out.resolve() in (ckpt.resolve(), *ckpt.resolve().parents):
        raise ValueError(f"{out} holds the checkpoint being exported; replacing it would delete it")
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"{out} exists and is not a directory; --force replaces only an earlier export")
    theirs = unowned_files(out)
    if theirs and (out / EXPORT_MARKER).is_file() and {p.name for p in out.iterdir()} <= _LEGACY_EXPORT_FILES:
        theirs = []  # an export written before exports recorded their files: only export names in it
    if theirs:
        shown = ", ".join(str(p.relative_to(out)) for p in theirs[:3]) + (", ..." if len(theirs) > 3 else "")
        raise ValueError(
            f"{out} is not an earlier export (it holds {shown}, not written by dpls export-hf); --force "
            "replaces only an earlier export: choose another DIR"
        )


def _check_parent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = (
            "a file is in the way" if isinstance(err, FileExistsError | NotADirectoryError) else err.strerror
        )
        raise ValueError(f"cannot create the folder {out.parent} for {out.name} ({why})") from None


@reads_checkpoint  # a run still training does not prune the checkpoint under us
def export_hf(
    checkpoint: str | Path, out_dir: str | Path, *, overwrite: bool = False, dtype: str = "float32"
) -> Path:
    """Write ``out_dir``: config.json, model.safetensors, generation_config.json and the tokenizer.

    ``checkpoint`` is a checkpoint directory or a run directory (its latest checkpoint).
    ``out_dir`` must not exist or be empty unless ``overwrite``. A model no stock class computes
    (TPA; ``qk_norm`` together with ``logit_softcap``) raises `ValueError`.
    """
    # -- everything checked before any work ---------------------------------------------
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    ckpt, cfg, tokenizer_info = check_exportable(checkpoint)
    out = Path(os.path.abspath(out_dir))  # "." or "x/..": a folder with a name, to rename onto
    if out in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise ValueError(
            f"{out_dir} is the current folder (or holds it); export into a new folder such as hf/"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(
                f"{out_dir} already exists and is not empty; choose another directory, or pass "
                "--force (overwrite=True) to replace an earlier export"
            )
        _check_replaceable(out, ckpt)
    _check_parent(out)
    check_writable_dir(out.parent, "DIR")

    # -- the work -------------------------------------------------------------------------
    from safetensors.torch import save_file
    from transformers import AutoConfig, GenerationConfig

    if tokenizer_info["kind"] == "gpt2":
        tokenizer = _gpt2_tokenizer(cfg.block_size)
    else:
        tokenizer = _bpe_tokenizer(tokenizer_info, cfg.block_size)
    eot_id = tokenizer.eos_token_id
    model = load_model(ckpt, device="cpu")
    state = hf_state_dict(model, dtypes[dtype])
    del model

    tmp = mkdtemp_beside(out)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        values = to_hf_config(cfg, bos_token_id=eot_id, eos_token_id=eot_id, dtype=dtype)
        hf_cfg = AutoConfig.for_model(values.pop("model_type"), **values)
        hf_cfg.save_pretrained(tmp)
        GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
        marker = {
            "checkpoint": str(ckpt.resolve()),
            "fingerprint": _fingerprint(ckpt),
            "tokenizer": tokenizer_info["kind"],
            "dtype": dtype,
        }
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        files = [p for p in tmp.iterdir() if p.is_file()]
        for f in files:  # safetensors creates its file private (0600)
            apply_umask(f)
        mark_owned(*files)  # so --force may replace it later
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cached_export(checkpoint: str | Path) -> Path:
    """The export of ``checkpoint`` in ``RUN/hf/step_NNNNNNN``, (re)written only when out of date."""
    ckpt = resolve_checkpoint(checkpoint)
    cache = _run_dir(ckpt) / HF_CACHE / ckpt.name
    marker = _read_json(cache / EXPORT_MARKER)
    current = marker.get("checkpoint") == str(ckpt.resolve()) and marker.get("fingerprint") == _fingerprint(
        ckpt
    )
    if current and (cache / "model.safetensors").is_file():
        return cache
    return export_hf(ckpt, cache, overwrite=True)
