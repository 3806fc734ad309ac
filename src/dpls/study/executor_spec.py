"""Where a study's jobs run: the ``[executor]`` table of a study file and ``--executor`` / ``--workers``.

```toml
[executor]
kind = "slurm"              # sequential (default) | local | slurm | ray
workers = 16                # jobs at once (local: processes; slurm: array tasks at once; ray: CPUs/cpus_per_job)
gpus_per_job = 1            # devices per training run (several: torch.distributed over them)
cpus_per_job = 8            # CPU cores per job, and its torch threads
partition = "gpu"           # slurm only: partition, time limit, account, extra #SBATCH lines
time = "4:00:00"
account = "my-project"
sbatch = ["--qos=high", "--constraint=a100"]
retries = 2                 # more attempts for a job whose worker died (from its latest checkpoint)
# address = "auto"          # ray only: a running cluster ("auto"), or an address; none: a local one
```

The command line wins over the table: ``--executor local`` replaces ``kind`` (and the table's keys
of another kind are then ignored), ``--workers N`` replaces ``workers``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

EXECUTORS = ("sequential", "local", "slurm", "ray")
# Keys of the table, and the executors each applies to.
KEY_KINDS: dict[str, tuple[str, ...]] = {
    "kind": EXECUTORS,
    "workers": ("local", "slurm", "ray"),
    "gpus_per_job": ("local", "slurm", "ray"),
    "cpus_per_job": ("local", "slurm", "ray"),
    "retries": ("local", "slurm", "ray"),
    "partition": ("slurm",),
    "time": ("slurm",),
    "account": ("slurm",),
    "sbatch": ("slurm",),
    "address": ("ray",),
}
DEFAULT_RETRIES = 2
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?$")  # [D-]H:MM[:SS]


@dataclass(frozen=True)
class ExecutorSpec:
    """A checked ``[executor]`` table (``None``: the executor's default)."""

    kind: str = "sequential"
    workers: int | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    retries: int = DEFAULT_RETRIES
    partition: str | None = None
    time_min: int | None = None
    account: str | None = None
    sbatch: tuple[str, ...] = ()
    address: str | None = None
    wait: bool = False  # slurm: block until every job ended (`--wait`); else submit and return

    def with_command_line(self, kind: str | None, workers: int | None, wait: bool = False) -> ExecutorSpec:
        """The table with ``--executor``, ``--workers`` and ``--wait`` applied."""
        spec = self
        if kind is not None and kind != spec.kind:
            if kind not in EXECUTORS:
                raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
            kept = {
                k: getattr(spec, _field(k)) for k, kinds in KEY_KINDS.items() if kind in kinds and k != "kind"
            }
            spec = ExecutorSpec(kind=kind, **{_field(k): v for k, v in kept.items()})
        if workers is not None:
            if spec.kind == "sequential":
                raise ValueError("--workers needs a parallel executor: add --executor local (or slurm, ray)")
            spec = replace(spec, workers=_positive(workers, "--workers"))
        if wait:
            spec = replace(spec, wait=True)
        return spec


def _field(key: str) -> str:
    return "time_min" if key == "time" else key


def _positive(value: Any, where: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def slurm_minutes(value: Any) -> int:
    """A Slurm time limit as minutes: an integer of minutes, or ``"[D-]H:MM[:SS]"`` (seconds round up)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _positive(value, "[executor] time (minutes)")
    match = _TIME.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f'[executor] time must be minutes (240) or "[days-]hours:minutes[:seconds]" ("4:00:00"), got {value!r}'
        )
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    return _positive(total, "[executor] time (minutes)")


def parse_executor(table: Any) -> ExecutorSpec:
    """Check an ``[executor]`` table (as read from TOML) and turn it into an `ExecutorSpec`."""
    if table is None:
        return ExecutorSpec()
    if not isinstance(table, Mapping):
        raise ValueError(f"[executor] must be a table, got {table!r}")
    kind = table.get("kind", "sequential")
    if kind not in EXECUTORS:
        raise ValueError(f"[executor] kind must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    for key in table:
        if key not in KEY_KINDS:
            raise ValueError(f"unknown key {key!r} in [executor]; valid: {', '.join(KEY_KINDS)}")
        if kind not in KEY_KINDS[key]:
            raise ValueError(
                f"[executor] {key} applies to {' and '.join(KEY_KINDS[key])}, not to kind = {kind!r}"
            )
    values: dict[str, Any] = {"kind": kind}
    for key in ("workers", "gpus_per_job", "cpus_per_job"):
        if key in table:
            values[key] = _positive(
                table[key], f"[executor] {key}", minimum=0 if key == "gpus_per_job" else 1
            )
    if "retries" in table:
        values["retries"] = _positive(table["retries"], "[executor] retries", minimum=0)
    for key in ("partition", "account", "address"):
        if key in table:
            if not isinstance(table[key], str) or not table[key]:
                raise ValueError(f"[executor] {key} must be a non-empty string, got {table[key]!r}")
            values[key] = table[key]
    if "time" in table:
        values["time_min"] = slurm_minutes(table["time"])
    if "sbatch" in table:
        lines = _lines(table["sbatch"])
        for line in lines:
            sbatch_option(line)  # each must read as an option
        values["sbatch"] = tuple(lines)
    return ExecutorSpec(**values)


def _lines(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f'[executor] sbatch must be a list of sbatch options ("--qos=high"), got {value!r}')
    return [v.strip() for v in value]


def sbatch_option(line: str) -> tuple[str, str | bool]:
    """``"--qos=high"`` (or ``"#SBATCH --qos high"``) → ``("qos", "high")``; a bare flag → ``(name, True)``."""
    text = line.removeprefix("#SBATCH").strip()
    match = re.match(r"^--([A-Za-z][\w-]*)(?:[= ](.+))?$", text)
    if match is None:
        raise ValueError(
            f'[executor] sbatch: {line!r} is not an sbatch option; write it as "--name=value" or "--flag"'
        )
    name, value = match.groups()
    return name, True if value is None else value.strip()
