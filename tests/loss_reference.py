"""An independent float64 statement of the loss (docs/losses.md), and a checker every loss
implementation reuses.

Nothing here imports the implementation under test except through the public front
``dpls.losses.dpls_loss(..., impl=name)``, so the reference cannot share a bug with it.

* :func:`reference_dpls` — loss, plain CE and the analytic gradient ``(softmax − q)·scale`` in
  float64, building the soft target ``q`` literally; with ``softcap`` of the capped logits
  ``s = cap·tanh(z/cap)`` (``−inf`` kept), the gradient taken to ``z`` by ``1 − tanh²(z/cap)``.
* :func:`distinct_logits` — random logits with no two equal values in a row *in their own dtype*
  (also for float16 / bfloat16), so the top-k set is unambiguous and gradients can be compared.
* :func:`check_impl_against_reference` — runs one implementation forward and backward and asserts
  loss (1e-5 relative), nll and gradient (1e-4 of the largest entry; a few ulps of the dtype for
  half-precision gradients) against the reference. Returns the measured errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_HALF_TYPES = (torch.float16, torch.bfloat16)


def reference_dpls(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    epsilon: float | torch.Tensor = 0.1,
    top_k: int = 100,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_output: torch.Tensor | float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, nll, grad)`` in float64 for logits ``[..., V]``; ``grad`` is d(grad_output·loss)/d logits.

    ``grad_output`` is the upstream gradient: a scalar for "mean"/"sum", one value per token for
    "none". ``T`` is the ``min(k, #finite)`` largest finite logits (a ``−inf`` logit is masked:
    never smoothed onto), ties to the lowest index; ``0·log 0 = 0``. Ignored rows contribute 0,
    whatever their logits.
    """
    v = logits.shape[-1]
    z = logits.detach().reshape(-1, v).to(torch.float64)
    slope = torch.ones_like(z)
    if softcap is not None:  # the loss of the capped logits; d s / d z = 1 − tanh²(z / cap)
        th = torch.tanh(z / softcap)
        masked = z == -float("inf")
        z = torch.where(masked, z, softcap * th)
        slope = torch.where(masked, 0.0, 1.0 - th * th)
    y = target.detach().reshape(-1).to(torch.int64)
    n = z.shape[0]
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    if isinstance(epsilon, torch.Tensor):
        eps = epsilon.detach().reshape(-1).to(torch.float64)
    else:
        eps = torch.full((n,), float(epsilon), dtype=torch.float64)
    k = int(top_k)

    z = torch.where(valid[:, None], z, torch.zeros_like(z))  # ignored rows: anything finite
    logp = torch.log_softmax(z, dim=-1)
    onehot = torch.zeros_like(z)
    onehot[torch.arange(n), y_safe] = 1.0
    # k largest finite entries, ties to the lowest index: a stable sort of −z keeps index order
    # among equals (and puts −inf last); a row with fewer than k finite entries smooths over them.
    finite = torch.isfinite(z)
    k_eff = finite.sum(-1).clamp(1, k)
    order = torch.sort(-z, dim=-1, stable=True).indices
    in_top = torch.zeros_like(z)
    for i in range(n):
        in_top[i, order[i, : int(k_eff[i])]] = 1.0
    in_top = in_top * finite
    q = (1.0 - eps)[:, None] * onehot + (eps / k_eff)[:, None] * in_top
    per_tok = -torch.where(q > 0, q * logp, torch.zeros_like(q)).sum(-1)
    per_nll = -logp[torch.arange(n), y_safe]
    per_grad = logp.exp() - q

    vmask = valid.to(torch.float64)
    per_tok = torch.where(valid, per_tok, torch.zeros_like(per_tok))
    per_nll = torch.where(valid, per_nll, torch.zeros_like(per_nll))
    n_valid = int(valid.sum())
    if reduction == "none":
        g = torch.as_tensor(grad_output, dtype=torch.float64).reshape(-1).expand(n)
        loss, nll = per_tok.reshape(target.shape), per_nll.reshape(target.shape)
        row_scale = g * vmask
    elif reduction == "sum":
        loss, nll = per_tok.sum(), per_nll.sum()
        row_scale = float(grad_output) * vmask
    elif reduction == "mean":
        denom = max(n_valid, 1)
        loss, nll = per_tok.sum() / denom, per_nll.sum() / denom
        row_scale = float(grad_output) * vmask / denom
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    grad = torch.where(valid[:, None], per_grad * row_scale[:, None] * slope, torch.zeros_like(per_grad))
    grad = grad.reshape(logits.shape)
    return loss, nll, grad


def distinct_logits(
    n: int,
    v: int,
    *,
    dtype: torch.dtype = torch.float32,
    scale: float = 3.0,
    generator: torch.Generator | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``[n, v]`` roughly ``N(0, scale²)`` logits whose rows have ``v`` distinct values in ``dtype``
    (and, with ``softcap``, distinct float32 values once capped, as implementations compute them).

    float32/float64: Gaussian draws (redrawn in the unlikely case of a tie). Half types: ``v``
    different representable values per row, drawn without replacement with probability ∝ the
    Gaussian mass of each value's cell, so even bfloat16 rows of a few thousand entries are tie-free.
    """
    for _ in range(10):
        z = _distinct(n, v, dtype, scale, generator)
        if softcap is None or _tie_free(softcap * torch.tanh(z.float() / softcap)):
            return z
    raise RuntimeError("could not draw logits whose capped values are tie-free")


def _tie_free(z: torch.Tensor) -> bool:
    s = torch.sort(z, dim=-1).values
    return z.shape[-1] < 2 or bool((s[:, 1:] != s[:, :-1]).all())


def _distinct(
    n: int, v: int, dtype: torch.dtype, scale: float, generator: torch.Generator | None
) -> torch.Tensor:
    if dtype in _HALF_TYPES:
        bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
        pool = bits.view(dtype).to(torch.float64)
        pool = torch.unique(pool[torch.isfinite(pool) & (pool.abs() <= 6 * scale)])  # sorted; +0/−0 merged
        if pool.numel() < v:
            raise ValueError(
                f"{dtype} has only {pool.numel()} values within ±{6 * scale}; v={v} is too large"
            )
        width = torch.diff(pool, prepend=pool[:1], append=pool[-1:])
        cell = 0.5 * (width[:-1] + width[1:])
        weight = torch.exp(-0.5 * (pool / scale) ** 2) * cell
        idx = torch.multinomial(weight.expand(n, -1).float(), v, replacement=False, generator=generator)
        return pool[idx].to(dtype)
    for _ in range(10):
        z = (torch.randn(n, v, generator=generator, dtype=torch.float64) * scale).to(dtype)
        if _tie_free(z):
            return z
    raise RuntimeError("could not draw tie-free logits")


@dataclass
class CheckResult:
    loss_rel_err: float
    nll_rel_err: float
    grad_err: float  # max |grad − ref| / max |ref|


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    denom = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / denom)


def check_impl_against_reference(
    impl_name: str,
    *,
    n: int = 64,
    v: int = 300,
    top_k: int = 10,
    epsilon: float | str = 0.1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    reduction: str = "mean",
    ignore_frac: float = 0.2,
    ignore_index: int = -100,
    return_nll: bool = True,
    inplace_backward: bool = False,
    batch_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    loss_rtol: float = 1e-5,
    grad_rtol: float | None = None,
    masked: float = 0.0,
    pad: int = 0,
    offset: float = 0.0,
    softcap: float | None = None,
    scale: float = 3.0,
) -> CheckResult:
    """Run ``dpls_loss(impl=impl_name)`` forward+backward and compare with :func:`reference_dpls`.

    ``epsilon="per_token"`` draws one ε per token in ``[0, 0.5)``. ``batch_shape`` (default ``(n,)``)
    lets the logits be ``[*batch_shape, v]``. ``masked`` sets that fraction of the logits to
    ``−inf`` (never a target's), ``pad`` the last ``pad`` columns (a padded vocabulary; targets
    stay below), and ``offset`` is added to every logit; ``softcap`` caps the logits (in the
    implementation, and in float64 in the reference); ``scale`` is the logits' spread. Loss and nll must match within ``loss_rtol``
    (relative); the gradient within ``grad_rtol`` of its largest entry (default 1e-4 for float32
    gradients, 4 ulps of the dtype for half types, whose gradient is stored in that dtype).
    """
    from dpls.losses import dpls_loss

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(batch_shape) if batch_shape is not None else (n,)
    n_tok = 1
    for s in shape:
        n_tok *= s
    logits = distinct_logits(n_tok, v, dtype=dtype, generator=gen, softcap=softcap, scale=scale)
    logits = logits.reshape(*shape, v)
    if offset:
        logits = (logits.double() + offset).to(dtype)
    target = torch.randint(0, v - pad, shape, generator=gen)
    if masked or pad:
        off = torch.rand(*shape, v, generator=gen) < masked
        off[..., v - pad :] = True
        off.scatter_(-1, target[..., None], False)
        logits = logits.masked_fill(off, -float("inf"))
    if ignore_frac > 0:
        drop = torch.rand(shape, generator=gen) < ignore_frac
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    if epsilon == "per_token":
        eps: float | torch.Tensor = torch.rand(shape, generator=gen, dtype=torch.float32) * 0.5
    else:
        eps = float(epsilon)
    if reduction == "none":
        grad_out: torch.Tensor | float = torch.randn(shape, generator=gen, dtype=torch.float64)
    else:
        grad_out = float(torch.randn((), generator=gen).item())

    ref_loss, ref_nll, ref_grad = reference_dpls(
        logits,
        target,
        epsilon=eps,
        top_k=top_k,
        ignore_index=ignore_index,
        reduction=reduction,
        grad_output=grad_out,
        softcap=softcap,
    )

    leaf = logits.to(device).requires_grad_(True)
    x = leaf.clone()  # a non-leaf, like the output of an lm head, so inplace_backward may reuse it
    eps_dev = eps.to(device) if isinstance(eps, torch.Tensor) else eps
    out = dpls_loss(
        x,
        target.to(device),
        epsilon=eps_dev,
        top_k=top_k,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=impl_name,
        return_nll=return_nll,
        inplace_backward=inplace_backward,
        **({} if softcap is None else {"softcap": softcap}),
    )
    loss, nll = out if return_nll else (out, None)
    assert loss.dtype == torch.float32, f"{impl_name}: loss dtype {loss.dtype}, expected float32"
    assert loss.shape == ref_loss.shape, (
        f"{impl_name}: loss shape {tuple(loss.shape)} != {tuple(ref_loss.shape)}"
    )
    g = grad_out.to(device=device, dtype=torch.float32) if isinstance(grad_out, torch.Tensor) else grad_out
    (loss * g).sum().backward()

    loss_err = _rel(loss.detach().cpu(), ref_loss)
    assert loss_err <= loss_rtol, f"{impl_name}: loss rel err {loss_err:.3g} > {loss_rtol}"
    nll_err = 0.0
    if nll is not None:
        nll_err = _rel(nll.detach().cpu(), ref_nll)
        assert nll_err <= loss_rtol, f"{impl_name}: nll rel err {nll_err:.3g} > {loss_rtol}"
    if grad_rtol is None:
        grad_rtol = 1e-4 if dtype not in _HALF_TYPES else 4 * torch.finfo(dtype).eps
    assert leaf.grad is not None, f"{impl_name}: no gradient reached the logits"
    assert leaf.grad.dtype == dtype, f"{impl_name}: grad dtype {leaf.grad.dtype} != {dtype}"
    grad_err = _rel(leaf.grad.detach().cpu(), ref_grad)
    assert grad_err <= grad_rtol, f"{impl_name}: grad err {grad_err:.3g} (of max |grad|) > {grad_rtol}"
    return CheckResult(loss_err, nll_err, grad_err)
