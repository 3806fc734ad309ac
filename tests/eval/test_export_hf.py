"""Hugging Face export: loads offline with the Auto classes and gives the checkpoint's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpls.model import ModelConfig, Transformer

TEXT = "def add(x, y):\n    return x + y\n\nclass Point:\n    pass\n"


def make_tiny_run(
    root: Path,
    *,
    attention: str = "mha",
    n_kv_head: int | None = None,
    tie: bool = True,
    step: int = 1,
    relative_paths: bool = False,
    pad_vocab_to: int = 1,
    qk_norm: bool = False,
    logit_softcap: float | None = None,
) -> tuple[Path, Transformer]:
    """A run directory as the trainer leaves it: RUN/tokenizer/tokenizer.json + one checkpoint.

    The weights are perturbed away from the init (norm gains of exactly 1 would hide a
    wrongly mapped norm).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dpls.runs.checkpoint import save_checkpoint
    from dpls.train.config import TrainConfig

    run = root / "run"
    (run / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT] * 20, trainer)
    tok.save(str(run / "tokenizer" / "tokenizer.json"))
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(),
        block_size=32,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        n_embd=32,
        attention=attention,
        tie_embeddings=tie,
        pad_vocab_to=pad_vocab_to,
        qk_norm=qk_norm,
        logit_softcap=logit_softcap,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # relative_paths: out_dir / data_dir saved as given on a command line run from ``root``
    where = ("run", "data") if relative_paths else (str(run), str(root / "data"))
    config = TrainConfig(out_dir=where[0], data_dir=where[1], block_size=32)
    save_checkpoint(run, step, model=model, optimizer=None, trainer_state={}, config=config, model_config=cfg)
    return run, model.eval()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.mark.parametrize(
    ("attention", "n_kv_head", "tie", "pad", "qk_norm", "softcap", "cls"),
    [
        ("mha", None, True, 1, False, None, "LlamaForCausalLM"),
        ("gqa", 2, False, 1, False, None, "LlamaForCausalLM"),
        ("mha", None, True, 64, False, None, "LlamaForCausalLM"),
        ("gqa", 2, True, 1, True, None, "Qwen3ForCausalLM"),
        ("mha", None, True, 64, False, 3.0, "VaultGemmaForCausalLM"),
        ("gqa", 2, False, 1, False, 3.0, "VaultGemmaForCausalLM"),
    ],
    ids=["mha-tied", "gqa-untied", "mha-tied-padded", "qk-norm", "softcap-tied-padded", "softcap-untied"],
)
def test_export_loads_offline_and_matches_logits(
    tmp_path, offline, attention, n_kv_head, tie, pad, qk_norm, softcap, cls
):
    """Each model exports as the stock class that computes it, whose logits equal ours (float32):
    Llama; Qwen3 for qk-norm (per-head q/k RMSNorm before RoPE); VaultGemma for the soft-cap."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpls.eval.export_hf import export_hf

    run, model = make_tiny_run(
        tmp_path, attention=attention, n_kv_head=n_kv_head, tie=tie, pad_vocab_to=pad, qk_norm=qk_norm,
        logit_softcap=softcap,
    )  # fmt: skip
    out = export_hf(run, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert type(hf).__name__ == cls
    assert getattr(hf.config, "final_logit_softcapping", None) == softcap
    assert hf.config.tie_word_embeddings is tie
    assert hf.config.num_key_value_heads == (n_kv_head or 4)

    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(run / "tokenizer" / "tokenizer.json"))
    assert tok.encode(TEXT) == raw.encode(TEXT).ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    assert tok.eos_token_id == raw.token_to_id("<|endoftext|>") == hf.config.eos_token_id

    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = model(ids)
    V = model.config.vocab_size  # a padded vocabulary's rows are dropped: Llama has no mask for them
    assert hf.config.vocab_size == V and ours.shape[-1] == model.config.padded_vocab_size
    assert (ours.shape[-1] > V) == (pad > 1)
    torch.testing.assert_close(theirs, ours[..., :V], rtol=0, atol=1e-4)
    if softcap is not None:  # the cap is in force on both sides: a logit near it is no accident
        assert ours[..., :V].abs().max() < softcap and theirs.abs().max() > 0.3 * softcap


def test_qk_norm_with_softcap_is_refused_with_the_reason(tmp_path):
    from dpls.eval.export_hf import export_hf

    run, _ = make_tiny_run(tmp_path, qk_norm=True, logit_softcap=5.0)
    with pytest.raises(ValueError, match=r"qk_norm=true together with logit_softcap has no Hugging Face"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_tpa_is_refused_before_writing(tmp_path):
    from dpls.eval.export_hf import export_hf

    run, _ = make_tiny_run(tmp_path, attention="tpa")
    with pytest.raises(ValueError, match=r"tpa.*only 'mha' and 'gqa' export"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_existing_directory_is_never_clobbered(tmp_path):
    from dpls.eval.export_hf import export_hf

    run, _ = make_tiny_run(tmp_path)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export_hf(run, out)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="not an earlier export"):  # overwrite replaces exports only
        export_hf(run, out, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    export_hf(run, out)
    export_hf(run, out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == []  # no temporaries left


def test_overwrite_never_deletes_the_source_a_run_or_data(tmp_path):
    """overwrite replaces a directory wholesale: the checkpoint being exported, its run, a
    folder of runs, a data directory and a folder under a file are refused before any work."""
    from dpls.eval.export_hf import export_hf

    run, _ = make_tiny_run(tmp_path)
    other = tmp_path / "other_run"
    (other / "checkpoints").mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    cases = [
        (run, "holds the checkpoint being exported"),
        (run / "checkpoints" / "step_0000001", "holds the checkpoint being exported"),
        (tmp_path, "holds the checkpoint being exported"),
        (other, "not an earlier export"),
        (data, "not an earlier export"),
        (tmp_path / "file" / "hf", "a file is in the way"),
    ]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out, message in cases:
        with pytest.raises(ValueError, match=message):
            export_hf(run, out, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_cached_export_is_reused_until_the_checkpoint_changes(tmp_path):
    from dpls.eval.export_hf import EXPORT_MARKER, cached_export

    run, _ = make_tiny_run(tmp_path)
    first = cached_export(run)
    assert first == run / "hf" / "step_0000001"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_export(run / "checkpoints" / "step_0000001") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    marker = json.loads((first / EXPORT_MARKER).read_text())
    assert marker["checkpoint"] == str((run / "checkpoints" / "step_0000001").resolve())
    make_tiny_run(tmp_path, step=1)  # the same step saved again: new files, new export
    again = cached_export(run)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns != stamp


def test_cli(tmp_path, capsys):
    from dpls.cli import main

    run, _ = make_tiny_run(tmp_path)
    assert main(["export-hf", str(run), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert main(["export-hf", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["export-hf", str(run), str(tmp_path / "out")]) == 2  # not empty, no --force
    assert main(["export-hf", str(run), str(tmp_path / "out"), "--force"]) == 0


def test_gpt2_tokenizer_is_rebuilt_from_tiktoken_ranks(monkeypatch):
    """The GPT-2 path on a small tiktoken encoding of the same kind (the real one needs a download)."""
    import tiktoken

    from dpls.eval.export_hf import _gpt2_tokenizer

    ranks = {bytes([i]): i for i in range(256)}
    for merge in (b"de", b"def", b" x", b" +", b"re", b"ret", b"retu", b"retur", b"return", b"    "):
        ranks[merge] = len(ranks)
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's split pattern

    enc = tiktoken.Encoding(
        "tiny", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": len(ranks)}
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    tok = _gpt2_tokenizer(64)
    text = "def f(x):\n    return x + 1  # déjà vu\n"
    assert tok.encode(text) == enc.encode(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == len(ranks)
    assert tok.encode("<|endoftext|>") == [len(ranks)]
