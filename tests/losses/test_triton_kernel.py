"""The fused Triton kernels, run on the CPU through Triton's interpreter.

The interpreter executes the kernels' own source (every ``tl`` op, the per-lane top values, the
bisections, the compaction into scratch), so these tests check the very code a GPU compiles (on a
GPU machine they run compiled). Shapes are small because the interpreter is slow; the launch
configurations are shrunk to match (blocks of 32–128 entries, shallow lanes, tiny scratch rows), so
multi-block rows, the certified threshold and both fallback paths are all exercised. The environment variable is set only while this module runs, so other tests'
``impl="auto"`` never picks the interpreted kernel on the CPU.
"""

from __future__ import annotations

import importlib
import os

import torch

# Triton's own standard library is jit-compiled when triton is first imported, so the interpreter
# switch has to be set before that (on a GPU machine the tests run compiled, on the GPU).
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401 - binds triton's stdlib in interpreted mode

    from dpls.losses import _triton_kernels

    importlib.reload(_triton_kernels)  # interpreted kernels even if it was imported before
    if _previous is None:  # other modules' tests must not see the switch (impl="auto" on CPU)
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dpls.losses import triton_impl  # noqa: E402
from dpls.losses.triton_impl import KernelConfig, triton_dpls_loss  # noqa: E402
from dpls.losses.triton_linear import triton_dpls_linear_loss  # noqa: E402
from loss_reference import check_impl_against_reference, distinct_logits, reference_dpls  # noqa: E402

SMALL = KernelConfig(block_v=64, num_warps=1, programs=2, cap=64)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """Keep ``TRITON_INTERPRET=1`` set while this module's tests run (on a CPU-only machine)."""
    if ON_GPU:
        yield
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from dpls.losses import _triton_kernels

    if not isinstance(tl.standard.max, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; run this module on its own")
    assert isinstance(_triton_kernels._dpls_rows_kernel, InterpretedFunction)
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    yield
    patch.undo()


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches, to prove a test ran the Triton path and not some fallback."""
    calls = []
    real = triton_impl.launch_rows

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_impl, "launch_rows", counting)
    import dpls.losses.triton_linear as linear_mod

    monkeypatch.setattr(linear_mod, "launch_rows", counting)
    return calls


def _dev(x):
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x


def _run(logits, target, eps, k, reduction, *, inplace=False, config=SMALL, grad_out=None, softcap=None):
    """Forward + backward through the kernel on DEVICE; returns (loss, nll, grad) on the CPU."""
    leaf = logits.to(DEVICE, copy=True).requires_grad_(True)
    x = leaf.clone()  # non-leaf, like an lm head's output, so the kernel may overwrite it
    loss, nll = triton_dpls_loss(
        x, _dev(target), _dev(eps), k, -100, reduction, True, inplace, config=config, softcap=softcap
    )
    g = torch.ones_like(loss) if grad_out is None else _dev(grad_out)
    (loss * g).sum().backward()
    return loss.detach().cpu(), nll.cpu(), leaf.grad.cpu()


def _check(logits, target, eps, k, reduction, *, config=SMALL, inplace=False, grad_out=None, softcap=None):
    """Kernel against the float64 reference (ties to the lowest index on both sides; with
    ``softcap``, of the capped logits: in float64 in the reference, inside the kernel)."""
    if grad_out is None:
        grad_out = torch.randn(target.shape, dtype=torch.float64) if reduction == "none" else 0.7
    g = grad_out.float() if isinstance(grad_out, torch.Tensor) else torch.tensor(grad_out)
    loss, nll, grad = _run(
        logits, target, eps, k, reduction, inplace=inplace, config=config, grad_out=g, softcap=softcap
    )
    ref_loss, ref_nll, ref_grad = reference_dpls(
        logits, target, epsilon=eps, top_k=k, reduction=reduction, grad_output=grad_out, softcap=softcap
    )
    assert loss.dtype == torch.float32 and loss.shape == ref_loss.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-5)
    assert grad.dtype == logits.dtype
    scale = float(ref_grad.abs().max()) + 1e-12
    tol = 1e-5 if logits.dtype == torch.float32 else 4 * torch.finfo(logits.dtype).eps
    err = float((grad.double() - ref_grad).abs().max()) / scale
    assert err <= tol, f"gradient error {err:.3g} of max |grad| > {tol}"


def _targets(n, v, ignore_every=4):
    y = torch.randint(0, v, (n,))
    y[::ignore_every] = -100
    return y


# --- through the public front end ----------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "reduction"),
    [(torch.float32, "none"), (torch.bfloat16, "mean"), (torch.float16, "sum")],  # each dtype, each reduction
)
def test_front_end_matches_reference(dtype, reduction, launches):
    check_impl_against_reference(
        "triton", n=12, v=300, top_k=10, dtype=dtype, reduction=reduction, device=DEVICE,
        inplace_backward=reduction == "sum",
    )  # fmt: skip
    assert launches, "the Triton kernel was never launched"


def test_front_end_per_token_epsilon_and_batch_shape(launches):
    check_impl_against_reference(
        "triton", v=200, top_k=7, epsilon="per_token", batch_shape=(2, 5), device=DEVICE
    )
    assert launches


# --- semantics -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_equals_v_is_label_smoothing_and_eps0_is_cross_entropy(dtype):
    z = distinct_logits(8, 150, dtype=dtype)
    y = _targets(8, 150)
    ls, _, _ = _run(z, y, 0.2, 150, "mean")
    ce, nll, _ = _run(z, y, 0.0, 20, "mean")
    ref_ls = F.cross_entropy(z.double(), y, label_smoothing=0.2, ignore_index=-100)
    ref_ce = F.cross_entropy(z.double(), y, ignore_index=-100)
    torch.testing.assert_close(ls.double(), ref_ls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nll.double(), ref_ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 37, 299, 300])
def test_extreme_and_middle_k(k):
    z = distinct_logits(6, 300, dtype=torch.float32)
    _check(z, _targets(6, 300), 0.3, k, "sum")


@pytest.mark.parametrize(
    ("config", "k"),
    [
        (KernelConfig(block_v=32, num_warps=1, programs=2, top_r=1, cap=4096), 3),  # no certificate: scratch
        (KernelConfig(block_v=32, num_warps=1, programs=2, top_r=1, cap=4096), 40),
        (KernelConfig(block_v=32, num_warps=1, programs=2, top_r=2, cap=0), 40),  # counting over the row
        (KernelConfig(block_v=32, num_warps=1, programs=1, top_r=8, cap=16), 40),  # deep lanes, tiny scratch
    ],
    ids=["scratch-3", "scratch-40", "row", "deep"],
)
def test_fallback_paths(config, k):
    """Lanes too shallow to certify the threshold: the exact search still finds it."""
    z = distinct_logits(4, 161, dtype=torch.bfloat16)
    _check(z, _targets(4, 161), 0.3, k, "mean", config=config)


def test_per_token_epsilon():
    z = distinct_logits(9, 120)
    eps = torch.rand(9) * 0.9
    _check(z, _targets(9, 120), eps, 5, "mean")
    _check(z, _targets(9, 120), eps, 120, "none")


@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 3), (torch.bfloat16, 99), (torch.float16, 50)])
def test_ties_choose_exactly_k_lowest_index_first(dtype, k):
    """Few distinct values, so the threshold is tied; T takes the lowest indices among the ties."""
    z = torch.randint(-3, 3, (5, 100)).to(dtype)
    z[0] = 1.0  # a constant row: every entry ties
    z[1, :] = torch.where(torch.arange(100) % 2 == 0, 2.0, -1.0).to(dtype)
    z[2] = -0.0  # −0 and +0 are the same value: the lowest indices win, whatever the sign
    z[2, 5] = 0.0
    z[2, 70] = 2.0
    y = torch.randint(0, 100, (5,))
    _check(z, y, 0.4, k, "sum")
    # exactly k entries carry the ε/k share: read it back off the gradient of an ε-only loss
    _, _, g_eps = _run(z.float(), y, 0.5, k, "sum")
    _, _, g_ce = _run(z.float(), y, 0.0, k, "sum")
    share = (g_ce - g_eps) / 0.5  # = 1[T]/k − onehot(y)
    share.scatter_add_(1, y[:, None], torch.ones(5, 1))
    torch.testing.assert_close((share * k).sum(1), torch.full((5,), float(k)), atol=1e-3, rtol=0)


def test_all_ignored_gives_zero_loss_and_zero_grad():
    z = distinct_logits(4, 90)
    y = torch.full((4,), -100)
    for reduction in ["mean", "sum", "none"]:
        loss, nll, grad = _run(z, y, 0.1, 5, reduction, inplace=True)
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(nll, torch.zeros_like(nll))
        assert torch.equal(grad, torch.zeros_like(grad))


def test_inplace_backward_reuses_the_logits_storage():
    z = distinct_logits(6, 200)
    y = _targets(6, 200)
    leaf = z.to(DEVICE, copy=True).requires_grad_(True)
    x = leaf * 1.0
    seen = []
    x.register_hook(lambda g: seen.append(g.data_ptr()))
    loss = triton_dpls_loss(x, y.to(DEVICE), 0.1, 10, -100, "mean", False, True, config=SMALL)
    loss.backward()
    assert seen == [x.data_ptr()]
    _, _, ref_grad = reference_dpls(z, y, epsilon=0.1, top_k=10)
    torch.testing.assert_close(leaf.grad.cpu().double(), ref_grad, rtol=0, atol=1e-6)


def test_without_grad_the_logits_are_left_alone():
    z = distinct_logits(5, 200)
    y = _targets(5, 200)
    x = z.to(DEVICE, copy=True).requires_grad_(True)
    with torch.no_grad():
        loss = triton_dpls_loss(x, y.to(DEVICE), 0.1, 10, -100, "mean", False, True, config=SMALL)
    assert torch.equal(x.cpu(), z)
    loss = loss.cpu()
    ref_loss, _, _ = reference_dpls(z, y, epsilon=0.1, top_k=10)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)


def _logits_of_kind(kind: str, n: int, v: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian, few integer values (heavy ties), values over many binades, or all negative."""
    if kind == "gauss":
        return torch.randn(n, v, generator=gen) * 3
    if kind == "ints":
        return torch.randint(-2, 3, (n, v), generator=gen).float()
    if kind == "wide":
        z = torch.randn(n, v, generator=gen)  # drawn first, then the spread: the order of the draws
        return z * torch.exp(torch.randn(n, v, generator=gen) * 2).clamp(max=1e3)
    return -torch.rand(n, v, generator=gen) * 4


@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 4),
    v=st.integers(2, 200),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["gauss", "ints", "wide", "negative"]),
    block_v=st.sampled_from([32, 64, 128]),
    cap=st.sampled_from([0, 8, 64, 1024]),
    top_r=st.sampled_from([0, 1, 2, 3, 8]),
    programs=st.integers(1, 3),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    inplace=st.booleans(),
    split=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_select_path_matches_reference(
    n, v, k_frac, dtype, kind, block_v, cap, top_r, programs, reduction, inplace, split, seed
):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(v, round(k_frac * v)))
    z = _logits_of_kind(kind, n, v, gen)
    y = torch.randint(0, v, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < 0.25] = -100
    cfg = KernelConfig(block_v=block_v, num_warps=1, programs=programs, cap=cap, top_r=top_r, split=split)
    _check(z.to(dtype), y, 0.3, k, reduction, config=cfg, inplace=inplace)


@pytest.mark.skipif(ON_GPU, reason="the interpreter switch only matters without a GPU")
def test_is_available_follows_the_interpreter_switch(monkeypatch):
    assert triton_impl.is_available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_impl.is_available(torch.device("cpu"))


@pytest.mark.skipif(ON_GPU, reason="the interpreter switch only matters without a GPU")
def test_auto_never_picks_the_interpreted_kernels_for_cpu_tensors(launches):
    """Under TRITON_INTERPRET=1 the kernels can run on CPU tensors (for tests, very slowly):
    impl="triton" still runs them, but "auto" keeps to the PyTorch implementations."""
    from dpls.losses import dpls_linear_loss, dpls_loss
    from dpls.losses.registry import available_impls, resolve_impl

    cpu = torch.device("cpu")
    for linear in (False, True):
        assert resolve_impl("triton", cpu, torch.float32, linear=linear).name == "triton"  # now loaded
        assert "triton" in available_impls(cpu, linear=linear)
        assert resolve_impl("auto", cpu, torch.float32, linear=linear).name != "triton"
    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(4, 50, generator=gen), torch.randint(0, 50, (4,), generator=gen)
    h, w = torch.randn(4, 8, generator=gen), torch.randn(50, 8, generator=gen)
    dpls_loss(z, y, top_k=5)
    dpls_linear_loss(h, w, y, top_k=5)
    assert not launches, "impl='auto' launched the interpreted Triton kernel on a CPU tensor"
    dpls_loss(z, y, top_k=5, impl="triton")
    dpls_linear_loss(h, w, y, top_k=5, impl="triton")
    assert len(launches) == 2


def test_default_configs_are_launchable_shapes():
    for v in [2, 100, 50304, 262144]:
        for dtype in DTYPES:
            cfg = triton_impl.choose_config(v, dtype, torch.device("cuda"))
            assert cfg.block_v & (cfg.block_v - 1) == 0 and 128 <= cfg.block_v <= 4096
            assert cfg.cap >= cfg.block_v and cfg.block_v >= min(2048, v)


# --- fused linear --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "reduction", "use_bias", "per_token"),
    [
        (torch.float32, "mean", True, False),
        (torch.float32, "none", False, True),
        (torch.bfloat16, "sum", True, False),
        (torch.float32, "sum", False, True),
    ],
)
def test_linear_matches_dense(dtype, reduction, use_bias, per_token, launches):
    n, c, v, k = 11, 16, 96, 8
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(n, c, generator=gen).to(dtype)
    w = (torch.randn(v, c, generator=gen) / c**0.5).to(dtype)
    b = (torch.randn(v, generator=gen) * 0.1).to(dtype) if use_bias else None
    y = _targets(n, v, ignore_every=3)
    eps = torch.rand(n, generator=gen) * 0.5 if per_token else 0.2
    grad_out = torch.randn(n, generator=gen, dtype=torch.float64) if reduction == "none" else 1.5

    hl, wl = h.to(DEVICE, copy=True).requires_grad_(True), w.to(DEVICE, copy=True).requires_grad_(True)
    bl = b.to(DEVICE, copy=True).requires_grad_(True) if b is not None else None
    loss, nll = triton_dpls_linear_loss(
        hl, wl, bl, y.to(DEVICE), _dev(eps), k, -100, reduction, True, 4, config=SMALL
    )
    g = grad_out.float() if isinstance(grad_out, torch.Tensor) else torch.tensor(grad_out)
    (loss * g.to(DEVICE)).sum().backward()
    loss, nll = loss.detach().cpu(), nll.cpu()
    hl, wl, bl = (t.grad.cpu() if t is not None else None for t in (hl, wl, bl))
    assert len(launches) >= 3, "the rows were not processed in chunks"

    logits = h @ w.t() + (b if b is not None else 0)  # the dense path, same dtype
    ref_loss, ref_nll, g_logits = reference_dpls(
        logits, y, epsilon=eps, top_k=k, reduction=reduction, grad_output=grad_out
    )
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss.double(), ref_loss, **tol)
    torch.testing.assert_close(nll.double(), ref_nll, **tol)
    gtol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(hl.double(), g_logits @ w.double(), **gtol)
    torch.testing.assert_close(wl.double(), g_logits.t() @ h.double(), **gtol)
    if bl is not None:
        torch.testing.assert_close(bl.double(), g_logits.sum(0), **gtol)


# --- −inf logits (masked / padded vocabularies) ------------------------------------------------


def _masked_reference(z, y, eps, k, reduction="sum"):
    """Reference on the finite columns only: a −inf logit is masked (p = 0 and never smoothed onto),
    so T is the min(k, #finite) largest finite logits, each getting ε / min(k, #finite)."""
    finite = torch.isfinite(z[0])
    assert bool((torch.isfinite(z) == finite).all()), "the same columns are masked in every row"
    cols = finite.nonzero().squeeze(1)
    remap = torch.full((z.shape[1],), -1, dtype=torch.long)
    remap[cols] = torch.arange(cols.numel())
    y_sub = torch.where(y == -100, y, remap[y.clamp(min=0)])
    k_eff = min(k, cols.numel())
    loss, nll, g_sub = reference_dpls(z[:, cols], y_sub, epsilon=eps, top_k=k_eff, reduction=reduction)
    grad = torch.zeros(z.shape, dtype=torch.float64)
    grad[:, cols] = g_sub
    return loss, nll, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16: the exhaustive test below
def test_minus_inf_logits_first_block_and_anywhere(dtype):
    """A first block that is −inf throughout (the row's running maximum starts at −inf), and −inf
    scattered over the row."""
    v = 150  # blocks of 64: the first block is all −inf, and the last is partial
    z = distinct_logits(5, v, dtype=dtype)
    masked = torch.zeros(v, dtype=torch.bool)
    masked[:64] = True
    masked[torch.tensor([70, 71, 99, 140, 149])] = True
    z[:, masked] = -float("inf")
    n_finite = int((~masked).sum())
    y = torch.tensor([64, 80, 100, -100, 148])
    for k in (7, n_finite, n_finite + 20):  # past the finite count: T = every finite entry
        loss, nll, grad = _run(z, y, 0.3, k, "sum")
        ref_loss, ref_nll, ref_grad = _masked_reference(z, y, 0.3, k)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-5)
        tol = 1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=tol)
    # ε = 0 (a float, or per-token zeros) with k past the finite entries: exactly cross-entropy
    ce = F.cross_entropy(z.double(), y, reduction="sum")
    for eps in (0.0, torch.zeros(5)):
        loss, nll, grad = _run(z, y, eps, n_finite + 20, "sum")
        torch.testing.assert_close(loss.double(), ce, rtol=1e-5, atol=1e-5)
        assert torch.isfinite(grad).all()


def test_k_past_the_finite_logits_smooths_over_the_finite_ones_only():
    """A −inf logit is outside the vocabulary: with k past the finite entries, T is every finite
    entry and each gets ε / (their count), so a padded vocabulary changes nothing."""
    z = distinct_logits(3, 100)
    y = torch.tensor([0, 5, 9])
    padded = torch.cat([z[:, :10], torch.full((3, 90), -float("inf"))], 1)
    for k in (15, 100):  # the selection kernel, and k = V (every entry: label smoothing)
        loss, nll, grad = _run(padded, y, 0.2, k, "none", grad_out=torch.ones(3))
        ref_loss, ref_nll, ref_grad = reference_dpls(z[:, :10], y, epsilon=0.2, top_k=10, reduction="none")
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[:, :10].double(), ref_grad, rtol=0, atol=1e-6)
        assert torch.equal(grad[:, 10:], torch.zeros(3, 90))


# --- gradients the fused kernel cannot give: refused, not wrong ---------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_and_double_backward_are_refused(reduction):
    z = distinct_logits(4, 80)
    y = _targets(4, 80)
    leaf = z.clone().requires_grad_(True)
    loss = triton_dpls_loss(leaf * 1.0, y, 0.1, 5, -100, reduction, False, False, config=SMALL).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    loss = triton_dpls_loss(leaf * 1.0, y, 0.1, 5, -100, reduction, False, False, config=SMALL).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, leaf, create_graph=True)


def test_linear_second_backward_refused_or_exact_and_double_backward_refused():
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(6, 8, generator=gen, requires_grad=True)
    w = torch.randn(40, 8, generator=gen, requires_grad=True)
    y = _targets(6, 40)

    def run(reduction):
        return triton_dpls_linear_loss(h, w, None, y, 0.1, 5, -100, reduction, False, 4, config=SMALL).sum()

    loss = run("mean")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()
    h.grad = w.grad = None
    loss = run("none")  # recomputed in backward: a second backward is exact
    loss.backward(retain_graph=True)
    first = (h.grad.clone(), w.grad.clone())
    loss.backward()
    torch.testing.assert_close(h.grad, 2 * first[0])
    torch.testing.assert_close(w.grad, 2 * first[1])
    for reduction in ("mean", "none"):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(run(reduction), h, create_graph=True)


# --- backward without a host sync -----------------------------------------------------------------


def test_backward_reads_nothing_back_to_the_host(monkeypatch):
    """grad_output scales the gradient on the device: no .item() / float() / bool() in backward,
    so torch.compile has no graph break there."""
    z = distinct_logits(5, 90)
    y = _targets(5, 90)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(5, 8, generator=gen, requires_grad=True)
    w = torch.randn(90, 8, generator=gen, requires_grad=True)
    leaf = z.clone().requires_grad_(True)
    losses = [
        triton_dpls_loss(leaf * 1.0, y, 0.1, 5, -100, "mean", False, True, config=SMALL),
        triton_dpls_linear_loss(h, w, None, y, 0.1, 5, -100, "sum", False, 2, config=SMALL),
    ]

    def host_read(*_args, **_kwargs):
        raise AssertionError("backward read a device value on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            patch.setattr(torch.Tensor, name, host_read)
        (2.5 * losses[0] + 0.5 * losses[1]).backward()
    _, _, ref = reference_dpls(z, y, epsilon=0.1, top_k=5, grad_output=2.5)
    torch.testing.assert_close(leaf.grad.double(), ref, rtol=0, atol=1e-6)
    _, _, g_logits = reference_dpls(h.detach() @ w.detach().t(), y, epsilon=0.1, top_k=5, reduction="sum")
    torch.testing.assert_close(h.grad.double(), 0.5 * g_logits @ w.detach().double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factor", [1.0, -2.5, 0.0])
def test_scale_inplace_decides_on_the_device(factor):
    g = torch.randn(3, 1000).to(torch.bfloat16)
    want = (g.float() * factor).to(torch.bfloat16)
    out = triton_impl.scale_inplace(g, torch.tensor(factor))
    assert out is g
    torch.testing.assert_close(g, want, rtol=2**-7, atol=0)  # the interpreter may round bf16 down


# --- adaptive ε inside the kernel's first pass --------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "gamma", "dtype", "k"),
    [
        ("confidence", 1.0, torch.float32, 7),
        ("confidence", 0.5, torch.bfloat16, 7),
        ("entropy", 2.0, torch.float32, 7),
        ("entropy", 1.0, torch.float16, 150),  # k = V: label smoothing, the one-launch kernel
        ("entropy", 0.0, torch.float32, 7),
    ],
)
def test_adaptive_epsilon_in_kernel_matches_the_unfused_path(mode, gamma, dtype, k):
    """ε_i from the kernel's own max / lse / Σp·z equals ``adaptive_epsilon``'s, and the loss and
    gradient equal the reference's with those ε_i."""
    from dpls.losses.adaptive import adaptive_epsilon
    from dpls.losses.triton_impl import triton_adaptive_dpls_loss

    z = distinct_logits(6, 150, dtype=dtype)
    z[1] *= 6  # a confident row
    z[2] /= 20  # a flat one
    y = _targets(6, 150)
    want_eps = adaptive_epsilon(z.double(), 0.3, mode, gamma)  # float64: 1 − max p is tiny on row 1
    leaf = z.clone().requires_grad_(True)
    loss, nll, eps = triton_adaptive_dpls_loss(
        leaf * 1, y, epsilon=0.3, epsilon_mode=mode, gamma=gamma, top_k=k, config=SMALL
    )
    loss.backward()
    valid = y != -100
    assert torch.equal(eps[~valid], torch.zeros_like(eps[~valid]))
    torch.testing.assert_close(eps[valid].double(), want_eps[valid].double(), rtol=1e-4, atol=1e-7)
    ref_loss, ref_nll, ref_grad = reference_dpls(z, y, epsilon=want_eps, top_k=k)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps * float(ref_grad.abs().max())
    torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=0, atol=tol)


def test_adaptive_entropy_with_minus_inf_logits_is_finite():
    """Masked entries have p = 0 and add nothing to Σp·z (a plain 0·(−inf) would be NaN)."""
    from dpls.losses.triton_impl import triton_adaptive_dpls_loss

    z = distinct_logits(3, 150)
    z[:, :70] = -float("inf")
    y = torch.tensor([80, 90, 149])
    _, _, eps = triton_adaptive_dpls_loss(z, y, epsilon=0.2, epsilon_mode="entropy", top_k=5, config=SMALL)
    zf = z[:, 70:].double()
    p = torch.softmax(zf, -1)
    h = -(p * torch.log_softmax(zf, -1)).sum(-1)
    log_v = torch.log(torch.tensor(80.0, dtype=torch.float64))  # the finite entries: padding changes nothing
    torch.testing.assert_close(eps.double(), 0.2 * h / log_v, rtol=1e-5, atol=0)


def test_adaptive_epsilon_in_the_linear_kernel_matches_the_unfused_path():
    from dpls.losses.adaptive import adaptive_epsilon_from_hidden

    gen = torch.Generator().manual_seed(5)
    h = torch.randn(7, 8, generator=gen, requires_grad=True)
    w = torch.randn(60, 8, generator=gen, requires_grad=True)
    y = _targets(7, 60)
    want_eps = adaptive_epsilon_from_hidden(h.double(), w.double(), 0.25, "confidence", 1.5)
    loss, nll, eps = triton_dpls_linear_loss(
        h, w, None, y, 0.25, 5, -100, "none", True, 3, config=SMALL,
        epsilon_mode="confidence", gamma=1.5, return_epsilon=True,
    )  # fmt: skip
    g_out = torch.randn(7, generator=gen)
    (loss * g_out).sum().backward()  # reduction "none": backward recomputes with the same ε_i
    valid = y != -100
    torch.testing.assert_close(eps[valid].double(), want_eps[valid].double(), rtol=1e-4, atol=1e-7)
    logits = (h @ w.t()).detach()
    ref_loss, ref_nll, g_logits = reference_dpls(
        logits, y, epsilon=want_eps, top_k=5, reduction="none", grad_output=g_out.double()
    )
    torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), g_logits @ w.detach().double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), g_logits.t() @ h.detach().double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["confidence", "entropy"])
def test_objective_uses_the_in_kernel_epsilon_when_impl_is_triton(mode, launches, monkeypatch):
    """With loss_impl="triton" the DPLS objective computes ε_i in the kernel (no separate
    ``adaptive_epsilon`` read) and agrees with the unfused chunked path, logits and hidden alike."""
    from dpls.losses import objective as objective_mod
    from dpls.losses.objective import LossConfig, build_objective

    gen = torch.Generator().manual_seed(6)
    h = torch.randn(2, 3, 8, generator=gen)
    w = torch.randn(70, 8, generator=gen)
    y = torch.randint(0, 70, (2, 3), generator=gen)
    y[0, 1] = -100
    keys = dict(loss="dpls", dpls_epsilon=0.3, dpls_top_k=6, dpls_epsilon_mode=mode, dpls_gamma=1.5)
    want = build_objective(LossConfig(**keys, loss_impl="chunked"))
    got = build_objective(LossConfig(**keys, loss_impl="triton"))
    unfused = []
    for name in ("adaptive_epsilon", "adaptive_epsilon_from_hidden"):
        real = getattr(objective_mod, name)
        monkeypatch.setattr(
            objective_mod, name, lambda *a, _real=real, **kw: unfused.append(1) or _real(*a, **kw)
        )
    z = h @ w.t()
    a, b = want(z, y, step=0), got(z, y, step=0)
    c, d = want.from_hidden(h, w, y, step=0), got.from_hidden(h, w, y, step=0)
    assert len(unfused) == 2, "the triton objective read the logits once more for ε_i"
    assert len(launches) >= 2
    for ref, out in ((a, b), (c, d)):
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.ce, ref.ce, rtol=1e-5, atol=1e-6)
        assert float(out.epsilon) == pytest.approx(float(ref.epsilon), rel=1e-5)


# --- the selection, exhaustively on small rows ----------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "split"),
    [(torch.float32, True), (torch.bfloat16, True), (torch.float16, True), (torch.float32, False)],
    ids=["fp32", "bf16", "fp16", "fp32-one-launch"],
)
def test_selection_ties_masks_and_every_k_against_float64(dtype, split):
    """Rows of heavy ties (few distinct values), −inf masks and ±0, every k from 1 to the finite
    count, shallow lanes (so the certificate fails and the exact search runs) and deep ones."""
    gen = torch.Generator().manual_seed(7)
    v = 70
    z = torch.randint(-3, 4, (3, v), generator=gen).to(dtype) / 2
    z[0, ::3] = 0.5  # a tie at the top of row 0
    z[1, 1::2] = -0.0
    masked = torch.zeros(v, dtype=torch.bool)
    masked[[0, 1, 33, 34, 35, 69]] = True
    z[:, masked] = -float("inf")
    y = torch.tensor([2, 5, -100])
    n_finite = v - int(masked.sum())
    for k, top_r in ((1, 1), (2, 8), (17, 1), (40, 2), (n_finite - 1, 3), (n_finite, 1), (v - 1, 2), (v, 1)):
        cfg = KernelConfig(block_v=32, num_warps=1, programs=2, top_r=top_r, cap=16, split=split)
        loss, nll, grad = _run(z, y, 0.3, k, "sum", config=cfg)
        ref_loss, ref_nll, ref_grad = _masked_reference(z, y, 0.3, k)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-5)
        tol = 1e-6 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=tol, msg=f"k={k}")
    # k = V with ε = 0: cross-entropy, masked entries and all
    loss, _, _ = _run(z, y, 0.0, v, "sum")
    torch.testing.assert_close(loss.double(), F.cross_entropy(z.double(), y, reduction="sum"))


# --- logit soft-capping inside the kernels --------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 4),
    v=st.integers(2, 160),
    k_frac=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["gauss", "ints", "negative"]),
    eps=st.sampled_from([0.0, 0.3, "per_token"]),
    softcap=st.sampled_from([1.5, 5.0, 30.0]),
    masked=st.booleans(),
    block_v=st.sampled_from([32, 64]),
    cap=st.sampled_from([0, 8, 1024]),
    top_r=st.sampled_from([0, 1, 3]),
    reduction=st.sampled_from(["mean", "none"]),
    split=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_softcap_in_the_kernel_equals_capping_first(
    n, v, k_frac, dtype, kind, eps, softcap, masked, block_v, cap, top_r, reduction, split, seed
):
    """Every selection path (certified lanes, scratch row, counting over the row, tie cut), ties
    among capped values, −inf masks, ε = 0, per-token ε and k = V, each dtype: the kernel's loss
    and gradient are those of the capped logits (float64 reference, gradient through tanh)."""
    from hypothesis import assume

    gen = torch.Generator().manual_seed(seed)
    k = max(1, min(v, round(k_frac * v)))
    z = _logits_of_kind(kind, n, v, gen).to(dtype)
    y = torch.randint(0, v, (n,), generator=gen)
    if masked and v > 2:
        off = torch.rand(n, v, generator=gen) < 0.2
        off.scatter_(1, y[:, None], False)
        z = z.masked_fill(off, -float("inf"))
    y[torch.rand(n, generator=gen) < 0.25] = -100
    # values distinct in the dtype stay distinct once capped (no saturation to ±cap in float32)
    raw, capped = z.float(), softcap * torch.tanh(z.float() / softcap)
    assume(all(raw[i].unique().numel() == capped[i].unique().numel() for i in range(n)))
    e = torch.rand(n, generator=gen) * 0.5 if eps == "per_token" else eps
    cfg = KernelConfig(block_v=block_v, num_warps=1, programs=2, cap=cap, top_r=top_r, split=split)
    _check(z, y, e, k, reduction, config=cfg, softcap=softcap)


@pytest.mark.parametrize(
    "config",
    [
        KernelConfig(block_v=32, num_warps=1, programs=2, top_r=1, cap=4096),  # scratch row (float32)
        KernelConfig(block_v=32, num_warps=1, programs=2, top_r=2, cap=0),  # counting over the row
    ],
    ids=["scratch", "row"],
)
def test_softcap_fallback_paths_in_half_precision(config):
    """The compacted candidates are capped float32 values, not half-precision ones."""
    z = distinct_logits(4, 161, dtype=torch.bfloat16, softcap=2.0)
    for k in (3, 40):
        _check(z, _targets(4, 161), 0.3, k, "mean", config=config, softcap=2.0)


def test_softcap_linear_and_adaptive_epsilon_in_the_kernel():
    """Fused-linear with the cap inside the kernel (reduction "none": backward recomputes), and
    the in-kernel adaptive ε_i of the capped prediction."""
    from dpls.losses.adaptive import adaptive_epsilon
    from dpls.losses.triton_impl import triton_adaptive_dpls_loss

    gen = torch.Generator().manual_seed(8)
    h = torch.randn(7, 8, generator=gen, requires_grad=True)
    w = torch.randn(60, 8, generator=gen, requires_grad=True)
    y = _targets(7, 60)
    loss, nll = triton_dpls_linear_loss(
        h, w, None, y, 0.25, 5, -100, "none", True, 3, config=SMALL, softcap=2.0
    )
    g_out = torch.randn(7, generator=gen)
    (loss * g_out).sum().backward()
    logits = (h @ w.t()).detach()
    ref_loss, ref_nll, g_logits = reference_dpls(
        logits, y, epsilon=0.25, top_k=5, reduction="none", grad_output=g_out.double(), softcap=2.0
    )
    torch.testing.assert_close(loss.detach().double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll.double(), ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), g_logits @ w.detach().double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), g_logits.t() @ h.detach().double(), rtol=1e-4, atol=1e-5)

    z = distinct_logits(6, 150, softcap=3.0)
    capped = 3.0 * torch.tanh(z.double() / 3.0)
    want_eps = adaptive_epsilon(capped, 0.3, "entropy", 1.0).double()
    leaf = z.clone().requires_grad_(True)
    loss, _, eps = triton_adaptive_dpls_loss(
        leaf * 1, y[:6], epsilon=0.3, epsilon_mode="entropy", top_k=7, config=SMALL, softcap=3.0
    )
    loss.backward()
    valid = y[:6] != -100
    torch.testing.assert_close(eps[valid].double(), want_eps[valid], rtol=1e-4, atol=1e-7)
    ref_loss, _, ref_grad = reference_dpls(z, y[:6], epsilon=want_eps, top_k=7, softcap=3.0)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_softcap_objective_from_hidden_agrees_with_the_chunked_path(launches):
    """What the trainer calls with fused_linear_loss and a soft-capped model, z-loss included."""
    from dpls.losses.objective import LossConfig, build_objective

    gen = torch.Generator().manual_seed(9)
    h = torch.randn(2, 3, 8, generator=gen)
    w = torch.randn(70, 8, generator=gen)
    y = torch.randint(0, 70, (2, 3), generator=gen)
    keys = dict(loss="dpls", dpls_epsilon=0.3, dpls_top_k=6, z_loss=1e-3)
    want = build_objective(LossConfig(**keys, loss_impl="chunked")).from_hidden(h, w, y, step=0, softcap=2.0)
    got = build_objective(LossConfig(**keys, loss_impl="triton")).from_hidden(h, w, y, step=0, softcap=2.0)
    assert launches
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.ce, want.ce, rtol=1e-5, atol=1e-6)
