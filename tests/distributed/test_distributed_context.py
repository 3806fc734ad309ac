"""DistContext, wrap_model and no_sync on 2 CPU processes joined by gloo.

One spawn runs every multi-process check (process start-up dominates the cost); the
single-process tests check the world-of-one fallbacks and argument validation.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpls.distributed import DistContext, init_distributed, no_sync, unwrap, wrap_model
from dpls.distributed import is_fsdp as parallel_is_fsdp
from dpls.distributed.testing import run_workers

WORLD = 2


class TinyNet(nn.Module):
    """Embedding → two blocks in a ModuleList → tied head: the shape FSDP2 wrapping expects."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.Tanh(), nn.Linear(2 * dim, dim)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.embed(idx)
        for block in self.layers:
            h = h + block(h)
        return self.norm(h) @ self.embed.weight.T


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


def _full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in unwrap(model).named_parameters():
        g = p.grad
        if hasattr(g, "full_tensor"):  # FSDP2 DTensor shard → the whole gradient
            g = g.full_tensor()
        out[name] = g.detach().clone()
    return out


def _grads_unsynced(model: nn.Module, ctx: DistContext) -> bool:
    """After a backward under no_sync: was the gradient reduction really skipped?"""
    params = list(unwrap(model).parameters())
    if parallel_is_fsdp(model):
        # FSDP2 keeps the unreduced gradient unsharded and internal: no shard gradient yet.
        return all(p.grad is None for p in params)
    # DDP: each rank holds only its own micro-batch's gradient, so ranks disagree.
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    gathered = ctx.all_gather_object(flat)
    return not torch.allclose(gathered[0], gathered[1])


def _worker_checks() -> dict[str, object]:
    """Runs on every rank; returns rank 0's observations (asserts on every rank too)."""
    ctx = init_distributed("cpu")
    res: dict[str, object] = {"ctx": (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.is_main)}
    # collectives
    t = torch.tensor([float(ctx.rank + 1), 10.0])
    res["sum"] = ctx.all_reduce_sum(t).tolist()
    res["mean"] = ctx.all_reduce_mean(t).tolist()
    res["max"] = ctx.all_reduce_max(t).tolist()
    res["input_untouched"] = t.tolist() == [float(ctx.rank + 1), 10.0]
    res["bcast"] = ctx.broadcast_object({"from": ctx.rank})
    res["gather"] = ctx.all_gather_object(ctx.rank * 3)
    res["any"] = (ctx.any_rank(ctx.rank == 1), ctx.any_rank(False), ctx.any_rank(True))
    ctx.barrier()

    # data: rank r takes rows r::WORLD of the same global batch, two micro-batches each
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (8, 6), generator=g)
    torch.manual_seed(0)
    ref = TinyNet()
    ref_loss = _loss(ref, x)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    mine = x[ctx.rank :: WORLD]
    micro = mine.chunk(2)

    for parallel in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = wrap_model(TinyNet(), ctx, parallel=parallel)
        for i, mb in enumerate(micro):
            with no_sync(model, enabled=i < len(micro) - 1):
                (_loss(model, mb) / len(micro)).backward()
            if i == 0:
                res[f"{parallel}_unsynced"] = _grads_unsynced(model, ctx)
        got = _full_grads(model)
        res[f"{parallel}_max_grad_err"] = max((got[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
        res[f"{parallel}_unwrap_names"] = sorted(n for n, _ in unwrap(model).named_parameters()) == sorted(
            ref_grads
        )
    res["fsdp_blocks_sharded"] = all(type(b).__name__.startswith("FSDP") for b in model.layers)
    return res


@pytest.fixture(scope="module")
def two_rank_results() -> dict[str, object]:
    return run_workers(_worker_checks, WORLD)


def test_context_fields_under_torchrun_env(two_rank_results):
    assert two_rank_results["ctx"] == (0, WORLD, 0, "gloo", True)


def test_collectives(two_rank_results):
    r = two_rank_results
    assert r["sum"] == [3.0, 20.0]
    assert r["mean"] == [1.5, 10.0]
    assert r["max"] == [2.0, 10.0]
    assert r["input_untouched"]
    assert r["bcast"] == {"from": 0}
    assert r["gather"] == [0, 3]
    assert r["any"] == (True, False, True)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_accumulated_gradients_equal_full_batch(two_rank_results, parallel):
    r = two_rank_results
    assert r[f"{parallel}_max_grad_err"] < 1e-6
    assert r[f"{parallel}_unsynced"], "no_sync did not skip the gradient reduction"
    assert r[f"{parallel}_unwrap_names"]


def test_fsdp_shards_each_block(two_rank_results):
    assert two_rank_results["fsdp_blocks_sharded"]


def test_world_of_one_without_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.is_distributed) == (
        0,
        1,
        None,
        True,
        False,
    )
    t = torch.tensor([2.0, 4.0])
    assert torch.equal(ctx.all_reduce_mean(t), t) and torch.equal(ctx.all_reduce_sum(t), t)
    assert ctx.broadcast_object([1, 2]) == [1, 2]
    ctx.barrier()
    model = TinyNet()
    assert wrap_model(model, ctx, "ddp") is model and wrap_model(model, ctx, "fsdp") is model
    with no_sync(model, enabled=True):
        _loss(model, torch.randint(0, 11, (2, 4))).backward()
    assert unwrap(model) is model
    ctx.destroy()


def test_bad_arguments(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="incomplete"):
        init_distributed("cpu")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="device"):
        init_distributed("tpu")
    with pytest.raises(ValueError, match="parallel must be one of"):
        wrap_model(TinyNet(), DistContext(), "zero3")
    with pytest.raises(ValueError, match="param_dtype"):
        wrap_model(TinyNet(), DistContext(), "ddp", param_dtype=torch.bfloat16)


def test_unwrap_sees_through_compile_wrapper():
    """``torch.compile`` returns a wrapper holding the module as ``_orig_mod`` (imported lazily
    here would cost seconds of dynamo start-up; the attribute is what unwrap relies on)."""

    class Compiled(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    model = TinyNet()
    assert unwrap(Compiled(model)) is model


def test_transformer_blocks_are_the_outermost_list_children():
    from dpls.distributed.parallel import transformer_blocks

    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]) for _ in range(3))
            self.head = nn.Linear(2, 2)

    model = Nested()
    assert transformer_blocks(model) == list(model.layers)
    assert transformer_blocks(TinyNet()) != [] and transformer_blocks(nn.Linear(2, 2)) == []
