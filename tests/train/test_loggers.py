"""Weights & Biases and MLflow beside metrics.jsonl: the same numbers in their own local records
(W&B's offline run file, an MLflow sqlite store), a missing package said before any work, and a
backend out of reach said once while the run goes on. Nothing here reaches the network."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import base_args, make_corpus

from dpls.cli import main
from dpls.runs.checkpoint import list_checkpoints
from dpls.runs.layout import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data") / "chain", train_tokens=6_000, val_tokens=1_000)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """W&B offline whatever a test asks for, its settings kept in the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``): a 7-byte header (":W&B", magic 0xBEE1,
    version 0), then LevelDB's log format (32 KiB blocks of checksum, length, type, data), each
    record a serialised ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<HB", raw[4:7]) == (0xBEE1, 0)
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(raw):
        block_left = 32768 - pos % 32768
        if block_left < 7:  # a block's tail too short for a header is padding
            pos += block_left
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:  # zero padding at the end of a block
            pos += 32768 - pos % 32768
    return records


def logged(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if isinstance(r.get(key), float)}


@pytest.mark.slow
def test_wandb_offline_and_mlflow_sqlite_hold_the_numbers_of_metrics_jsonl(corpus, tmp_path, no_network):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = dict(max_iters=3, eval_interval=2, wandb="offline", wandb_project="proj", run_name="first")
    run = tmp_path / "run"
    assert main(["train", *base_args(corpus, run, mlflow=store, mlflow_experiment="exp", **extra)]) == 0
    rows = read_metrics(run)
    keys = ("loss", "ce", "lr", "grad_norm", "logit_max", "lse_mean", "attn_logit_max", "val_ce", "val_ece")

    # W&B: the offline run under RUN/wandb, its history rows the rows of metrics.jsonl
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(wandb_file)
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[items.pop("_step")] = items
    for key in keys:
        assert {s: h[key] for s, h in history.items() if key in h} == logged(rows, key), key
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.display_name, info.project) == ("first", "proj")
    config = {i.key: json.loads(i.value_json) for i in info.config.update}
    assert config["learning_rate"] == 3e-3 and config["mlflow"] == store and config["max_iters"] == 3

    # MLflow: the run in the sqlite store, each metric's history that of metrics.jsonl
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (found,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert found.info.run_name == "first" and found.info.status == "FINISHED"
    assert found.data.params["learning_rate"] == "0.003" and found.data.params["wandb"] == "offline"
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, key)}
        assert history == pytest.approx(logged(rows, key), rel=1e-12, abs=0), key


@pytest.mark.parametrize(
    ("key", "value", "extra"), [("wandb", "offline", "wandb"), ("mlflow", "sqlite:///x.db", "mlflow")]
)
def test_a_missing_package_names_the_extra_before_any_work(
    corpus, tmp_path, capsys, monkeypatch, key, value, extra
):
    monkeypatch.setitem(sys.modules, extra, None)  # as if not installed
    assert main(["train", *base_args(corpus, tmp_path / "run", **{key: value})]) == 2
    err = capsys.readouterr().err
    assert f"{key}={value} needs the {extra} package" in err and f"pip install 'dpls[{extra}]'" in err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_an_empty_mlflow_uri_is_refused(corpus, tmp_path, capsys):
    assert main(["train", *base_args(corpus, tmp_path / "run", mlflow="")]) == 2
    assert "mlflow must be off or an MLflow tracking URI" in capsys.readouterr().err


@pytest.mark.slow
def test_backends_out_of_reach_are_said_once_and_the_run_goes_on(
    corpus, tmp_path, capsys, monkeypatch, no_network
):
    """MLflow at a port where nothing listens; W&B that cannot log after its first row."""
    import dpls.train.loggers as loggers

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    calls = {"n": 0}
    real_log = loggers.WandbLogger.log

    def flaky(self, row):
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("the W&B server went away\nmore detail")
        real_log(self, row)

    monkeypatch.setattr(loggers.WandbLogger, "log", flaky)
    run = tmp_path / "run"
    extra = dict(max_iters=4, checkpoint_interval=2, wandb="offline", mlflow="http://127.0.0.1:9")
    assert main(["train", *base_args(corpus, run, **extra)]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert len(warnings) == 2, err
    assert (
        "mlflow=http://127.0.0.1:9: did not start" in warnings[0]
        and "the run goes on without it" in warnings[0]
    )
    assert "wandb=offline: logging step 1 failed (ConnectionError: the W&B server went away)" in warnings[1]
    assert calls["n"] == 2  # dropped after its failure
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002", "step_0000004"]


def test_importing_dpls_imports_no_logging_service():
    code = (
        "import sys, dpls, dpls.cli, dpls.train.loggers, dpls.train.trainer\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow', 'swanlab', 'tensorboard')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
