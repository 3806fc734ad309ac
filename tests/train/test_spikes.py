"""The loss-spike counter against a plain Python/NumPy reference of OLMo-core's rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpls.train.config import TrainConfig
from dpls.train.spikes import SpikeCounter
from spike_reference import reference_counts


def counts(losses: list[float], window: int = 128, sigmas: float = 6.0) -> list[int]:
    counter = SpikeCounter(window, sigmas)
    out = []
    for x in losses:
        assert counter.update(torch.tensor(x, dtype=torch.float32)) is None
        out.append(counter.count())
    return out


def as_float32(values: np.ndarray) -> list[float]:
    """What the trainer feeds the counter: float32 losses."""
    return values.astype(np.float32).astype(np.float64).tolist()


def test_flat_loss_with_one_spike_counts_one():
    rng = np.random.default_rng(0)
    losses = 3.0 + 0.01 * rng.standard_normal(400)
    losses[300] += 0.5  # 50 σ
    losses = as_float32(losses)
    got = counts(losses)
    assert got == reference_counts(losses, 128, 6.0)
    assert got[299] == 0 and got[300] == 1 and got[-1] == 1


def test_slowly_rising_loss_counts_nothing():
    losses = as_float32(2.0 + 0.001 * np.arange(500))  # each loss ≈ 1.75 σ above the window's mean
    assert counts(losses)[-1] == 0 == reference_counts(losses, 128, 6.0)[-1]


def test_nothing_is_judged_before_the_window_is_full():
    rng = np.random.default_rng(1)
    losses = as_float32(3.0 + 0.01 * rng.standard_normal(130))
    early = [*losses[:127], 100.0]  # the 128th loss: only 127 before it
    assert counts(early)[-1] == 0
    full = [*losses[:128], 100.0]  # the 129th: 128 before it
    assert counts(full)[-1] == 1


def test_a_constant_window_judges_nothing():
    assert counts([2.0] * 10 + [5.0], window=4)[-1] == 0


def test_the_spike_joins_the_window_and_a_lasting_jump_counts_once():
    losses = as_float32(np.r_[3.0 + 0.01 * np.sin(np.arange(50)), np.full(50, 4.0)])
    got = counts(losses, window=8, sigmas=6.0)
    assert got[-1] == 1 == reference_counts(losses, 8, 6.0)[-1]


def test_non_finite_losses_are_neither_spikes_nor_in_the_window():
    rng = np.random.default_rng(2)
    losses = as_float32(3.0 + 0.01 * rng.standard_normal(60))
    losses[20] = math.nan
    losses[30] = math.inf
    losses[40] = 3.5
    got = counts(losses, window=8, sigmas=6.0)
    assert got == reference_counts(losses, 8, 6.0) and got[-1] == 1


@pytest.mark.parametrize("seed", range(5))
def test_noisy_sequences_match_the_reference_step_by_step(seed):
    rng = np.random.default_rng(seed)
    # a falling curve with heavy-tailed noise: spikes of every size near the threshold
    losses = as_float32(4.0 * np.exp(-np.arange(300) / 1000) + 0.05 * rng.standard_t(2, 300))
    got = counts(losses, window=16, sigmas=3.0)
    assert got == reference_counts(losses, 16, 3.0)
    assert got[-1] > 0


def test_state_dict_resumes_exactly():
    rng = np.random.default_rng(3)
    losses = as_float32(3.0 + 0.05 * rng.standard_t(2, 120))
    straight = SpikeCounter(16, 2.0)
    want = []
    for x in losses:
        straight.update(torch.tensor(x))
        want.append(straight.count())
    for cut in (0, 5, 16, 70):  # before, at and after the window fills
        first = SpikeCounter(16, 2.0)
        for x in losses[:cut]:
            first.update(torch.tensor(x))
        state = first.state_dict()
        assert len(state["spike_losses"]) == min(cut, 16) and state["spike_seen"] == cut
        resumed = SpikeCounter(16, 2.0)
        resumed.load_state_dict(state)
        got = []
        for x in losses[cut:]:
            resumed.update(torch.tensor(x))
            got.append(resumed.count())
        assert got == want[cut:], cut
        assert torch.equal(resumed._losses, straight._losses)


def test_a_state_from_another_window_keeps_its_newest_losses():
    old = SpikeCounter(4, 6.0)
    for x in (1.0, 2.0, 3.0, 4.0, 5.0):
        old.update(torch.tensor(x))
    wider = SpikeCounter(8, 6.0)
    wider.load_state_dict(old.state_dict())
    assert wider.state_dict() == {"spike_losses": [2.0, 3.0, 4.0, 5.0], "spike_seen": 4, "spike_count": 0}
    narrower = SpikeCounter(2, 6.0)
    narrower.load_state_dict(old.state_dict())
    assert narrower.state_dict()["spike_losses"] == [4.0, 5.0]
    assert SpikeCounter(3, 1.0).state_dict() == {"spike_losses": [], "spike_seen": 0, "spike_count": 0}


def test_update_never_reads_the_device(monkeypatch):
    """Only tensor ops: every way of copying a tensor to the host raises while `update` runs."""
    counter = SpikeCounter(8, 2.0)
    losses = [torch.tensor(3.0 + 0.1 * math.sin(i)) for i in range(40)]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("host sync in SpikeCounter.update")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            m.setattr(torch.Tensor, name, refuse)
        for loss in losses:
            counter.update(loss)
    assert counter.count() == reference_counts([float(x) for x in losses], 8, 2.0)[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA sync check needs a GPU")
def test_update_never_syncs_on_cuda():
    counter = SpikeCounter(8, 2.0, device="cuda")
    losses = [torch.tensor(3.0 + 0.1 * math.sin(i), device="cuda") for i in range(40)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for loss in losses:
            counter.update(loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counter.count() == reference_counts([float(x) for x in losses], 8, 2.0)[-1]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("spike_window", 1, "spike_window must be an integer >= 2"),
        ("spike_window", 0, "spike_window must be an integer >= 2"),
        ("spike_sigmas", 0.0, "spike_sigmas must be a finite number > 0"),
        ("spike_sigmas", -1.0, "spike_sigmas must be a finite number > 0"),
        ("spike_sigmas", math.nan, "spike_sigmas must be a finite number > 0"),
        ("spike_sigmas", math.inf, "spike_sigmas must be a finite number > 0"),
    ],
)
def test_config_keys_are_checked(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({key: value})
    with pytest.raises(ValueError, match=message):
        SpikeCounter(value if key == "spike_window" else 8, value if key == "spike_sigmas" else 6.0)


def test_config_defaults_are_olmo_cores():
    cfg = TrainConfig()
    assert (cfg.spike_window, cfg.spike_sigmas) == (128, 6.0)
