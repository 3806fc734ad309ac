"""Where a study's jobs run: the [executor] table, the graph of jobs, the runner's retries, and
the same numbers from every executor (sequential, local workers, Ray, submitit's stand-in for
Slurm); the Slurm submission itself against stand-ins for sbatch, srun and sacct."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from executor_helpers import FileJob, SummaryJob

from dpls._io import exclusive_lock
from dpls.study.executor_spec import ExecutorSpec, parse_executor, slurm_minutes
from dpls.study.executors import LocalExecutor, require
from dpls.study.executors.slurm import SlurmExecutor
from dpls.study.graph import build_graph
from dpls.study.plan import plan_study
from dpls.study.progress import StudyView, last_step
from dpls.study.runner import Driver, StudyIncomplete, run_study
from dpls.study.spec import parse_spec

# -- the [executor] table ----------------------------------------------------------------------


def test_executor_table_is_checked_and_the_command_line_wins():
    spec = parse_executor(
        {
            "kind": "slurm",
            "workers": 8,
            "gpus_per_job": 2,
            "time": "1-02:30:10",
            "sbatch": ["--qos=high", "--exclusive"],
        }
    )
    assert (spec.kind, spec.workers, spec.gpus_per_job, spec.time_min) == ("slurm", 8, 2, 26 * 60 + 31)
    assert slurm_minutes(240) == 240 and slurm_minutes("4:00") == 240
    # --executor replaces the kind; keys of another kind are dropped, shared ones kept
    local = spec.with_command_line("local", 3)
    assert (local.kind, local.workers, local.gpus_per_job, local.time_min, local.sbatch) == (
        "local",
        3,
        2,
        None,
        (),
    )
    assert parse_executor(None).kind == "sequential"
    for table, message in [
        ({"kind": "pbs"}, "kind must be one of sequential, local, slurm, ray"),
        ({"kind": "local", "partition": "gpu"}, "partition applies to slurm, not to kind = 'local'"),
        ({"kind": "slurm", "workrs": 2}, "unknown key 'workrs'"),
        ({"kind": "local", "workers": 0}, "workers must be an integer >= 1"),
        ({"kind": "slurm", "time": "four hours"}, "time must be minutes"),
        ({"kind": "slurm", "sbatch": ["qos high"]}, "not an sbatch option"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_executor(table)
    with pytest.raises(ValueError, match="--workers needs a parallel executor"):
        ExecutorSpec().with_command_line(None, 2)


def test_a_missing_engine_names_its_extra(monkeypatch):
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(
        importlib,
        "import_module",
        lambda name: (_ for _ in ()).throw(ImportError(name)) if name == "ray" else real(name),
    )
    with pytest.raises(
        ValueError, match=r"the ray executor needs ray, which is not installed: pip install 'dpls\[ray\]'"
    ):
        require("ray", "ray", "ray")


def test_local_workers_split_the_gpus_or_the_cores(monkeypatch):
    import dpls.study.executors.local as local

    monkeypatch.setattr(local, "visible_gpus", lambda: ["0", "1", "2", "3"])
    ex = LocalExecutor(ExecutorSpec("local", gpus_per_job=2))
    assert ex.devices == ["0,1", "2,3"] and "2 workers, 2 GPU(s) each" in ex.describe()
    with pytest.raises(ValueError, match="3 workers × 2 GPUs per job need 6 GPUs"):
        LocalExecutor(ExecutorSpec("local", workers=3, gpus_per_job=2))
    monkeypatch.setattr(local, "visible_gpus", lambda: [])
    monkeypatch.setattr(local, "usable_cores", lambda: 8)
    ex = LocalExecutor(ExecutorSpec("local", workers=3))
    assert ex.threads == 2 and ex.devices == [None] * 3 and "8 cores split between them" in ex.describe()


# -- the graph ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from dpls.data.prepare import prepare_stdlib

    out = tmp_path_factory.mktemp("corpus") / "data"
    prepare_stdlib(out, vocab_size=512, max_files=40, max_bpe_chars=200_000, progress=False)
    return out


def tiny(out: Path, data: Path, **changes) -> dict:
    """The smallest study that still pairs: 2 arms × 2 seeds forked from a 3-step trunk, 2 steps each."""
    spec = {
        "name": "tiny",
        "out_dir": str(out),
        "data_dir": str(data),
        "fork_step": 3,
        "seeds": [0, 1],
        "iters_per_arm": 2,
        "train": {
            "model": "tiny",
            "n_layer": 1,
            "n_embd": 32,
            "n_head": 2,
            "block_size": 16,
            "batch_size": 2,
            "eval_interval": 2,
            "eval_tokens": 256,
            "log_interval": 1,
            "warmup_iters": 1,
        },
        "arms": [
            {"name": "ce", "loss": "ce"},
            {"name": "dpls", "loss": "dpls", "dpls_epsilon": 0.1, "dpls_top_k": 5},
        ],
        "eval": {"tokens": 512, "batch_size": 4, "samples": 2, "sample_tokens": 4, "sample_prompt_tokens": 4},
    }
    spec.update(changes)
    return spec


def test_the_plan_as_a_graph_of_jobs(tmp_path, corpus):
    graph = build_graph(plan_study(parse_spec(tiny(tmp_path / "s", corpus))))
    assert list(graph.jobs) == [
        "train:trunk",
        "train:ce/seed0",
        "train:dpls/seed0",
        "fork:seed1",
        "train:ce/seed1",
        "train:dpls/seed1",
        "eval:ce/seed0",
        "eval:dpls/seed0",
        "eval:ce/seed1",
        "eval:dpls/seed1",
        "report",
    ]
    deps = {name: job.deps for name, job in graph.jobs.items()}
    assert deps["train:ce/seed0"] == ("train:trunk",) and deps["fork:seed1"] == ("train:trunk",)
    assert deps["train:ce/seed1"] == ("fork:seed1",) and deps["eval:ce/seed1"] == ("train:ce/seed1",)
    assert set(deps["report"]) == {n for n in graph.jobs if n.startswith(("train:", "eval:")) and "seed" in n}
    assert graph.jobs["fork:seed1"].inline and graph.jobs["report"].inline
    # a sweep from scratch: no trunk, and an evaluation waits for every baseline run (they decide
    # the value the report compares at)
    sweep = tiny(tmp_path / "w", corpus, fork_step=None, seeds=[0], sweep={"learning_rate": [1e-3, 1e-2]})
    graph = build_graph(plan_study(parse_spec(sweep)))
    assert graph.jobs["train:dpls/learning_rate_0.01/seed0"].deps == ()
    assert graph.jobs["eval:dpls/learning_rate_0.01/seed0"].deps == (
        "train:dpls/learning_rate_0.01/seed0",
        "train:ce/learning_rate_0.001/seed0",
        "train:ce/learning_rate_0.01/seed0",
    )
    assert not graph.jobs["eval:ce/learning_rate_0.001/seed0"].chainable()


# -- the runner: retries, failures, the lock ------------------------------------------------------


def _kill_when_ready(pid_file: Path) -> threading.Thread:
    def kill() -> None:
        for _ in range(600):
            if pid_file.is_file() and pid_file.read_text():
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_a_killed_worker_is_retried_and_a_failing_job_is_reported_with_its_log(tmp_path):
    from dpls.study.graph import JobGraph

    graph = JobGraph()
    graph.add(FileJob("a", (), tmp_path, doomed_attempts=1))  # its first worker is killed (kill -9)
    graph.add(FileJob("b", (), tmp_path))
    graph.add(FileJob("c", ("a",), tmp_path))
    graph.add(FileJob("d", (), tmp_path, doomed_attempts=9, crash=True))  # crashes every time
    graph.add(FileJob("e", ("d",), tmp_path))
    graph.add(SummaryJob("f", ("c", "e"), tmp_path))
    killer = _kill_when_ready(tmp_path / "a.pid")
    executor = LocalExecutor(ExecutorSpec("local", workers=2, cpus_per_job=1))
    try:
        with pytest.raises(StudyIncomplete) as err:
            Driver(graph, executor, StudyView("t", len(graph), enabled=False), retries=1).run()
    finally:
        executor.close()
    killer.join()
    assert [(tmp_path / f"{n}.attempts").read_text() for n in "abcd"] == ["xx", "x", "x", "xx"]
    assert {p.stem for p in tmp_path.glob("*.out")} == {"a", "b", "c", "f"}  # e never ran; f ran anyway
    message = str(err.value)
    assert "2 job(s) failed: d: its worker process" in message and "(2 attempts)" in message
    assert "e: not run: d failed" in message


def test_a_second_study_process_on_one_folder_is_refused(tmp_path, corpus, capsys):
    from dpls.cli import main

    study = tmp_path / "s.toml"
    study.write_text(
        f'name = "tiny"\ndata_dir = "{corpus}"\nseeds = [0]\niters_per_arm = 1\n[[arms]]\nname = "ce"\nloss = "ce"\n'
    )
    with exclusive_lock(tmp_path / "out", "study"):  # another dpls study holds it
        assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"study {tmp_path / 'out'} is being written by another dpls process (pid {os.getpid()})" in err
    assert not (tmp_path / "out" / "study_state.json").exists()


# -- the progress view -------------------------------------------------------------------------


class _Terminal:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_progress_shows_each_running_run_with_its_step(tmp_path, corpus):
    from dpls.study.executors.base import Handle

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n{"step": 5, "loss": 0.9}\n{"step": 7, "lo')
    assert last_step(run) == 5  # a half-written row is not read
    graph = build_graph(plan_study(parse_spec(tiny(tmp_path / "s", corpus))))
    job = graph.jobs["train:ce/seed0"]
    job.study_run.run_dir = run  # type: ignore[attr-defined]
    terminal = _Terminal()
    view = StudyView("tiny", len(graph), stream=terminal)  # type: ignore[arg-type]
    handle = Handle(job, 1, where="pid 42")
    view.refresh([handle], {"done": 2, "running": 1, "waiting": 8}, steps_left=4)
    (run / "metrics.jsonl").write_text('{"step": 3}\n{"step": 4}\n')
    time.sleep(0.05)
    view.refresh([handle], {"done": 2, "running": 1, "waiting": 8}, steps_left=4)
    assert "2 done, 1 running, 0 failed, 8 waiting of 11 jobs" in terminal.text
    assert "ce/seed0: step 5/5 [pid 42]" in terminal.text
    assert "\x1b[2F\x1b[J" in terminal.text  # the block is redrawn in place


# -- the same numbers whatever runs them ----------------------------------------------------------

TIMING = {"tokens_per_s", "mfu", "elapsed_s", "cost", "execution", "runs", "seconds", "started", "pid"}


def _numbers(study: Path) -> dict:
    """Every number a study leaves, but measured times and where files are."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in TIMING}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    out = {"summary": strip(json.loads((study / "report" / "summary.json").read_text()))}
    for run in sorted(study.glob("arms/*/seed*")):
        rel = run.relative_to(study).as_posix()
        out[rel] = [strip(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for name in ("metrics.json", "samples.json"):
            out[f"{rel}/{name}"] = strip(json.loads((run / "eval" / name).read_text()))
    return out


@pytest.mark.slow
def test_same_numbers_from_every_executor(tmp_path, corpus, one_thread):
    """Sequential, two local workers, Ray (a local cluster of 2 CPUs) and submitit's in-process
    stand-in for Slurm, one thread per run: every number identical."""
    pytest.importorskip("ray")
    pytest.importorskip("submitit")
    reference = run_study(parse_spec(tiny(tmp_path / "seq", corpus)), progress=False)
    assert reference is not None
    expected = _numbers(tmp_path / "seq")
    assert len(expected) == 1 + 4 * 3 and expected["summary"]["paired"] is True

    run_study(
        parse_spec(tiny(tmp_path / "local", corpus)),
        progress=False,
        executor=ExecutorSpec("local", workers=2, cpus_per_job=1),
    )
    run_study(
        parse_spec(tiny(tmp_path / "ray", corpus)),
        progress=False,
        executor=ExecutorSpec("ray", workers=2, cpus_per_job=1),
    )
    slurm = SlurmExecutor(ExecutorSpec("slurm", wait=True), tmp_path / "slurm", cluster="debug")
    run_study(parse_spec(tiny(tmp_path / "slurm", corpus)), progress=False, executor=slurm)
    for name, executor in [("local", "local"), ("ray", "ray"), ("slurm", "slurm")]:
        study = tmp_path / name
        assert _numbers(study) == expected, name
        summary = json.loads((study / "report" / "summary.json").read_text())
        assert summary["execution"]["executor"] == executor and summary["execution"]["threads_per_run"] == [1]
        jobs = json.loads((study / "arms" / "dpls" / "seed1" / "study_jobs.json").read_text())
        assert [(j["kind"], j["executor"], j["threads"], j["status"]) for j in jobs] == [
            ("train", executor, 1, "done"),
            ("eval", executor, 1, "done"),
        ]
        assert "train:dpls/seed1: done" in (study / "arms" / "dpls" / "seed1" / "train.log").read_text()


# -- faults: kill -9 of a worker mid-run, Ctrl-C, and finishing on another executor ---------------


@pytest.mark.slow
def test_killed_worker_and_ctrl_c_leave_every_run_resumable(tmp_path, corpus):
    """A worker killed mid-run: its run resumes from its latest checkpoint and the study goes on.
    Ctrl-C then stops the workers (they save); the study is finished by the sequential executor."""
    data = tiny(
        tmp_path / "out",
        corpus,
        fork_step=None,
        seeds=[0],
        iters_per_arm=400,
        eval={"tokens": 256, "samples": 0},
    )
    data["train"].update(checkpoint_interval=25, log_interval=25, eval_interval=400)
    study = tmp_path / "s.toml"
    study.write_text(_toml(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "dpls",
        "study",
        str(study),
        "--executor",
        "local",
        "--workers",
        "2",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # As from a terminal: a suite started in the background (`make test &`, nohup) inherits an
        # ignored SIGINT, which Python keeps, and the study would never see the Ctrl-C below.
        preexec_fn=_sigint_as_from_a_terminal,
    )
    ce, dpls = tmp_path / "out" / "arms" / "ce" / "seed0", tmp_path / "out" / "arms" / "dpls" / "seed0"
    _wait_for(lambda: (ce / "checkpoints" / "step_0000025").is_dir())
    os.kill(json.loads((ce / "study_jobs.json").read_text())[-1]["pid"], signal.SIGKILL)
    _wait_for(lambda: len(json.loads((ce / "study_jobs.json").read_text())) == 2)  # retried
    _wait_for(
        lambda: (
            (ce / "checkpoints" / "step_0000050").is_dir() or (ce / "checkpoints" / "step_0000075").is_dir()
        )
    )
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group, as a terminal sends it
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "retrying: its worker process" in out and "trying again from its latest checkpoint" in out
    log = (ce / "train.log").read_text()
    assert "attempt 2" in log and "resume run" in log  # the retry continued the run in place
    report = run_study(parse_spec(data), progress=False)  # finished here, sequentially
    assert report is not None and report.is_file()
    for run in (ce, dpls):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if "loss" in r]
        assert steps == sorted(set(steps)) and steps[-1] == 400  # nothing trained twice, nothing lost


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _toml(data: dict) -> str:
    """A flat study dict (as the tests build them) as a study file."""

    def value(v) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [
        f"{k} = {value(v)}"
        for k, v in data.items()
        if v is not None and (not isinstance(v, dict | list) or k == "seeds")
    ]
    for table in ("train", "eval"):
        lines += [f"[{table}]", *(f"{k} = {value(v)}" for k, v in data.get(table, {}).items())]
    for arm in data["arms"]:
        lines += ["[[arms]]", *(f"{k} = {value(v)}" for k, v in arm.items())]
    return "\n".join(lines) + "\n"


# -- Slurm: what is submitted, and a rerun that collects -------------------------------------------


def _fake_slurm(bin_dir: Path, record: Path, states: Path) -> None:
    """sbatch that keeps each script and answers with a new job id, srun, and sacct answering from
    ``states`` (a JSON map job id → state; RUNNING for the others and for every array task)."""
    bin_dir.mkdir()
    sbatch = (
        f'n=$(ls {record} | wc -l); n=$((n + 1)); cp "$1" {record}/$n.sh; echo "Submitted batch job $n"\n'
    )
    sacct = f"""import json, sys
states = json.loads(open({str(states)!r}).read())
print("JobID|State|NodeList")
ids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
for job in ids:
    print(f"{{job}}|{{states.get(job, 'RUNNING')}}|node1")
    for task in range(4):
        print(f"{{job}}_{{task}}|{{states.get(f'{{job}}_{{task}}', 'RUNNING')}}|node1")
"""
    for name, body in (
        ("sbatch", "#!/bin/sh\n" + sbatch),
        ("srun", "#!/bin/sh\nexit 0\n"),
        ("sacct", f"#!{sys.executable}\n" + sacct),
    ):
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_submits_arrays_with_dependencies_and_a_rerun_collects(tmp_path, corpus, monkeypatch):
    pytest.importorskip("submitit")
    import submitit

    record, states = tmp_path / "submitted", tmp_path / "states.json"
    record.mkdir()
    states.write_text("{}")
    _fake_slurm(tmp_path / "bin", record, states)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(submitit.SlurmJob, "watcher", submitit.slurm.slurm.SlurmInfoWatcher(delay_s=0))
    monkeypatch.setattr(submitit.SlurmJob, "_results_timeout_s", 0)  # no shared file system to wait for
    executor = {
        "kind": "slurm",
        "partition": "gpu",
        "time": "1:30:00",
        "cpus_per_job": 2,
        "account": "lab",
        "sbatch": ["--qos=high"],
    }
    spec = parse_spec(tiny(tmp_path / "out", corpus, executor=executor))
    assert run_study(spec, progress=False) is None  # submitted; this process leaves
    scripts = [(record / f"{i}.sh").read_text() for i in (1, 2, 3)]
    assert len(list(record.iterdir())) == 3
    for text in scripts:
        for line in ("--partition=gpu", "--time=90", "--cpus-per-task=2", "--account=lab", "--qos=high"):
            assert f"#SBATCH {line}" in text
    trunk, arms, evals = scripts
    assert "--array" not in trunk and "--dependency" not in trunk and "#SBATCH --job-name=dpls-train" in trunk
    assert "#SBATCH --array=0-3%4" in arms and "#SBATCH --dependency=afterok:1" in arms  # after the trunk
    assert "#SBATCH --kill-on-invalid-dep=yes" in arms
    assert "#SBATCH --array=0-3%4" in evals and "#SBATCH --dependency=aftercorr:2" in evals  # task by task
    jobs = json.loads((tmp_path / "out" / "slurm" / "jobs.json").read_text())
    assert jobs["train:trunk"]["id"] == "1" and jobs["eval:dpls/seed1"]["id"] == "3_3"
    assert not (tmp_path / "out" / "report").exists()

    # Run again while the queue still holds them: nothing is submitted twice, nothing is trained here.
    assert run_study(spec, progress=False) is None
    assert len(list(record.iterdir())) == 3
    # The trunk's node failed: the next run collects it and submits it again, its second attempt.
    states.write_text(json.dumps({"1": "NODE_FAIL"}))
    assert run_study(spec, progress=False) is None
    assert len(list(record.iterdir())) == 4
    again = (record / "4.sh").read_text()
    assert "#SBATCH --job-name=dpls-train" in again and "--dependency" not in again and "--array" not in again
    jobs = json.loads((tmp_path / "out" / "slurm" / "jobs.json").read_text())
    assert jobs["train:trunk"] == {"id": "4", "attempt": 2, "tasks": 1}
    # A run over two GPUs: one job of two tasks (a rank each); an evaluation takes one GPU.
    gpus = parse_spec(
        tiny(tmp_path / "gpus", corpus, seeds=[0], executor={"kind": "slurm", "gpus_per_job": 2})
    )
    assert run_study(gpus, progress=False) is None
    trunk, arms, evals = ((record / f"{i}.sh").read_text() for i in (5, 6, 7))
    assert "#SBATCH --gpus-per-node=2" in trunk and "#SBATCH --ntasks-per-node=2" in trunk
    assert "#SBATCH --gpus-per-node=2" in arms and "#SBATCH --ntasks-per-node=2" in arms
    assert "#SBATCH --gpus-per-node=1" in evals and "#SBATCH --ntasks-per-node=1" in evals
    assert json.loads((tmp_path / "gpus" / "slurm" / "jobs.json").read_text())["train:trunk"]["tasks"] == 2
    # ... and another executor is refused while they run.
    with pytest.raises(ValueError, match=r"Slurm jobs still queued or running \(4, 2_0, 2_1, 2_2, 2_3"):
        run_study(spec, progress=False, executor=ExecutorSpec("local", workers=2))
