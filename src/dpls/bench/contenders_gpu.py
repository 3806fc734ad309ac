"""GPU contenders for the loss benchmark: our Triton kernels beside PyTorch, Liger-Kernel and CCE.

Each contender turns a :class:`LossProblem` into a *step*: one forward and backward on the inputs it
is handed, returning the detached loss. Two families: ``"logits"`` steps take ready logits
``[N, V]`` (a leaf that requires grad; contenders marked ``inplace`` overwrite it with its gradient,
so the timer refreshes it before every step), ``"linear"`` steps take hidden states ``[N, H]`` and
the output weight ``[V, H]`` and make the logits themselves. ``objective`` says what a contender
computes (``ce``, ``ls`` or ``dpls``), so tables compare like with like. Third-party contenders
appear only when their package imports.

``benchmarks/gpu_check.py`` times every available contender (both families); ``dpls bench loss``
(``dpls.bench.loss``) adds the logits-family ones to its own (`bench_loss_contenders`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpls.losses import adaptive_epsilon, dpls_loss
from dpls.losses.triton_impl import is_available, triton_adaptive_dpls_loss, triton_dpls_loss
from dpls.losses.triton_linear import triton_dpls_linear_loss

Step = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class LossProblem:
    """What is timed: ``n`` tokens over a vocabulary of ``v`` (``hidden`` > 0 for the linear family)."""

    n: int
    v: int
    dtype: torch.dtype = torch.bfloat16
    epsilon: float = 0.1
    top_k: int = 100
    hidden: int = 0


@dataclass(frozen=True)
class GpuContender:
    name: str
    family: str  # "logits" | "linear"
    objective: str  # "ce" | "ls" | "dpls"
    make: Callable[[LossProblem], Step]
    available: Callable[[torch.device], bool] = lambda device: True
    inplace: bool = False  # overwrites its logits input with the gradient


def _cuda_package(name: str) -> Callable[[torch.device], bool]:
    return lambda device: device.type == "cuda" and importlib.util.find_spec(name) is not None


def _triton_ok(device: torch.device) -> bool:
    return is_available(device)


def _finish(loss: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Backward from the loss (the first of a (loss, nll) pair) and the loss, detached."""
    if isinstance(loss, tuple):
        loss = loss[0]
    loss.backward()
    return loss.detach()


# --- logits family -----------------------------------------------------------------------------


def _torch_ce(p: LossProblem) -> Step:
    return lambda t: _finish(F.cross_entropy(t["logits"], t["target"]))


def _torch_ce_fp32(p: LossProblem) -> Step:
    """What autocast does with a bf16 lm head: cross-entropy on a float32 copy of the logits."""
    return lambda t: _finish(F.cross_entropy(t["logits"].float(), t["target"]))


def _torch_ls(p: LossProblem) -> Step:
    return lambda t: _finish(F.cross_entropy(t["logits"], t["target"], label_smoothing=p.epsilon))


def _chunked_dpls(
    logits: torch.Tensor, target: torch.Tensor, p: LossProblem
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return dpls_loss(logits, target, epsilon=p.epsilon, top_k=p.top_k, impl="chunked")


def _dpls_chunked(p: LossProblem) -> Step:
    return lambda t: _finish(_chunked_dpls(t["logits"], t["target"], p))


def _triton_rows(*, eps: float | None, k: int | None, inplace: bool) -> Callable[[LossProblem], Step]:
    """Our kernel called directly (no validation): DPLS, or CE (ε=0) / LS (k=V) through the same kernel."""

    def make(p: LossProblem) -> Step:
        epsilon = p.epsilon if eps is None else eps
        top_k = p.top_k if k is None else min(k, p.v)

        def step(t: dict[str, torch.Tensor]) -> torch.Tensor:
            # like Liger, the in-place variants overwrite the leaf itself: no copy of the logits
            return _finish(
                triton_dpls_loss(t["logits"], t["target"], epsilon, top_k, -100, "mean", False, inplace)
            )

        return step

    return make


def _triton_adaptive(*, fused: bool) -> Callable[[LossProblem], Step]:
    """Confidence-adaptive ε (γ = 1): computed in the kernel's first pass, or first by the separate
    ``adaptive_epsilon`` read and then handed to the kernel as a per-token tensor (the unfused path)."""

    def make(p: LossProblem) -> Step:
        def step(t: dict[str, torch.Tensor]) -> torch.Tensor:
            z, y = t["logits"], t["target"]
            loss: torch.Tensor | tuple[torch.Tensor, ...]
            if fused:
                loss = triton_adaptive_dpls_loss(
                    z, y, epsilon=p.epsilon, epsilon_mode="confidence", top_k=p.top_k, inplace_backward=True
                )[0]
            else:
                eps = adaptive_epsilon(z, p.epsilon, "confidence", 1.0)
                loss = triton_dpls_loss(z, y, eps, p.top_k, -100, "mean", False, True)
            return _finish(loss)

        return step

    return make


def _liger_ce(*, smoothing: bool) -> Callable[[LossProblem], Step]:
    def make(p: LossProblem) -> Step:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        fn = LigerCrossEntropyLoss(label_smoothing=p.epsilon if smoothing else 0.0)
        return lambda t: _finish(fn(t["logits"], t["target"]))

    return make


# --- linear family -----------------------------------------------------------------------------


def _dense(
    loss_of_logits: Callable[
        [torch.Tensor, torch.Tensor, LossProblem], torch.Tensor | tuple[torch.Tensor, ...]
    ],
) -> Callable[[LossProblem], Step]:
    def make(p: LossProblem) -> Step:
        return lambda t: _finish(loss_of_logits(t["hidden"] @ t["weight"].t(), t["target"], p))

    return make


def _dense_triton_dpls(
    logits: torch.Tensor, target: torch.Tensor, p: LossProblem
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    return triton_dpls_loss(logits, target, p.epsilon, p.top_k, -100, "mean", False, True)


def _fused_triton_dpls(*, eps: float | None = None) -> Callable[[LossProblem], Step]:
    def make(p: LossProblem) -> Step:
        epsilon = p.epsilon if eps is None else eps

        def step(t: dict[str, torch.Tensor]) -> torch.Tensor:
            loss = triton_dpls_linear_loss(
                t["hidden"], t["weight"], None, t["target"], epsilon, p.top_k, -100, "mean", False
            )
            return _finish(loss)

        return step

    return make


def _liger_flce(*, smoothing: bool) -> Callable[[LossProblem], Step]:
    def make(p: LossProblem) -> Step:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss(label_smoothing=p.epsilon if smoothing else 0.0)
        return lambda t: _finish(fn(t["weight"], t["hidden"], t["target"]))

    return make


def _cce(p: LossProblem) -> Step:
    from cut_cross_entropy import linear_cross_entropy

    return lambda t: _finish(linear_cross_entropy(t["hidden"], t["weight"], t["target"]))


CONTENDERS: list[GpuContender] = [
    # logits [N, V] already made
    GpuContender("torch CE", "logits", "ce", _torch_ce),
    GpuContender("torch CE (fp32 upcast)", "logits", "ce", _torch_ce_fp32),
    GpuContender("torch LS", "logits", "ls", _torch_ls),
    GpuContender("dpls chunked (pure torch)", "logits", "dpls", _dpls_chunked),
    GpuContender("triton DPLS in-place", "logits", "dpls", _triton_rows(eps=None, k=None, inplace=True),
                 _triton_ok, inplace=True),
    GpuContender("triton DPLS", "logits", "dpls", _triton_rows(eps=None, k=None, inplace=False), _triton_ok),
    GpuContender("triton DPLS conf-eps in-kernel", "logits", "dpls", _triton_adaptive(fused=True),
                 _triton_ok, inplace=True),
    GpuContender("triton DPLS conf-eps unfused", "logits", "dpls", _triton_adaptive(fused=False),
                 _triton_ok, inplace=True),
    GpuContender("triton CE in-place", "logits", "ce", _triton_rows(eps=0.0, k=None, inplace=True),
                 _triton_ok, inplace=True),
    GpuContender("triton LS in-place", "logits", "ls", _triton_rows(eps=None, k=1 << 30, inplace=True),
                 _triton_ok, inplace=True),
    GpuContender("liger CE", "logits", "ce", _liger_ce(smoothing=False), _cuda_package("liger_kernel"),
                 inplace=True),
    GpuContender("liger LS", "logits", "ls", _liger_ce(smoothing=True), _cuda_package("liger_kernel"),
                 inplace=True),
    # hidden [N, H] and weight [V, H]: the logits are part of the work
    GpuContender("torch dense CE", "linear", "ce", _dense(lambda z, y, p: F.cross_entropy(z, y))),
    GpuContender("torch dense DPLS (chunked)", "linear", "dpls", _dense(_chunked_dpls)),
    GpuContender("triton dense DPLS in-place", "linear", "dpls", _dense(_dense_triton_dpls), _triton_ok),
    GpuContender("triton fused-linear DPLS", "linear", "dpls", _fused_triton_dpls(), _triton_ok),
    GpuContender("triton fused-linear CE", "linear", "ce", _fused_triton_dpls(eps=0.0), _triton_ok),
    GpuContender("liger fused-linear CE", "linear", "ce", _liger_flce(smoothing=False), _cuda_package("liger_kernel")),
    GpuContender("liger fused-linear LS", "linear", "ls", _liger_flce(smoothing=True), _cuda_package("liger_kernel")),
    GpuContender("cut-cross-entropy", "linear", "ce", _cce, _cuda_package("cut_cross_entropy")),
]  # fmt: skip


def gpu_contenders(family: str | None = None, device: torch.device | None = None) -> list[GpuContender]:
    """The contenders that can run on ``device`` (default: the current CUDA device, if any)."""
    if device is None:
        if not torch.cuda.is_available():
            return []
        device = torch.device("cuda")
    return [c for c in CONTENDERS if (family is None or c.family == family) and c.available(device)]


def _bench_step(contender: GpuContender, problem: LossProblem, logits: torch.Tensor, target: torch.Tensor):
    """A ``dpls bench loss`` step: the shared logits stay intact (in-place contenders work on a copy)."""
    step = contender.make(problem)

    def run() -> None:
        x = (logits.clone() if contender.inplace else logits.detach()).requires_grad_(True)
        step({"logits": x, "target": target})

    return run


def bench_loss_contenders() -> list[
    tuple[str, Callable[..., Callable[[], None]], Callable[[torch.device], bool], str]
]:
    """The logits-family contenders ``dpls bench loss`` adds to its own: (name, build, available,
    description), where ``build(logits, target, cfg)`` gives one forward+backward."""
    out = []
    for c in CONTENDERS:
        if c.family != "logits" or not c.name.startswith(("triton", "liger")):
            continue  # the plain torch ones are there already; linear ones need hidden states

        def build(logits, target, cfg, c=c):
            problem = LossProblem(logits.shape[0], logits.shape[1], logits.dtype, cfg.epsilon, cfg.top_k)
            return _bench_step(c, problem, logits, target)

        note = (
            f"{c.objective}; includes a copy of the logits (it writes its gradient in place)"
            if c.inplace
            else c.objective
        )
        name = c.name.lower().replace(" in-place", "_inplace").replace(" ", ":", 1).replace(" ", "_")
        out.append((name, build, c.available, note))
    return out
