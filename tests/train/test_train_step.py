"""One optimizer step without host-device syncs: the same numbers as a step that reads everything.

`train_step` leaves the step's values on the device and skips a non-finite update on the device
(the fused AdamW's ``found_inf``). The reference below is the step as it was written before:
every value read on the host, the skip decided there by not calling ``optimizer.step()``. Both
run from the same build with the same injected NaNs and must agree bit for bit.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from test_train import base_args, make_corpus, run_train, train_rows

from dpls.distributed.context import DistContext
from dpls.runs.checkpoint import load_model
from dpls.train.config import load_config
from dpls.train.optim import cosine_lr, set_hyperparameters
from dpls.train.plan import plan_run
from dpls.train.step import STEP_VALUES, train_step
from dpls.train.trainer import build

pytestmark = pytest.mark.usefixtures("one_thread")

NAN_STEPS = "3,5-6"  # 1-based optimizer steps whose loss is replaced by NaN


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("data") / "chain", train_tokens=8_000, val_tokens=1_000)


def host_decided_step(parts, cfg, step: int, lr: float) -> dict[str, float]:
    """The step with every value read on the host and the skip decided there."""
    micro_steps = cfg.gradient_accumulation_steps
    assert parts.micro_steps == micro_steps  # one rank
    set_hyperparameters(parts.optimizer, lr=lr)
    sums = torch.zeros(3)
    for _ in range(micro_steps):
        x, y = next(parts.batches)
        out = parts.wrapped(x, y, step)
        loss = parts.faults.nan(out.loss, step + 1, 0)
        (loss / micro_steps).backward()
        eps = torch.tensor(float(out.epsilon))
        sums += torch.stack([loss.detach().float(), out.ce.float(), eps])
    norm = float(torch.nn.utils.clip_grad_norm_(parts.params, cfg.grad_clip, foreach=True))
    loss, ce, eps = (sums / micro_steps).tolist()
    skip = not (math.isfinite(loss) and math.isfinite(norm))
    if not skip:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "ce": ce, "epsilon": eps, "grad_norm": norm, "skipped": float(skip)}


def _build(corpus, out, monkeypatch, **extra):
    monkeypatch.setenv("DPLS_INJECT_NAN_AT_STEP", NAN_STEPS)
    cfg = load_config(overrides=base_args(corpus, out, **extra))
    ctx = DistContext(device=torch.device("cpu"))
    plan = plan_run(cfg, ctx.world_size, ctx.device)
    return plan.cfg, build(plan, ctx)


@pytest.mark.parametrize(
    "extra",
    [
        {"loss": "ce", "grad_clip": 1.0},
        {"loss": "dpls", "dpls_top_k": 8, "dpls_epsilon_mode": "confidence", "grad_clip": 0.05},
    ],
    ids=["ce", "dpls-confidence"],
)
def test_device_decided_step_equals_the_host_decided_one_bit_for_bit(corpus, tmp_path, monkeypatch, extra):
    steps = 8
    extra = {"max_iters": steps, "warmup_iters": 2, "lr_decay_iters": steps, **extra}
    cfg, parts = _build(corpus, tmp_path / "a", monkeypatch, **extra)
    _, ref = _build(corpus, tmp_path / "b", monkeypatch, **extra)
    assert getattr(parts.optimizer, "_step_supports_amp_scaling", False), "expected the fused AdamW"
    lr_args = {
        "learning_rate": cfg.learning_rate,
        "min_lr": cfg.min_lr,
        "warmup_iters": 2,
        "lr_decay_iters": steps,
    }
    skipped = []
    for step in range(steps):
        lr = cosine_lr(step, **lr_args)
        got = train_step(parts, step, lr, stop_requested=False).read()
        want = host_decided_step(ref, cfg, step, lr)
        assert list(got) == list(STEP_VALUES)
        for k in STEP_VALUES:  # NaN == NaN for this comparison: both must be NaN
            assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])), (step, k, got, want)
        skipped.append(int(got["skipped"]))
    assert skipped == [0, 0, 1, 0, 1, 1, 0, 0]  # the injected steps, and only they
    for (name, a), b in zip(parts.model.state_dict().items(), ref.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    sa, sb = parts.optimizer.state_dict()["state"], ref.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("step", "exp_avg", "exp_avg_sq"):  # the skipped steps left the moments and the count alone
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert int(sa[0]["step"]) == steps - 3


def test_non_log_steps_never_read_a_tensor_on_the_host(corpus, tmp_path, monkeypatch):
    """What a GPU would wait for: every Tensor -> Python conversion, counted during a step."""
    _, parts = _build(
        corpus,
        tmp_path / "r",
        monkeypatch,
        loss="dpls",
        dpls_top_k=8,
        dpls_epsilon_mode="entropy",
        max_iters=4,
    )
    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_name
            if caller != "_zero_ignored_nonfinite_rows":  # chunked's CPU-only clean-up: no device there
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for step in range(3):  # step 3 is a NaN step: skipped on the device too
        stats = train_step(parts, step, 1e-3, stop_requested=False)
    assert reads == [], reads
    assert stats.read()["skipped"] == 1.0 and reads == ["tolist"]


def test_log_interval_only_changes_which_rows_are_written(corpus, tmp_path, monkeypatch):
    """Skipped steps between rows are counted in the next row; the weights are the same."""
    monkeypatch.setenv("DPLS_INJECT_NAN_AT_STEP", "4")
    extra = {"max_iters": 9, "eval_interval": 100, "checkpoint_interval": 100}
    every = run_train(corpus, tmp_path / "every", log_interval=1, **extra)
    third = run_train(corpus, tmp_path / "third", log_interval=3, **extra)
    a, b = train_rows(every), train_rows(third)
    assert sorted(b) == [3, 6, 9]
    assert [b[s]["skipped"] for s in (3, 6, 9)] == [0, 1, 0]
    assert [a[s]["skipped"] for s in range(1, 10)] == [0, 0, 0, 1, 0, 0, 0, 0, 0]
    for s in (3, 6, 9):
        for k in ("loss", "ce", "epsilon", "grad_norm", "lr"):
            assert a[s][k] == b[s][k], (s, k)
    for x, y in zip(load_model(every).parameters(), load_model(third).parameters(), strict=True):
        assert torch.equal(x, y)
