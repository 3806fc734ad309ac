"""Fault hooks and the agreed stop, in one process (the multi-rank runs are in test_distributed_train.py)."""

from __future__ import annotations

import errno
import math
import os
import signal

import pytest
import torch

from dpls.distributed import DistContext
from dpls.distributed.faults import (
    ENV_ENOSPC,
    ENV_NAN,
    ENV_RANK,
    Faults,
    StopRequest,
    is_out_of_space,
    parse_steps,
)


def test_parse_steps():
    assert parse_steps("") == frozenset()
    assert parse_steps("7") == {7}
    assert parse_steps("3, 7-9,12") == {3, 7, 8, 9, 12}
    with pytest.raises(ValueError, match="step list"):
        parse_steps("x")
    with pytest.raises(ValueError, match="backwards"):
        parse_steps("9-7")


def test_nan_injection_keeps_graph_and_respects_rank(monkeypatch):
    w = torch.ones(2, requires_grad=True)
    loss = (w * 2).sum()
    monkeypatch.setenv(ENV_NAN, "5-6")
    faults = Faults.from_env()
    assert faults.nan(loss, 4) is loss
    bad = faults.nan(loss, 5)
    assert math.isnan(bad.item()) and bad.requires_grad
    monkeypatch.setenv(ENV_RANK, "1")
    assert math.isnan(faults.nan(loss, 6, rank=0).item())  # read once: a later change does not count
    one_rank = Faults.from_env()
    assert one_rank.nan(loss, 6, rank=0) is loss
    assert math.isnan(one_rank.nan(loss, 6, rank=1).item())
    assert Faults().nan(loss, 5) is loss  # nothing injected by default


def test_enospc_injection(monkeypatch):
    monkeypatch.setenv(ENV_ENOSPC, "10")
    faults = Faults.from_env()
    faults.enospc(9)
    with pytest.raises(OSError) as info:
        faults.enospc(10)
    assert info.value.errno == errno.ENOSPC and is_out_of_space(info.value)


def test_malformed_fault_variables_are_named(monkeypatch):
    monkeypatch.setenv(ENV_NAN, "x")
    with pytest.raises(ValueError, match=ENV_NAN):
        Faults.from_env()
    monkeypatch.setenv(ENV_NAN, "3")
    monkeypatch.setenv(ENV_RANK, "first")
    with pytest.raises(ValueError, match=ENV_RANK):
        Faults.from_env()


def test_out_of_space_found_in_chain():
    try:
        try:
            raise OSError(errno.ENOSPC, "disk full")
        except OSError as inner:
            raise RuntimeError("checkpoint failed") from inner
    except RuntimeError as outer:
        assert is_out_of_space(outer)
    assert not is_out_of_space(RuntimeError("something else"))
    assert not is_out_of_space(OSError(errno.EACCES, "denied"))


def test_stop_request_notes_sigterm_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    ctx = DistContext()
    with StopRequest() as stop:
        assert not stop.requested and not ctx.any_rank(stop.requested)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and ctx.any_rank(stop.requested)
    assert signal.getsignal(signal.SIGTERM) is before
