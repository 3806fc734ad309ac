"""``dpls bench loss``: time and memory of one loss forward+backward, as ratios to ``F.cross_entropy``.

Every contender runs on the same logits in the same process, interleaved round-robin over the
repeats (so machine noise hits all alike), and the table reports the median time and its ratio to
``F.cross_entropy`` measured in that same run.

Peak extra memory is what one forward+backward allocates beyond the logits (the gradient
included, since every contender must produce it):

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the step;
* CPU: each contender runs once in a fresh subprocess (``python -m dpls.bench.loss --child``):
  the logits are built, everything is warmed up on a tiny input, the kernel's peak-RSS mark is
  reset (``/proc/self/clear_refs``) and the peak resident set reached during the step
  (``VmHWM``) minus the resident set before it is the peak extra. It counts pages actually
  touched (allocator caches included), so it is an honest upper bound on what the step needed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dpls._io import write_owned_json
from dpls.bench.contenders_gpu import bench_loss_contenders
from dpls.losses import available_impls, dpls_loss
from dpls.losses.cpu_kernel import describe

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BASELINE = "cross_entropy"

Step = Callable[[], None]


@dataclass(frozen=True)
class LossBenchConfig:
    n: int = 4096
    v: int = 32000
    dtype: str = "float32"
    device: str = "cpu"
    top_k: int = 100
    epsilon: float = 0.1
    repeats: int = 5
    impls: tuple[str, ...] | None = None  # None: every available contender
    memory: bool = True
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Contender:
    """``build(logits, target, cfg)`` returns a function running one forward+backward from ``logits``."""

    name: str
    build: Callable[[torch.Tensor, torch.Tensor, LossBenchConfig], Step]
    available: Callable[[torch.device], bool]
    description: str = ""


CONTENDERS: dict[str, Contender] = {}


def register_loss_contender(
    name: str,
    build: Callable[[torch.Tensor, torch.Tensor, LossBenchConfig], Step],
    *,
    available: Callable[[torch.device], bool] = lambda device: True,
    description: str = "",
) -> None:
    CONTENDERS[name] = Contender(name, build, available, description)


def _fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> Step:
    def step() -> None:
        x = logits.detach().requires_grad_(True)
        loss_fn(x).backward()
        x.grad = None

    return step


def _build_ce(logits, target, cfg):
    return _fwd_bwd(lambda x: F.cross_entropy(x.float(), target), logits)


def _build_published(logits, target, cfg):
    """The published DPLS formulation restated: one-hot, a scattered top-k mask and the soft target,
    three dense ``[N, V]`` float32 tensors, then ``−(q·log_softmax).sum(-1).mean()``."""
    eps, k = cfg.epsilon, cfg.top_k

    def loss(x: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(x.float(), dim=-1)
        one_hot = torch.zeros_like(logp).scatter_(1, target[:, None], 1.0)
        top_mask = torch.zeros_like(logp).scatter_(1, x.detach().topk(k, dim=-1).indices, 1.0)
        soft = (1.0 - eps) * one_hot + (eps / k) * top_mask
        return -(soft * logp).sum(-1).mean()

    return _fwd_bwd(loss, logits)


def _dpls_builder(impl: str) -> Callable[[torch.Tensor, torch.Tensor, LossBenchConfig], Step]:
    def build(logits, target, cfg):
        return _fwd_bwd(
            lambda x: dpls_loss(x, target, epsilon=cfg.epsilon, top_k=cfg.top_k, impl=impl), logits
        )

    return build


register_loss_contender(BASELINE, _build_ce, description="F.cross_entropy (the baseline)")
register_loss_contender("dense_published", _build_published, description="published dense DPLS formulation")


def load_contenders(device: torch.device) -> dict[str, Contender]:
    """Built-ins, one ``dpls:<impl>`` per loss implementation running on ``device``, and the GPU
    contenders of `dpls.bench.contenders_gpu` (those whose package imports)."""
    for name, build, available, description in bench_loss_contenders():
        CONTENDERS.setdefault(name, Contender(name, build, available, description))
    table = dict(CONTENDERS)
    for impl in available_impls(device):
        table.setdefault(f"dpls:{impl}", Contender(f"dpls:{impl}", _dpls_builder(impl), lambda d: True, impl))
    return {name: c for name, c in table.items() if _safe_available(c, device)}


def _safe_available(c: Contender, device: torch.device) -> bool:
    try:
        return bool(c.available(device))
    except Exception:
        return False


def make_inputs(cfg: LossBenchConfig, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, V]`` (filled in row blocks, so no temporary larger than a block) and targets."""
    n = cfg.n if n is None else n
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    logits = torch.empty(n, cfg.v, dtype=cfg.torch_dtype, device=device)
    block = max(1, (1 << 20) // max(cfg.v, 1))
    for s in range(0, n, block):
        e = min(n, s + block)
        logits[s:e] = (torch.randn(e - s, cfg.v, generator=gen) * 2.0).to(
            device=device, dtype=cfg.torch_dtype
        )
    target = torch.randint(0, cfg.v, (n,), generator=gen).to(device)
    return logits, target


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_peak(step: Step, device: torch.device) -> int:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _cpu_peak(name: str, cfg: LossBenchConfig) -> int | None:
    """Run ``name`` once in a fresh interpreter and return the growth of its peak RSS (bytes)."""
    cmd = [
        sys.executable,
        "-m",
        "dpls.bench.loss",
        "--child",
        name,
        "--n",
        str(cfg.n),
        "--v",
        str(cfg.v),
        "--dtype",
        cfg.dtype,
        "--top-k",
        str(cfg.top_k),
        "--epsilon",
        repr(cfg.epsilon),
        "--seed",
        str(cfg.seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"memory of {name} not measured: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process to its current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_rss_growth(fn: Callable[[], None]) -> int:
    """Bytes by which ``fn`` raised the process's peak resident set above its RSS at the call.

    Uses the resettable ``VmHWM`` of ``/proc/self/status`` where available; otherwise the growth of
    ``ru_maxrss``, which can under-count if the process was larger earlier.
    """
    import resource  # POSIX only: imported here so that this module imports where it is missing

    if _reset_peak_rss():
        before = _status_kib("VmRSS") or 0
        fn()
        return max(0, ((_status_kib("VmHWM") or 0) - before) * 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # Linux reports KiB


def measure_child(name: str, cfg: LossBenchConfig) -> int:
    """In a fresh process: warm up on a tiny input, then the peak-RSS growth of one step at full size."""
    device = torch.device("cpu")
    contender = load_contenders(device)[name]
    tiny_logits, tiny_target = make_inputs(cfg, n=min(cfg.n, 8))
    contender.build(tiny_logits, tiny_target, cfg)()  # imports, lazy initialisation, thread pools
    logits, target = make_inputs(cfg)
    return peak_rss_growth(contender.build(logits, target, cfg))


@dataclass
class BenchRow:
    name: str
    ms: float
    ratio: float
    peak_extra_mb: float | None
    mem_ratio: float | None
    times_ms: list[float] = field(default_factory=list)


def bench_loss(cfg: LossBenchConfig, *, progress: bool = True) -> list[BenchRow]:
    """Time (and measure) the chosen contenders; the baseline ``cross_entropy`` is always included."""
    device = torch.device(cfg.device)
    table = load_contenders(device)
    names = list(table) if cfg.impls is None else [BASELINE, *[n for n in cfg.impls if n != BASELINE]]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown or unavailable contenders {unknown}; available here: {sorted(table)}")
    logits, target = make_inputs(cfg)
    steps = {name: table[name].build(logits, target, cfg) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    bar = tqdm(
        total=(cfg.repeats + 1) * len(names),
        desc="bench loss",
        unit="step",
        disable=None if progress else True,
    )
    for r in range(cfg.repeats + 1):  # round 0 is the warm-up
        for name in names:
            _sync(device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(device)
            if r > 0:
                times[name].append((time.perf_counter() - t0) * 1e3)
            bar.update(1)
    bar.close()

    peaks: dict[str, int | None] = {}
    if cfg.memory:
        for name in tqdm(names, desc="peak memory", disable=None if progress else True):
            peaks[name] = _cuda_peak(steps[name], device) if device.type == "cuda" else _cpu_peak(name, cfg)
    med = {name: statistics.median(t) for name, t in times.items()}
    base_mem = peaks.get(BASELINE)
    rows = []
    for name in names:
        peak = peaks.get(name)
        rows.append(
            BenchRow(
                name=name,
                ms=med[name],
                ratio=med[name] / med[BASELINE],
                peak_extra_mb=None if peak is None else peak / 2**20,
                mem_ratio=None if peak is None or not base_mem else peak / base_mem,
                times_ms=times[name],
            )
        )
    return rows


def format_table(rows: list[BenchRow], cfg: LossBenchConfig) -> str:
    logits_mb = cfg.n * cfg.v * torch.finfo(cfg.torch_dtype).bits / 8 / 2**20
    head = (
        f"loss fwd+bwd  N={cfg.n} V={cfg.v} {cfg.dtype} on {cfg.device}  k={cfg.top_k} ε={cfg.epsilon}  "
        f"median of {cfg.repeats}; logits {logits_mb:.0f} MiB; peak extra includes the gradient"
    )
    if cfg.device == "cpu":
        head += f"\nCPU top-k search: {describe()}"
    lines = [head, f"{'impl':<22}{'ms':>10}{'× CE':>8}{'peak extra MiB':>16}{'× CE':>8}"]
    for r in rows:
        mem = "-" if r.peak_extra_mb is None else f"{r.peak_extra_mb:.0f}"
        mem_ratio = "-" if r.mem_ratio is None else f"{r.mem_ratio:.2f}"
        lines.append(f"{r.name:<22}{r.ms:>10.1f}{r.ratio:>8.2f}{mem:>16}{mem_ratio:>8}")
    return "\n".join(lines)


def write_json(path: str, rows: list[BenchRow], cfg: LossBenchConfig) -> None:
    payload = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(),
        "rows": [asdict(r) for r in rows],
    }
    write_owned_json(  # replaces only an earlier dpls output (the CLI checked before the run)
        path,
        payload,
        allow_nan=False,
        default=lambda x: None if isinstance(x, float) and math.isnan(x) else x,
    )


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dpls.bench.loss", description="(internal) one memory measurement"
    )
    p.add_argument("--child", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--v", type=int, required=True)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = LossBenchConfig(
        n=a.n, v=a.v, dtype=a.dtype, device="cpu", top_k=a.top_k, epsilon=a.epsilon, seed=a.seed
    )
    print(json.dumps({"name": a.child, "peak_extra_bytes": measure_child(a.child, cfg)}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
