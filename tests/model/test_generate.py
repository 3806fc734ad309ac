"""Generation: the key/value cache against full recomputation, sampling filters against a
hand-made distribution, determinism, the context limit, and padded vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from dpls.model import ModelConfig, Transformer
from dpls.model.generate import check_sampling, filter_logits, generate_tokens, next_token

pytestmark = pytest.mark.usefixtures("one_thread")

ATTENTIONS = {
    "mha": {},
    "gqa": {"n_kv_head": 2},
    "mqa": {"n_kv_head": 1},
    "tpa": {"tpa_q_rank": 3},
    "gqa-qknorm": {"n_kv_head": 2, "qk_norm": True},
}
KINDS = {"mqa": "gqa", "gqa-qknorm": "gqa"}


def _model(attention: str, seed: int = 0, **overrides) -> Transformer:
    kind = KINDS.get(attention, attention)
    cfg = ModelConfig(
        vocab_size=61, block_size=40, n_layer=2, n_head=4, n_embd=32, attention=kind, **ATTENTIONS[attention]
    )
    cfg = ModelConfig(**{**cfg.to_dict(), **overrides})
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large random weights: peaked, position-dependent predictions
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_cached_logits_equal_full_recomputation(attention):
    """Prefill, a chunk in the middle (shifted causal mask), then one token at a time."""
    model = _model(attention)
    idx = torch.randint(0, 61, (3, 30))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        pieces = [model(idx[:, :9], cache), model(idx[:, 9:10], cache), model(idx[:, 10:17], cache)]
        pieces += [model(idx[:, t : t + 1], cache) for t in range(17, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_generate_with_cache_equals_without(attention):
    model = _model(attention)
    prompt = torch.randint(0, 61, (2, 6))
    runs = [
        model.generate(
            prompt, 25, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(3), use_cache=c
        )
        for c in (True, False)
    ]
    assert runs[0].shape == (2, 31) and torch.equal(runs[0][:, :6], prompt)
    assert torch.equal(runs[0], runs[1])


def test_greedy_is_the_argmax_of_the_full_forward():
    model = _model("mha")
    out = model.generate(torch.tensor([[1, 2, 3]]), 12, temperature=0)
    with torch.no_grad():
        logits = model(out)
    assert torch.equal(out[0, 3:], logits[0, 2:-1].argmax(-1))


@pytest.mark.parametrize("temperature", [1e-40, 1e-45, 1e-320, 5e-324])
def test_any_positive_temperature_is_safe_and_a_tiny_one_is_greedy(temperature):
    """logits / 1e-40 overflows float32 (inf, then NaN probabilities); shifted by their maximum
    first and with the temperature kept at least float32's smallest normal, the limit is greedy."""
    model = _model("mha")
    prompt = torch.tensor([[1, 2, 3]])
    greedy = model.generate(prompt, 12, temperature=0)
    tiny = model.generate(prompt, 12, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny, greedy)
    ties = torch.tensor([[2.0, 5.0, 5.0, -1.0]])
    picks = {
        int(next_token(ties, temperature=temperature, generator=torch.Generator().manual_seed(s)))
        for s in range(20)
    }
    assert picks == {1, 2}  # among the most likely only, ties drawn at random


def test_training_forward_is_unchanged_by_a_used_cache():
    """Generation leaves nothing behind: the cache-free forward gives the same logits after."""
    model = _model("gqa")
    idx = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        before = model(idx)
        model.generate(idx[:, :4], 10, generator=torch.Generator().manual_seed(0))
        after = model(idx)
    assert torch.equal(before, after)


def test_seed_determines_the_samples():
    model = _model("tpa")
    prompt = torch.zeros(4, 1, dtype=torch.long)

    def sample(seed: int) -> torch.Tensor:
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed))

    state = torch.get_rng_state()
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used


# -- filtering against a hand-made distribution ------------------------------------------------

# probabilities 0.4, 0.25, 0.15, 0.12, 0.08, placed at shuffled positions
PROBS = {3: 0.4, 0: 0.25, 4: 0.15, 1: 0.12, 2: 0.08}


def _hand_logits() -> torch.Tensor:
    p = torch.tensor([PROBS[i] for i in range(5)], dtype=torch.float64)
    return (p.log() + 1.7).float()  # a shift: filtering must not depend on it


def _kept(logits: torch.Tensor) -> set[int]:
    return {i for i in range(logits.shape[-1]) if logits[i] > float("-inf")}


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (None, None, {0, 1, 2, 3, 4}),
        (1, None, {3}),
        (2, None, {3, 0}),
        (4, None, {3, 0, 4, 1}),
        (5, None, {0, 1, 2, 3, 4}),
        (None, 0.3, {3}),  # the most likely alone reaches 0.3
        (None, 0.39, {3}),
        (None, 0.41, {3, 0}),  # 0.4 falls just short
        (None, 0.5, {3, 0}),  # 0.4 < 0.5 <= 0.65
        (None, 0.7, {3, 0, 4}),  # 0.65 < 0.7 <= 0.8
        (None, 0.9, {3, 0, 4, 1}),  # 0.8 < 0.9 <= 0.92
        (None, 1.0, {0, 1, 2, 3, 4}),
        (3, 0.45, {3}),  # top-k first, then top-p over the renormalised top 3: 0.4/0.8 = 0.5
        (3, 0.55, {3, 0}),
        (2, 0.99, {3, 0}),  # top-p over the renormalised top-k: 0.4/0.65 + 0.25/0.65 = 1
    ],
)
def test_filter_keeps_the_right_tokens(top_k, top_p, kept):
    logits = _hand_logits()
    out = filter_logits(logits, top_k, top_p)
    assert _kept(out) == kept
    assert torch.equal(out[sorted(kept)], logits[sorted(kept)])  # survivors keep their logits


def test_filter_works_per_row():
    logits = torch.stack([_hand_logits(), _hand_logits().flip(0)])
    out = filter_logits(logits, top_k=2)
    assert _kept(out[0]) == {3, 0} and _kept(out[1]) == {4 - 3, 4 - 0}


def test_sampled_frequencies_follow_the_filtered_distribution():
    """top_p=0.7 at temperature 0.5 keeps {3, 0, 4}, probabilities ∝ p² renormalised."""
    logits = _hand_logits().expand(40_000, 5)
    gen = torch.Generator().manual_seed(0)
    draws = next_token(logits, temperature=0.5, top_p=0.7, generator=gen)
    counts = torch.bincount(draws, minlength=5).double() / draws.numel()
    # temperature first: p^2 ∝ .16, .0625, .0225, ... ; cumulative .6224, .8656 -> top_p 0.7 keeps 3, 0
    sq = {i: p**2 for i, p in PROBS.items()}
    total = sum(sq.values())
    assert sq[3] / total < 0.7 <= (sq[3] + sq[0]) / total
    expected = torch.zeros(5, dtype=torch.float64)
    expected[3], expected[0] = sq[3], sq[0]
    expected /= expected.sum()
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 2.0, 1.9], [5.0, -1.0, 4.0]])
    assert next_token(logits, temperature=0).tolist() == [1, 0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=62), r"top_k must be an integer in \[1, 61\]"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(eos_id=61), "eos_id"),
    ],
)
def test_bad_sampling_arguments_raise_before_any_work(kwargs, match):
    model = _model("mha")
    with pytest.raises(ValueError, match=match):
        generate_tokens(model, torch.zeros(1, 3, dtype=torch.long), 5, **kwargs)


def test_context_limit_is_an_error_not_a_slide():
    model = _model("mha")  # block_size 40
    assert model.generate(torch.zeros(1, 30, dtype=torch.long), 10).shape == (1, 40)
    with pytest.raises(ValueError, match=r"31 tokens.*block_size 40.*at most 9 new tokens"):
        model.generate(torch.zeros(1, 31, dtype=torch.long), 10)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens"):
            model.generate(torch.zeros(1, 3, dtype=torch.long), bad)
    with pytest.raises(ValueError, match="idx"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)


def test_sequences_stop_at_eos():
    """A row that emitted eos_id keeps emitting it; generation stops when every row has."""
    model = _model("mha")
    prompt = torch.tensor([[5], [6]])
    free = model.generate(prompt, 15, temperature=0)
    eos = int(free[0, 4])
    out = model.generate(prompt, 15, temperature=0, eos_id=eos)
    stops = []
    for row in range(2):
        hits = (free[row, 1:] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else 15  # index in `free` of the first eos
        stops.append(stop)
        assert torch.equal(out[row, : stop + 1], free[row, : stop + 1])
        assert torch.all(out[row, stop + 1 :] == eos)
    assert out.shape[1] == 1 + max(stops) and max(stops) < 15


check_sampling()  # the defaults are valid


# -- padded vocabularies --------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_padded_model_equals_unpadded(tie):
    plain = _model("gqa", tie_embeddings=tie)
    padded = Transformer(ModelConfig(**{**plain.config.to_dict(), "pad_vocab_to": 16})).eval()
    assert padded.config.padded_vocab_size == 64 and padded.config.vocab_size == 61
    state = plain.state_dict()
    with torch.no_grad():
        for name, p in padded.state_dict().items():
            p[: state[name].shape[0]].copy_(state[name])
            p[state[name].shape[0] :].normal_(0, 50.0)  # garbage in padded rows must not matter
    idx = torch.randint(0, 61, (2, 15))
    target = torch.randint(0, 61, (2, 15))
    with torch.no_grad():
        a, b = plain(idx), padded(idx)
    assert b.shape == (2, 15, 64) and torch.all(b[..., 61:] == float("-inf"))
    torch.testing.assert_close(b[..., :61], a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.log_softmax(-1)[..., :61], a.log_softmax(-1), atol=1e-5, rtol=1e-5)
    ce = [torch.nn.functional.cross_entropy(x.flatten(0, 1), target.flatten()) for x in (a, b)]
    torch.testing.assert_close(ce[0], ce[1])
    assert padded.output_weight.shape == (61, 32) and padded.output_weight.is_contiguous()
    torch.testing.assert_close(padded.output_weight, plain.output_weight)


def test_padded_init_draws_the_real_rows_like_an_unpadded_model():
    cfg = ModelConfig(vocab_size=61, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(5)
    plain = Transformer(cfg)
    torch.manual_seed(5)
    padded = Transformer(ModelConfig(**{**cfg.to_dict(), "pad_vocab_to": 64}))
    for (name, p), q in zip(plain.state_dict().items(), padded.state_dict().values(), strict=True):
        assert torch.equal(q[: p.shape[0]], p), name
    assert torch.all(padded.model.embed_tokens.weight[61:] == 0)


def test_padded_gradients_match_and_padded_rows_get_none():
    plain = _model("mha", tie_embeddings=True)
    padded = Transformer(ModelConfig(**{**plain.config.to_dict(), "pad_vocab_to": 8}))
    with torch.no_grad():
        for name, p in padded.named_parameters():
            q = dict(plain.named_parameters())[name]
            p.zero_()[: q.shape[0]].copy_(q)
    idx, target = torch.randint(0, 61, (2, 10)), torch.randint(0, 61, (2, 10))
    for m in (plain, padded):
        torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), target.flatten()).backward()
    g_plain, g_pad = plain.model.embed_tokens.weight.grad, padded.model.embed_tokens.weight.grad
    torch.testing.assert_close(g_pad[:61], g_plain, atol=1e-6, rtol=1e-5)
    assert torch.all(g_pad[61:] == 0)


def test_sampling_never_emits_a_padded_id():
    model = _model("mha", pad_vocab_to=64, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight[61:].fill_(100.0)  # huge logits, were they not masked
    out = model.generate(
        torch.zeros(8, 1, dtype=torch.long), 30, temperature=2.0, generator=torch.Generator()
    )
    assert int(out.max()) < 61
    assert int(model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0).max()) < 61


def test_pad_vocab_to_is_validated_and_presets_pad_gpt2():
    from dpls.model import model_config

    with pytest.raises(ValueError, match="pad_vocab_to"):
        ModelConfig(pad_vocab_to=0)
    cfg = model_config("124m")
    assert (cfg.vocab_size, cfg.padded_vocab_size) == (50257, 50304)
    assert model_config("tiny").padded_vocab_size == 8192
