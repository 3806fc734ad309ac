"""Activation checkpointing: the same losses and gradients bit for bit (eager, CPU), far fewer
tensors kept for the backward, and nothing changed outside training (evaluation, generation)."""

from __future__ import annotations

import pytest
import torch

from dpls.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "mha": {},
    "gqa": {"attention": "gqa", "n_head": 4, "n_kv_head": 2},
    "tpa": {"attention": "tpa"},
    "qk_norm-padded": {"qk_norm": True, "pad_vocab_to": 64},
}


def _model(mode: str, **changes) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        **{"vocab_size": 300, "block_size": 32, "n_layer": 3, "n_head": 2, "n_embd": 32, **changes}
    )
    model = Transformer(cfg)
    with torch.no_grad():  # away from the init: norm gains of exactly 1 would hide a wrong recompute
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.set_activation_checkpointing(mode)
    return model


def _step(model: Transformer, idx: torch.Tensor, target: torch.Tensor):
    """One forward and backward with the attention diagnostics recorded (as on a log step)."""
    model.record_attention_logits(True)
    logits = model(idx)[..., : model.config.vocab_size]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    loss.backward()
    attn = model.attention_logit_max()
    model.record_attention_logits(False)
    return loss.detach(), attn, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("changes", list(VARIANTS.values()), ids=list(VARIANTS))
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_same_losses_and_gradients_bit_for_bit(mode, changes):
    idx, target = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    plain = _model("none", **changes)
    checkpointed = _model(mode, **changes)
    assert [layer.checkpointed for layer in checkpointed.model.layers] == (
        [True, True, True] if mode == "full" else [False, True, False]  # every second block
    )
    want, got = _step(plain, idx, target), _step(checkpointed, idx, target)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(g, w) for g, w in zip(got[2], want[2], strict=True))


def _saved_bytes(model: Transformer, idx: torch.Tensor) -> int:
    """Bytes of the activations a training forward keeps for the backward (parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden_states(idx)
    return sum(kept.values())


def test_checkpointed_blocks_keep_only_their_input():
    idx = torch.randint(0, 300, (4, 32))
    none, selective, full = (_saved_bytes(_model(m, n_layer=4), idx) for m in ("none", "selective", "full"))
    assert full < none / 10  # each block keeps its [B, T, C] input, not its ~34·T·C activations
    assert full < selective < none and selective == pytest.approx(none / 2, rel=0.1)


def test_evaluation_and_generation_are_untouched():
    idx = torch.randint(0, 300, (2, 8))
    plain, full = _model("none").eval(), _model("full").eval()
    with torch.no_grad():
        assert torch.equal(full(idx), plain(idx))
    assert torch.equal(full.generate(idx, 6, temperature=0), plain.generate(idx, 6, temperature=0))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing must be one of none, full, selective"):
        _model("some")
