"""The fused Triton implementation of DPLS (``impl="triton"``).

Liger-style: the forward kernel already computes the gradient of the logits (the loss is linear in
``grad_output``, so backward only has to scale it), and with ``inplace_backward=True`` it stores that
gradient in the logits' own storage, so the loss needs no ``[N, V]`` memory of its own. The kernels
(``_triton_kernels``) are imported on first use: importing this module stays light.

The internal signature is the one of docs/ARCHITECTURE.md; arguments are validated by the front-end
(``dpls.losses.functional``), so nothing here re-checks them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from dpls.losses.adaptive import check_mode
from dpls.losses.registry import interpreting
from dpls.losses.softcap import check_softcap
from dpls.losses.validation import check_loss_args

__all__ = ["KernelConfig", "choose_config", "is_available", "triton_adaptive_dpls_loss", "triton_dpls_loss"]

_KEY_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}
# ε-modes the kernel computes from its own first pass (names as in ``dpls.losses.adaptive``)
EPSILON_MODE_IDS = {"constant": 0, "confidence": 1, "entropy": 2}


def is_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on ``device`` (CUDA, or any device under the interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreting():
        return True
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


@dataclass(frozen=True)
class KernelConfig:
    """Launch shape of the row kernel; ``choose_config`` picks one from ``V``, dtype and device.

    ``block_v``: entries per block of a row, a power of two, also the number of lanes;
    ``num_warps``: warps per program; ``top_r``: values each lane keeps (1–8; 0 = from k, see
    :func:`lane_depth`); ``cap``: entries of the per-program scratch row used when the lanes' values
    do not certify the threshold (past it the threshold is counted over the row itself: slower, same
    result); ``programs``: size of the persistent grid (0 = the device's multiprocessors ×
    ``programs_per_sm``, capped by the number of rows); ``split``: with a top-k selection, run the
    stats pass and selection as one launch and the final pass as a second (the selection's
    registers then do not lower the final pass's occupancy; see ``_dpls_rows_kernel``);
    ``select_warps``: warps of that first launch (0 = ``num_warps``).
    """

    block_v: int = 2048
    num_warps: int = 8
    top_r: int = 0
    cap: int = 4096
    programs_per_sm: int = 4
    programs: int = 0
    num_stages: int = 2
    split: bool = True
    select_warps: int = 0


def choose_config(vocab: int, dtype: torch.dtype, device: torch.device, top_k: int = 100) -> KernelConfig:
    """A launch shape for rows of ``vocab`` entries: blocks of 2048 (8 per thread with 8 warps), and
    16 warps for the selection launch (4 per thread: its lanes' values fit in fewer registers)."""
    block_v = min(2048, max(128, 1 << (vocab - 1).bit_length()))
    num_warps = 8 if block_v >= 2048 else 4
    if device.type != "cuda":  # the interpreter: programs run one after another, keep blocks small
        return KernelConfig(block_v=min(block_v, 1024), num_warps=1, programs=4)
    # The selection launch holds the lanes' values and the search: at 8 warps it needs about 91
    # registers a thread (2 programs of 8 warps per multiprocessor); at 16 warps 64 (2 programs of
    # 16 warps: twice the warps streaming). The final pass needs about 61 at 8 warps (4 programs).
    # Counts from ``cuobjdump -res-usage`` on sm_90 cubins compiled without a GPU (Triton 3.9).
    select_warps = 16 if block_v >= 2048 else num_warps
    return KernelConfig(block_v=block_v, num_warps=num_warps, cap=2 * block_v, select_warps=select_warps)


def lane_depth(top_k: int, vocab: int, block_v: int, target_rate: float = 0.01) -> int:
    """Values per lane so that under 1% of rows need the fallback, for top-k entries in random lanes.

    A lane's share of the top-k is about Poisson(k / lanes); the certificate fails when a lane holds
    ``top_r`` or more of them, so pick the smallest depth whose expected count of such lanes is
    below ``target_rate``. A lane never sees more than ``ceil(V / block_v)`` entries.
    """
    per_lane = -(-vocab // block_v)
    lam = top_k / block_v
    term, below = math.exp(-lam), 0.0
    for depth in range(1, 9):
        below += term  # P(Poisson < depth)
        term *= lam / depth
        if depth >= per_lane or block_v * max(0.0, 1.0 - below) <= target_rate:
            return depth
    return 8


def _kernels() -> ModuleType:
    from dpls.losses import _triton_kernels

    return _triton_kernels


def _grid_size(n_rows: int, cfg: KernelConfig, device: torch.device) -> int:
    if cfg.programs > 0:
        return max(1, min(n_rows, cfg.programs))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, sms * cfg.programs_per_sm))
    return max(1, min(n_rows, 4))


def launch_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    epsilon: float | torch.Tensor,
    top_k: int,
    ignore_index: int,
    *,
    grad: torch.Tensor | None,
    scale: torch.Tensor | None,
    scale_mode: str,
    config: KernelConfig | None = None,
    epsilon_mode: str = "constant",
    gamma: float = 1.0,
    eps_out: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the row kernel once: per-row loss and NLL (float32 ``[N]``), and the gradient into ``grad``.

    ``grad`` may be ``logits`` itself (in-place) or ``None`` (no gradient). ``scale_mode``: ``"mean"``
    (``scale`` holds n_valid, a 0-d float32 on the device), ``"row"`` (``scale`` is ``[N]``) or
    ``"one"``. Rows whose target is ``ignore_index`` get 0 and a zero gradient.

    ``epsilon_mode`` ``"confidence"`` / ``"entropy"``: ``epsilon`` (a float) is the base ε and each
    row's ε_i is computed from the row's own first-pass statistics (see ``dpls.losses.adaptive``),
    used at once, and written to ``eps_out`` (float32 ``[N]``, 0 at ignored rows). ``softcap``:
    the loss of ``softcap·tanh(logits / softcap)``, each row capped as the kernel reads it.
    """
    k = _kernels()
    n_rows, vocab = logits.shape
    cfg = config or choose_config(vocab, logits.dtype, logits.device, top_k)
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    nll = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss, nll
    per_row_eps = isinstance(epsilon, torch.Tensor)
    topk_mode, eps_mode = _launch_modes(k, epsilon, top_k, vocab, epsilon_mode, eps_out)
    grid = _grid_size(n_rows, cfg, logits.device)
    cap = cfg.cap if topk_mode == k.TOPK_SELECT else 0
    top_r = cfg.top_r or lane_depth(top_k, vocab, cfg.block_v)
    scratch, key_bits = _selection_scratch(logits, grid * cap, softcap)
    mode = {"mean": k.SCALE_MEAN, "row": k.SCALE_ROW, "one": k.SCALE_ONE}[scale_mode]
    dummy = loss  # any float32 tensor for pointers a mode does not read
    eps_tensor = _per_row_epsilon(epsilon, dummy)
    g = grad if grad is not None else logits
    split = cfg.split and topk_mode == k.TOPK_SELECT
    stat_f = torch.empty(3 * n_rows if split else 1, dtype=torch.float32, device=logits.device)
    stat_i = torch.empty(3 * n_rows if split else 1, dtype=torch.int32, device=logits.device)
    args = (
        logits, logits.stride(0), g, g.stride(0), target, eps_tensor,
        0.0 if per_row_eps else float(epsilon), float(gamma), 1.0 if softcap is None else float(softcap),
        eps_out if eps_mode else dummy, scale if scale is not None else dummy,
        loss, nll, scratch, stat_f, stat_i, n_rows, vocab, int(top_k), int(ignore_index),
    )  # fmt: skip
    consts = dict(
        KEY_BITS=key_bits,
        BLOCK_V=cfg.block_v,
        TOPK_MODE=topk_mode,
        EPS_PER_ROW=per_row_eps,
        EPS_MODE=eps_mode,
        SCALE_MODE=mode,
        SOFTCAP=softcap is not None,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    select = dict(CAP=cap, TOP_R=top_r if topk_mode == k.TOPK_SELECT else 1)
    _run_rows_kernel(k, grid, args, consts, select, split=split, write_grad=grad is not None, cfg=cfg)
    return loss, nll


def _selection_scratch(logits: torch.Tensor, entries: int, softcap: float | None) -> tuple[torch.Tensor, int]:
    """The selection's scratch rows (``entries`` in all) and its key width: the logits' own dtype
    and bits, or with ``softcap`` float32 and 32 bits (capped values are float32, whatever the
    logits' dtype: half-precision keys could not tell them apart)."""
    if softcap is None:
        return torch.empty(max(1, entries), dtype=logits.dtype, device=logits.device), _KEY_BITS[logits.dtype]
    return torch.empty(max(1, entries), dtype=torch.float32, device=logits.device), 32


def _run_rows_kernel(
    k: ModuleType,
    grid: int,
    args: tuple[Any, ...],
    consts: dict[str, Any],
    select: dict[str, int],
    *,
    split: bool,
    write_grad: bool,
    cfg: KernelConfig,
) -> None:
    """One launch, or with ``split`` two: phase 1 the statistics and the selection, phase 2 the
    final pass (no selection code there: fewer registers)."""
    if split:
        first = {**consts, "num_warps": cfg.select_warps or cfg.num_warps}
        k._dpls_rows_kernel[(grid,)](*args, **select, WRITE_GRAD=False, PHASE=1, **first)
        k._dpls_rows_kernel[(grid,)](*args, CAP=0, TOP_R=1, WRITE_GRAD=write_grad, PHASE=2, **consts)
    else:
        k._dpls_rows_kernel[(grid,)](*args, **select, WRITE_GRAD=write_grad, PHASE=0, **consts)


def _per_row_epsilon(epsilon: float | torch.Tensor, dummy: torch.Tensor) -> torch.Tensor:
    """The kernel's per-row ε pointer: ``epsilon`` as contiguous float32 on the device, or ``dummy``
    (never read) when ε is one float."""
    if isinstance(epsilon, torch.Tensor):
        return epsilon.to(device=dummy.device, dtype=torch.float32).contiguous()
    return dummy


def _launch_modes(
    k: ModuleType,
    epsilon: float | torch.Tensor,
    top_k: int,
    vocab: int,
    epsilon_mode: str,
    eps_out: torch.Tensor | None,
) -> tuple[int, int]:
    """The kernel's (top-k mode, ε mode) for one launch. ε = 0 needs no top-k at all (and an
    adaptive ε of base 0 is 0 everywhere: ``eps_out`` is zeroed here); k = V needs no selection."""
    per_row_eps = isinstance(epsilon, torch.Tensor)
    eps_mode = EPSILON_MODE_IDS[epsilon_mode]
    if eps_mode and (per_row_eps or eps_out is None):
        raise ValueError(f"epsilon_mode={epsilon_mode!r} takes a float base epsilon and an eps_out buffer")
    if eps_mode and eps_out is not None and float(epsilon) == 0.0:
        eps_out.zero_()
        eps_mode = 0
    if not per_row_eps and float(epsilon) == 0.0:
        return k.TOPK_NONE, eps_mode
    if top_k >= vocab:
        return k.TOPK_ALL, eps_mode
    return k.TOPK_SELECT, eps_mode


def reduce_rows(rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` over non-ignored rows (0 when there are none), ``"sum"``, or the rows themselves."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / n_valid.clamp(min=1.0) if reduction == "mean" else total


SECOND_BACKWARD = (
    "the fused Triton DPLS loss computes its gradient in forward and hands that one buffer (scaled "
    "in place by grad_output, possibly in the logits' own storage) to the first backward; it keeps "
    "no copy, so a second backward through the same graph (retain_graph=True) is not supported. "
    "Run the forward again, or use impl='chunked', which recomputes in backward."
)
DOUBLE_BACKWARD = (
    "the fused Triton DPLS loss has no double backward: its gradient is a constant computed in "
    "forward, so create_graph=True would silently give a zero Hessian-vector product. Use "
    "impl='reference' for second-order gradients."
)


def check_first_order(ctx, second: str | None = SECOND_BACKWARD) -> None:
    """Refuse what a gradient computed in forward cannot give: a graph of it (double backward), or,
    when ``second`` names why, a second backward after its buffers were handed out.

    Skipped while torch.compile traces the backward: a traced graph keeps no Python side effects
    (the flag on ``ctx``), and the check must not be what breaks the graph.
    """
    if torch.compiler.is_compiling():
        return
    if torch.is_grad_enabled():  # backward runs with grad mode on only under create_graph=True
        raise RuntimeError(DOUBLE_BACKWARD)
    if second is not None:
        if getattr(ctx, "consumed", False):
            raise RuntimeError(second)
        ctx.consumed = True


def scale_inplace(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad *= factor`` (a one-element tensor) decided on the device: no host read of ``factor``.

    When the factor is 1 (the usual ``loss.backward()``) the kernel returns at once, so the common
    case costs a launch, not a pass over the gradient, and torch.compile sees no ``.item()``.
    """
    if grad.numel() == 0:
        return grad
    factor = factor.detach().reshape(1).to(device=grad.device, dtype=torch.float32)
    grid = _grid_size(max(1, grad.numel() // 8192), KernelConfig(), grad.device)
    _kernels()._scale_kernel[(grid,)](grad, grad.numel(), factor, BLOCK=1024)
    return grad


class _TritonDPLS(torch.autograd.Function):
    """Loss, detached NLL and per-row ε of ``[N, V]`` logits; the gradient is computed in forward."""

    @staticmethod
    def forward(
        ctx,
        logits,
        target,
        eps_tensor,
        eps_value,
        top_k,
        ignore_index,
        reduction,
        inplace,
        want_grad,
        config,
        epsilon_mode,
        gamma,
        softcap,
    ):
        epsilon = eps_tensor if eps_tensor is not None else eps_value
        n_valid = (target != ignore_index).sum().to(torch.float32)
        needs_grad = want_grad and ctx.needs_input_grad[0]  # not under torch.no_grad()
        grad = None
        if needs_grad:
            grad = logits if inplace else torch.empty_like(logits)
        eps_rows = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        loss_rows, nll_rows = launch_rows(
            logits,
            target,
            epsilon,
            top_k,
            ignore_index,
            grad=grad,
            scale=n_valid,
            scale_mode="mean" if reduction == "mean" else "one",
            config=config,
            epsilon_mode=epsilon_mode,
            gamma=gamma,
            eps_out=eps_rows,
            softcap=softcap,
        )
        ctx.reduction = reduction
        if needs_grad:
            ctx.save_for_backward(grad.detach())
        loss = reduce_rows(loss_rows, n_valid, reduction)
        nll = reduce_rows(nll_rows, n_valid, reduction)
        ctx.mark_non_differentiable(nll, eps_rows)
        return loss, nll, eps_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_nll, _grad_eps):
        check_first_order(ctx)
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_loss.to(torch.float32).unsqueeze(1))
        else:
            scale_inplace(grad, grad_loss)
        return grad, *(None,) * 12


def _apply(
    logits2d,
    target1d,
    epsilon,
    top_k,
    ignore_index,
    reduction,
    inplace_backward,
    config,
    mode,
    gamma,
    softcap,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = logits2d if logits2d.stride(-1) == 1 else logits2d.contiguous()
    target = target1d.to(torch.int64).contiguous()
    eps_tensor = epsilon if isinstance(epsilon, torch.Tensor) else None
    eps_value = 0.0 if eps_tensor is not None else float(epsilon)
    want_grad = torch.is_grad_enabled() and logits.requires_grad
    return _TritonDPLS.apply(
        logits, target, eps_tensor, eps_value, int(top_k), int(ignore_index), reduction, inplace_backward,
        want_grad, config, mode, float(gamma), softcap,
    )  # fmt: skip


def triton_dpls_loss(
    logits2d: torch.Tensor,
    target1d: torch.Tensor,
    epsilon: float | torch.Tensor,
    top_k: int,
    ignore_index: int,
    reduction: str,
    return_nll: bool,
    inplace_backward: bool,
    *,
    config: KernelConfig | None = None,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DPLS of ``[N, V]`` logits through the fused kernel (internal signature of ARCHITECTURE.md).

    The returned NLL is detached (it is for logging). With ``inplace_backward`` the gradient
    overwrites ``logits2d``, which the caller must not read afterwards. ``softcap``: the loss of
    the capped logits, capped inside the kernel.
    """
    loss, nll, _ = _apply(
        logits2d, target1d, epsilon, top_k, ignore_index, reduction, inplace_backward, config, "constant", 1.0,
        softcap,
    )  # fmt: skip
    return (loss, nll) if return_nll else loss


def triton_adaptive_dpls_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float,
    epsilon_mode: str,
    gamma: float = 1.0,
    top_k: int = 100,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace_backward: bool = False,
    config: KernelConfig | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPLS with a confidence-adaptive ε computed inside the kernel's first pass.

    Same values as ``dpls_loss(logits, target, epsilon=adaptive_epsilon(logits, epsilon, mode,
    gamma), ...)`` (``dpls.losses.adaptive``), without the extra read of the logits that computing
    ε_i first costs. Returns ``(loss, nll, eps)``: ``eps`` is ε_i per token (the target's shape,
    float32, detached, 0 at ignored tokens). Arguments are validated like ``dpls_loss``'s;
    ``softcap`` caps the logits first (ε_i is then that of the capped prediction).
    """
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"logits must be a float tensor, got {type(logits).__name__}")
    if isinstance(epsilon, torch.Tensor):
        raise ValueError("epsilon must be a float base value for an adaptive epsilon_mode, got a tensor")
    check_mode(epsilon_mode, gamma)
    cap = check_softcap(softcap)
    args = check_loss_args(
        logits.shape, logits.dtype, logits.device, target, epsilon, top_k, ignore_index, reduction
    )
    if not is_available(logits.device):
        raise ValueError(f"the Triton kernels cannot run on {logits.device} (CUDA, or TRITON_INTERPRET=1)")
    out = _apply(
        logits.reshape(-1, logits.shape[-1]), args.target, args.epsilon, args.top_k, args.ignore_index,
        args.reduction, inplace_backward, config, epsilon_mode, gamma, cap,
    )  # fmt: skip
    loss, nll = args.unflatten((out[0], out[1]))
    return loss, nll, out[2].reshape(target.shape)
