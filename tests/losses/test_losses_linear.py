"""The fused-linear loss against the dense definition: values, nll and gradients of hidden, weight
and bias, for every reduction, per-token ε, half precision and arbitrary shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dpls.losses import dpls_linear_loss
from loss_reference import reference_dpls


def _case(n, c, v, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, c, generator=g, dtype=torch.float64) / c**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64)).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    return h, w, b, y


def _reference(h, w, b, y, eps, k, reduction, g_out):
    """Float64 loss and the gradients of h, w, b through z = h wᵀ + b, from the float64 definition."""
    hd, wd = h.detach().double(), w.detach().double()
    z = hd @ wd.T + (b.detach().double() if b is not None else 0)
    loss, nll, dz = reference_dpls(z, y, epsilon=eps, top_k=k, reduction=reduction, grad_output=g_out)
    return loss, nll, dz @ wd, dz.T @ hd, dz.sum(0)


def _rel(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps_kind", ["float", "tensor", "zero"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_dense_definition(reduction, eps_kind, bias):
    h, w, b, y = _case(29, 12, 83, bias=bias)
    eps = {"float": 0.2, "zero": 0.0, "tensor": torch.rand(29) * 0.5}[eps_kind]
    g_out = torch.randn(29, dtype=torch.float64) if reduction == "none" else 1.3
    loss, nll = dpls_linear_loss(
        h, w, y, bias=b, epsilon=eps, top_k=6, reduction=reduction, return_nll=True, chunk_size=5
    )
    g = g_out.float() if isinstance(g_out, torch.Tensor) else g_out
    (loss * g).sum().backward()
    ref_loss, ref_nll, gh, gw, gb = _reference(h, w, b, y, eps, 6, reduction, g_out)
    assert _rel(loss.detach(), ref_loss) < 1e-5 and _rel(nll, ref_nll) < 1e-5
    assert _rel(h.grad, gh) < 1e-4 and _rel(w.grad, gw) < 1e-4
    if bias:
        assert _rel(b.grad, gb) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision(dtype):
    h, w, _, y = _case(24, 16, 70, dtype=dtype)
    loss = dpls_linear_loss(h, w, y, epsilon=0.1, top_k=5, chunk_size=7)
    assert loss.dtype == torch.float32
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == dtype
    # The reference sees the same half-precision logits the chunks form.
    z = (h.detach() @ w.detach().T).double()
    ref_loss, _, dz = reference_dpls(z, y, epsilon=0.1, top_k=5)
    assert abs(loss.item() - float(ref_loss)) < 1e-4 * float(ref_loss)
    assert _rel(h.grad, dz @ w.detach().double()) < 2e-2


def test_linear_without_grad_and_with_frozen_weight():
    h, w, _, y = _case(10, 8, 30)
    with torch.no_grad():
        loss = dpls_linear_loss(h, w, y, top_k=3)
    assert not loss.requires_grad
    w2 = w.detach()
    loss = dpls_linear_loss(h, w2, y, top_k=3)
    loss.backward()
    assert h.grad is not None and w2.grad is None


@given(
    batch=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    c=st.integers(1, 9),
    v=st.integers(1, 60),
    k_frac=st.floats(0.0, 1.0),
    chunk=st.integers(1, 40),
)
def test_linear_any_shape(batch, c, v, k_frac, chunk):
    k = max(1, min(v, round(k_frac * v)))
    n = 1
    for s in batch:
        n *= s
    h, w, _, y = _case(n, c, v, dtype=torch.float64, seed=n * 31 + v)
    hb = h.detach().reshape(*batch, c).requires_grad_()
    loss = dpls_linear_loss(hb, w, y.reshape(batch), epsilon=0.3, top_k=k, chunk_size=chunk, reduction="none")
    assert loss.shape == tuple(batch)
    loss.sum().backward()
    ref_loss, _, gh, gw, _ = _reference(h, w, None, y, 0.3, k, "none", torch.ones(n, dtype=torch.float64))
    torch.testing.assert_close(loss.reshape(-1), ref_loss.reshape(-1))
    torch.testing.assert_close(hb.grad.reshape(n, c), gh)
    torch.testing.assert_close(w.grad, gw)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"weight": torch.randn(30, 7)}, "weight"),
        ({"weight": torch.randn(30, 8, dtype=torch.float64)}, "weight"),
        ({"bias": torch.randn(29)}, "bias"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"top_k": 31}, "top_k"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"impl": "cce"}, "impl"),
        ({"target": torch.full((10,), 30)}, "target"),
        ({"hidden": torch.ones(10, 8, dtype=torch.long)}, "hidden"),
    ],
)
def test_linear_bad_arguments(kwargs, name):
    args = {"hidden": torch.randn(10, 8), "weight": torch.randn(30, 8), "target": torch.randint(0, 30, (10,))}
    extra = {k: v for k, v in kwargs.items() if k not in args}
    args.update({k: v for k, v in kwargs.items() if k in args})
    with pytest.raises(ValueError, match=name):
        dpls_linear_loss(args["hidden"], args["weight"], args["target"], **{"top_k": 3, **extra})
