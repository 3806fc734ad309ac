"""The decoder: Hugging Face Llama equivalence, causality, TPA's definition, presets, FLOPs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpls.model import (
    PRESETS,
    ModelConfig,
    Transformer,
    hf_state_dict,
    model_config,
    swiglu_hidden,
    to_hf_config,
)
from dpls.model.transformer import apply_rope


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights too), so a mixed-up name or layout cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if p.dim() == 1 else 0.0))


def _hf_model(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dict = to_hf_config(cfg)
    # the dict must say what the config means, independently of the test's comparison
    assert hf_dict["hidden_size"] == cfg.n_embd and hf_dict["num_hidden_layers"] == cfg.n_layer
    assert hf_dict["num_key_value_heads"] == cfg.kv_heads and hf_dict["head_dim"] == cfg.resolved_head_dim
    hf_cfg = LlamaConfig(**{k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "eager"
    return LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attention="mha"),
        dict(attention="gqa", n_kv_head=2),
        dict(attention="gqa", n_kv_head=1, head_dim=8, rope_theta=500.0, norm_eps=1e-6),
        dict(attention="mha", tie_embeddings=False, intermediate_size=100),
        dict(attention="gqa", n_kv_head=2, pad_vocab_to=8),  # 97 -> 104: the padded rows are dropped
        dict(attention="mha", tie_embeddings=False, pad_vocab_to=64),
    ],
    ids=["mha", "gqa", "mqa-headdim", "untied", "padded", "padded-untied"],
)
def test_matches_hf_llama(overrides):
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=48, **overrides)
    ours = Transformer(cfg).eval()
    _randomize(ours)
    hf = _hf_model(cfg)
    state = hf_state_dict(ours)
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in state  # the tied matrix is stored once
        missing, unexpected = hf.load_state_dict(state, strict=False)
        assert unexpected == [] and missing == ["lm_head.weight"]
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    else:
        hf.load_state_dict(state, strict=True)
    idx = torch.randint(0, cfg.vocab_size, (3, 29))
    with torch.no_grad():
        ref = hf(input_ids=idx).logits
        out = ours(idx)
    assert out.shape == (3, 29, cfg.padded_vocab_size) and ref.shape == (3, 29, cfg.vocab_size)
    torch.testing.assert_close(out[..., : cfg.vocab_size], ref, atol=1e-5, rtol=1e-5)
    assert torch.all(out[..., cfg.vocab_size :] == float("-inf"))


def test_hf_config_refuses_tpa():
    with pytest.raises(ValueError, match="tpa"):
        to_hf_config(ModelConfig(attention="tpa"))


@pytest.mark.parametrize("attention", ["mha", "gqa", "tpa"])
@given(cut=st.integers(min_value=1, max_value=19), seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_future_tokens_do_not_change_past_logits(attention, cut, seed):
    kv = 2 if attention == "gqa" else None
    cfg = ModelConfig(
        vocab_size=50, block_size=20, n_layer=2, n_head=4, n_kv_head=kv, n_embd=32, attention=attention
    )
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    _randomize(model, seed)
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, cut:] = torch.randint(0, 50, (2, 20 - cut))
    changed[:, cut] = (idx[:, cut] + 1) % 50  # the first future token always differs
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, cut], b[:, cut])  # ... and the model does see it


def test_tpa_matches_its_definition():
    """q, k, v assembled from the factors, RoPE applied to the full q and k afterwards."""
    cfg = ModelConfig(
        vocab_size=40,
        block_size=16,
        n_layer=1,
        n_head=3,
        n_embd=24,
        attention="tpa",
        tpa_q_rank=4,
        tpa_kv_rank=2,
    )
    model = Transformer(cfg).eval()
    _randomize(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 16, 24)
    B, T, H, D = 2, 16, 3, 8

    def assemble(a, b, rank):
        fa = (x @ a.weight.T).view(B, T, H, rank)
        fb = (x @ b.weight.T).view(B, T, rank, D)
        return torch.einsum("bthr,btrd->bhtd", fa, fb) / rank

    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    q = apply_rope(assemble(attn.q_a_proj, attn.q_b_proj, 4), cos, sin)
    k = apply_rope(assemble(attn.k_a_proj, attn.k_b_proj, 2), cos, sin)
    v = assemble(attn.v_a_proj, attn.v_b_proj, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D) @ attn.o_proj.weight.T
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), y, atol=1e-5, rtol=1e-5)


def test_forward_is_hidden_states_times_output_weight():
    model = Transformer(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 64, (2, 8))
    assert model.output_weight is model.model.embed_tokens.weight
    torch.testing.assert_close(model(idx), model.hidden_states(idx) @ model.output_weight.T)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_logit_softcap_caps_the_logits_and_the_padding_stays_masked():
    cfg = ModelConfig(
        vocab_size=97, block_size=8, n_layer=1, n_head=2, n_embd=16, pad_vocab_to=8, logit_softcap=0.5
    )
    model = Transformer(cfg)
    _randomize(model)
    idx = torch.randint(0, 97, (2, 8))
    out = model(idx)
    raw = model.hidden_states(idx) @ model.output_weight.T
    assert raw.abs().max() > 1.0  # the cap bites
    torch.testing.assert_close(out[..., :97], 0.5 * torch.tanh(raw / 0.5))
    assert torch.all(out[..., 97:] == float("-inf"))


def test_init_is_gpt2_style():
    cfg = model_config("tiny", n_layer=6, n_embd=256, n_head=4)
    model = Transformer(cfg)
    std = cfg.init_std
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(std / math.sqrt(12), rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(std / math.sqrt(12), rel=0.05)
    assert torch.equal(model.model.norm.weight, torch.ones(256))


def test_tpa_init_gives_plain_attention_scale():
    cfg = model_config("tiny", n_embd=256, attention="tpa")
    model = Transformer(cfg)
    attn = model.model.layers[0].self_attn
    x = torch.randn(4, 64, 256)  # unit RMS, as after the input norm
    q = attn._assemble(attn.q_a_proj, attn.q_b_proj, x, attn.q_rank)
    plain = cfg.init_std * math.sqrt(256)  # std of a q_proj output with N(0, init_std) weights
    assert q.std().item() == pytest.approx(plain, rel=0.15)


def test_meta_device_build_then_init():
    cfg = model_config("tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = Transformer(cfg)
    torch.testing.assert_close(model.rope_cos, fresh.rope_cos)
    assert torch.isfinite(model(torch.randint(0, cfg.vocab_size, (1, 16)))).all()


def test_preset_sizes():
    expected = {
        "tiny": (1e6, 3e6),
        "small": (25e6, 55e6),
        "124m": (115e6, 135e6),
        "350m": (330e6, 380e6),
        "760m": (700e6, 820e6),
        "1.3b": (1.2e9, 1.45e9),
    }
    assert set(expected) == set(PRESETS)
    for name, (lo, hi) in expected.items():
        with torch.device("meta"):
            n = Transformer(PRESETS[name]).num_params()
        assert lo <= n <= hi, (name, n)
    assert model_config("124m").n_layer == 12 and model_config("124m").n_embd == 768
    assert model_config("1.3b").n_head == 32 and model_config("350m").n_layer == 24


def test_num_params_counts_tied_matrix_once():
    cfg = ModelConfig(vocab_size=100, block_size=8, n_layer=1, n_head=2, n_embd=16, intermediate_size=32)
    per_layer = 4 * 16 * 16 + 3 * 16 * 32 + 2 * 16
    body = per_layer + 16
    assert Transformer(cfg).num_params() == body + 100 * 16
    assert Transformer(cfg).num_params(non_embedding=True) == body
    untied = Transformer(dataclasses.replace(cfg, tie_embeddings=False))
    assert untied.num_params() == body + 2 * 100 * 16 and untied.num_params(non_embedding=True) == body


@pytest.mark.parametrize("attention", ["mha", "tpa"])
def test_flops_per_token_matches_counted_matmuls(attention):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, attention=attention)
    model = Transformer(cfg)
    idx = torch.randint(0, 256, (2, 64))
    counter = FlopCounterMode(display=False)
    # the math backend spells attention as bmm's, which the counter sees (fused CPU kernels it does not)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(idx).sum().backward()
    measured = counter.get_total_flops() / idx.numel()
    # 6·N counts the norm weights too (nanoGPT's convention), which are no matmul: 0.2% here
    assert measured == pytest.approx(model.flops_per_token(), rel=0.01)


def test_swiglu_default_width():
    assert swiglu_hidden(768) == 2048 and swiglu_hidden(128) == 384 and swiglu_hidden(1024) % 64 == 0
    assert ModelConfig(n_embd=128).resolved_intermediate_size == 384


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_embd=130, n_head=4), "divisible"),
        (dict(attention="mla"), "attention"),
        (dict(attention="mha", n_kv_head=2), "gqa"),
        (dict(attention="gqa", n_kv_head=3), "n_kv_head"),
        (dict(attention="tpa", n_kv_head=2), "tpa"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(head_dim=7), "head_dim"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(logit_softcap=0.0), "logit_softcap must be a finite number > 0"),
        (dict(logit_softcap=float("inf")), "logit_softcap"),
        (dict(logit_softcap=True), "logit_softcap"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**bad)


def test_model_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="124m"):
        model_config("124M")
    with pytest.raises(ValueError, match="n_layers"):
        model_config("tiny", n_layers=3)
    assert model_config("tiny", attention="gqa", n_kv_head=2).kv_heads == 2
    assert ModelConfig.from_dict(model_config("small").to_dict()) == model_config("small")


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_embeddings": False}, {"pad_vocab_to": 64, "vocab_size": 1000}]
)
def test_parameter_count_matches_the_built_model(overrides) -> None:
    from dpls.model.transformer import parameter_count

    cfg = model_config("tiny", **overrides)
    built = sum(p.numel() for p in Transformer(cfg).parameters())
    assert parameter_count(cfg) == built
