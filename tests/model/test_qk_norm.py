"""qk_norm: RMSNorm on each head's queries and keys; it trains, saves, loads and forks, and
exports as Qwen3. Also the attention modules' record of their largest pre-softmax logit."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import write_data_dir
from dpls.model import ModelConfig, Transformer
from dpls.model.transformer import causal_logit_max


def _cfg(**changes) -> ModelConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return ModelConfig(**{**base, **changes})


def test_qk_norm_normalises_queries_and_keys_per_head():
    torch.manual_seed(0)
    plain = Transformer(_cfg())
    torch.manual_seed(0)
    normed = Transformer(_cfg(qk_norm=True))
    names = {n for n, _ in normed.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert names == {f"model.layers.{i}.self_attn.{q}_norm.weight" for i in range(2) for q in "qk"}
    # The norms start at ones and draw no random numbers: every shared weight is the same.
    for name, p in plain.state_dict().items():
        torch.testing.assert_close(normed.state_dict()[name], p, rtol=0, atol=0)
    attn = normed.model.layers[0].self_attn
    assert attn.q_norm.weight.shape == (8,)  # one scale over the head dimension
    x = torch.randn(2, 16, 32)
    q = attn.q_proj(x).view(2, 16, 4, 8)
    q64 = q.double()
    expected = q64 / (q64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()  # per head, over its 8 features
    torch.testing.assert_close(attn.q_norm(q).double(), expected, rtol=1e-5, atol=1e-6)
    idx = torch.randint(0, 64, (2, 16))
    assert not torch.allclose(normed(idx), plain(idx))
    with pytest.raises(ValueError, match="qk_norm is implemented for attention='mha' and 'gqa'"):
        _cfg(qk_norm=True, attention="tpa")


@pytest.mark.parametrize("attention, n_kv_head", [("mha", None), ("gqa", 2), ("tpa", None)])
def test_recorded_attention_logit_max_matches_explicit_scores(attention, n_kv_head):
    torch.manual_seed(1)
    model = Transformer(_cfg(attention=attention, n_kv_head=n_kv_head))
    idx = torch.randint(0, 64, (3, 16))
    # The reference: every layer's causal scores written out in float64.
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        captured.append((q.double(), k.double()))
        return real(q, k, v, **kw)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        model.record_attention_logits(True)
        logits = model(idx)
        got = model.attention_logit_max()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
        model.record_attention_logits(False)
    best = -math.inf
    for q, k in captured:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), -math.inf)
        best = max(best, scores.max().item())
    assert got is not None and got.item() == pytest.approx(best, rel=1e-5)
    # Recording changes nothing in the output, and is off (and cleared) afterwards.
    torch.testing.assert_close(model(idx), logits, rtol=0, atol=0)
    assert model.attention_logit_max() is None
    # Chunked over the batch, the same maximum.
    q, k = captured[0]
    assert causal_logit_max(q, k, chunk_elements=1).item() == pytest.approx(causal_logit_max(q, k).item())


def test_qk_norm_trains_saves_loads_forks_and_exports_as_qwen3(tmp_path: Path, one_thread):
    from dpls.model import hf_architecture
    from dpls.runs.checkpoint import load_model
    from dpls.train.config import load_config
    from dpls.train.trainer import InvalidRun, train

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    write_data_dir(
        data,
        [rng.integers(0, 60, 3000).astype(np.uint16)],
        [rng.integers(0, 60, 600).astype(np.uint16)],
        vocab_size=64,
        tokenizer="gpt2",
    )
    common = dict(
        data_dir=str(data),
        model="tiny",
        n_layer=1,
        n_embd=32,
        n_head=2,
        block_size=16,
        batch_size=2,
        eval_tokens=64,
        eval_interval=2,
        log_interval=1,
        progress=False,
        device="cpu",
    )
    run = train(
        load_config(overrides={**common, "out_dir": str(tmp_path / "run"), "max_iters": 2, "qk_norm": True})
    )
    model = load_model(run)
    assert model.config.qk_norm and hasattr(model.model.layers[0].self_attn, "q_norm")
    assert "qk_norm = true" in (run / "config.toml").read_text()
    # A fork keeps the model (qk_norm included) and may not change it.
    fork = train(
        load_config(overrides={"resume_dir": str(run), "out_dir": str(tmp_path / "fork"), "max_iters": 3})
    )
    assert load_model(fork).config.qk_norm
    with pytest.raises(InvalidRun, match="qk_norm=False differs from the checkpoint's True"):
        train(
            load_config(
                overrides={
                    "resume_dir": str(run),
                    "out_dir": str(tmp_path / "f2"),
                    "max_iters": 3,
                    "qk_norm": False,
                }
            )
        )
    # the export itself, and its logits against ours: tests/eval/test_export_hf.py
    assert hf_architecture(load_model(run).config) == "Qwen3ForCausalLM"
