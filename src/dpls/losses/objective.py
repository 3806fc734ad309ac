"""What the trainer calls: a training objective built from the config keys (docs/ARCHITECTURE.md).

``build_objective(LossConfig(...))`` returns an :class:`Objective`;
``objective(logits, target, step=t)`` and ``objective.from_hidden(hidden, weight, target, step=t)``
give ``ObjectiveOutput(loss, ce, epsilon)`` (``from_hidden(..., softcap=cap)`` for a model whose
logits are soft-capped: the logits it forms are capped first, as the model's own forward caps them):

* ``loss`` — the objective being minimised (z-loss included), mean over non-ignored tokens;
* ``ce`` — plain cross-entropy of the same tokens from the same pass, detached: the number that is
  comparable across objectives (the DPLS objective is larger than CE by design);
* ``epsilon`` — the ε in force at this step (for adaptive modes, the mean ε_i over valid tokens).

Objectives register by name (``@register_objective("dpls")``), so a new loss is a new class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch.utils.checkpoint import checkpoint

from dpls.losses.adaptive import EPSILON_MODES, adaptive_epsilon, adaptive_epsilon_from_hidden
from dpls.losses.functional import dpls_loss
from dpls.losses.linear import default_chunk_size, dpls_linear_loss
from dpls.losses.registry import impl_names, resolve_impl
from dpls.losses.related import (
    check_prior,
    confidence_penalty_loss,
    logsumexp_rows,
    prior_label_smoothing_loss,
)
from dpls.losses.schedules import SHAPES, EpsilonSchedule
from dpls.losses.softcap import check_softcap
from dpls.losses.softcap import softcap as apply_softcap
from dpls.losses.validation import check_scalar_epsilon

IGNORE_INDEX = -100


@dataclass
class LossConfig:
    """The loss keys of the training config (same names as the trainer's keys)."""

    loss: str = "ce"  # "ce" | "ls" | "dpls" | "confidence_penalty" | "prior_ls"
    dpls_epsilon: float = 0.1
    dpls_top_k: int = 100
    dpls_schedule: str = "constant"  # constant | linear | cosine | warmup | step
    dpls_start_step: int = 0
    dpls_end_step: int = 0  # 0 = max_iters, filled in by the trainer
    dpls_epsilon_final: float = 0.0
    dpls_epsilon_mode: str = "constant"  # constant | confidence | entropy
    dpls_gamma: float = 1.0
    label_smoothing: float = 0.1  # ε of "ls" and "prior_ls"
    confidence_penalty_beta: float = 0.1
    z_loss: float = 0.0  # λ of λ·lse², added to any objective
    loss_impl: str = "auto"

    @classmethod
    def from_config(cls, cfg: Any) -> LossConfig:
        """Pick this dataclass's keys from a mapping or any object with those attributes (e.g. TrainConfig)."""
        get: Callable[[str], Any]
        if isinstance(cfg, Mapping):
            get = cfg.__getitem__
            has: Callable[[str], bool] = cfg.__contains__
        else:
            get = lambda k: getattr(cfg, k)  # noqa: E731
            has = lambda k: hasattr(cfg, k)  # noqa: E731
        return cls(**{f.name: get(f.name) for f in fields(cls) if has(f.name)})

    def check(self) -> LossConfig:
        """Every key checked under its own name, so a bad ``--dpls_*`` flag is named as it was given
        (the functions underneath would name their own arguments: ``epsilon``, ``shape``, ...)."""
        for key in ("dpls_epsilon", "dpls_epsilon_final", "label_smoothing"):
            check_scalar_epsilon(getattr(self, key), key)
        for key, low in (("dpls_top_k", 1), ("dpls_start_step", 0), ("dpls_end_step", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
        if self.dpls_schedule not in SHAPES:
            raise ValueError(f"dpls_schedule must be one of {sorted(SHAPES)}, got {self.dpls_schedule!r}")
        if SHAPES[self.dpls_schedule][2] and 0 < self.dpls_end_step <= self.dpls_start_step:
            raise ValueError(
                f"dpls_end_step must be > dpls_start_step={self.dpls_start_step} for the "
                f"{self.dpls_schedule!r} schedule, got {self.dpls_end_step}"
            )
        if self.dpls_epsilon_mode not in EPSILON_MODES:
            raise ValueError(
                f"dpls_epsilon_mode must be one of {sorted(EPSILON_MODES)}, got {self.dpls_epsilon_mode!r}"
            )
        for key in ("dpls_gamma", "confidence_penalty_beta", "z_loss"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{key} must be a finite float >= 0, got {value!r}")
        if self.loss_impl not in impl_names():
            raise ValueError(f"loss_impl must be one of {impl_names()}, got {self.loss_impl!r}")
        return self

    def schedule(self) -> EpsilonSchedule:
        return EpsilonSchedule(
            epsilon=self.dpls_epsilon,
            epsilon_final=self.dpls_epsilon_final,
            start_step=self.dpls_start_step,
            end_step=self.dpls_end_step,
            shape=self.dpls_schedule,
        )


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # the objective (0-d, with grad)
    ce: torch.Tensor  # plain cross-entropy of the same tokens (0-d, detached)
    # the ε in force; 0 for objectives without one. Adaptive modes: the mean ε_i over valid
    # tokens as a 0-d tensor on the logits' device (the trainer reads it on log steps only)
    epsilon: float | torch.Tensor


_OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    def deco(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return deco


def objective_names() -> list[str]:
    return sorted(_OBJECTIVES)


class Objective:
    """Base class: subclasses implement ``_loss`` (and optionally ``_loss_from_hidden``)."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: LossConfig, token_prior: torch.Tensor | None = None) -> None:
        self.cfg = cfg.check()
        self.token_prior = token_prior
        # Set by a caller whose logits are its own temporaries, needed by nothing after the loss:
        # the loss may then write their gradient into their storage (no second [N, V] buffer).
        self.inplace_backward = False

    # --- subclasses -------------------------------------------------------------------------
    def _loss(
        self, logits: torch.Tensor, target: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError

    def _loss_from_hidden(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        step: int,
        bias: torch.Tensor | None,
        softcap: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Default: form the logits (objectives without a fused-linear form)."""
        logits = (
            hidden @ weight.T
            if bias is None
            else torch.addmm(bias, hidden.reshape(-1, hidden.shape[-1]), weight.T)
        )
        logits = apply_softcap(logits, softcap)
        return self._loss(logits.reshape(*hidden.shape[:-1], -1), target, step)

    # --- the trainer's calls ------------------------------------------------------------------
    def __call__(self, logits: torch.Tensor, target: torch.Tensor, *, step: int) -> ObjectiveOutput:
        loss, ce, eps = self._loss(logits, target, step)
        if self.cfg.z_loss > 0:
            loss = loss + self.cfg.z_loss * _masked_mean(logsumexp_rows(logits).square(), target)
        return ObjectiveOutput(loss=loss, ce=ce.detach(), epsilon=eps)

    def from_hidden(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        *,
        step: int,
        bias: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> ObjectiveOutput:
        """The same objective from hidden states ``[..., C]`` and the output weight ``[V, C]``;
        with ``softcap`` (the model's ``logit_softcap``) of the capped logits ``cap·tanh(z/cap)``."""
        cap = check_softcap(softcap)
        loss, ce, eps = self._loss_from_hidden(hidden, weight, target, step, bias, cap)
        if self.cfg.z_loss > 0:
            lse = linear_logsumexp(hidden, weight, bias, cap)
            loss = loss + self.cfg.z_loss * _masked_mean(lse.square(), target)
        return ObjectiveOutput(loss=loss, ce=ce.detach(), epsilon=eps)

    def epsilon_at(self, step: int) -> float:
        """The scalar ε at ``step`` (before any per-token adaptation)."""
        return 0.0


def _masked_mean(per_token: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    valid = target != IGNORE_INDEX
    return (per_token * valid).sum() / valid.sum().clamp_min(1)


def linear_logsumexp(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None = None
) -> torch.Tensor:
    """Row ``lse`` of ``hidden @ weight.T (+ bias)`` (capped by ``softcap``) with the logits formed
    (and freed) in chunks.

    Uses checkpointing: each chunk's logits are recomputed in backward instead of kept.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    step = default_chunk_size(h.shape[0], weight.shape[0])

    def chunk_lse(hc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        z = hc @ w.T if b is None else torch.addmm(b, hc, w.T)
        return torch.logsumexp(apply_softcap(z.float(), softcap), dim=-1)

    parts = [
        checkpoint(chunk_lse, h[s : s + step], weight, bias, use_reentrant=False)
        for s in range(0, h.shape[0], step)
    ]
    return torch.cat(parts).reshape(hidden.shape[:-1])


class _SmoothedObjective(Objective):
    """CE, LS and DPLS: the DPLS loss with an ε and k chosen per step."""

    def _plan(self, v: int, step: int) -> tuple[float, int, str, float]:
        """(ε, k, ε mode, γ) at ``step`` for vocabulary size ``v``."""
        raise NotImplementedError

    def _loss(self, logits, target, step):
        eps, k, mode, gamma = self._plan(logits.shape[-1], step)
        if eps > 0 and mode != "constant" and self._fused_kernel(logits):  # ε_i in the kernel's pass
            from dpls.losses.triton_impl import triton_adaptive_dpls_loss

            loss, ce, eps_i = triton_adaptive_dpls_loss(
                logits,
                target,
                epsilon=eps,
                epsilon_mode=mode,
                gamma=gamma,
                top_k=k,
                ignore_index=IGNORE_INDEX,
            )
            return loss, ce, _eps_report(eps_i, target)
        eps_arg = adaptive_epsilon(logits, eps, mode, gamma) if eps > 0 else eps
        # z-loss keeps the logits for its own backward: then they must stay as they are
        inplace = self.inplace_backward and self.cfg.z_loss == 0
        loss, ce = dpls_loss(logits, target, inplace_backward=inplace, **self._dpls_args(eps_arg, k))
        return loss, ce, _eps_report(eps_arg, target)

    def _loss_from_hidden(self, hidden, weight, target, step, bias, softcap=None):
        eps, k, mode, gamma = self._plan(weight.shape[0], step)
        if eps > 0 and mode != "constant" and self._fused_kernel(hidden, linear=True):
            from dpls.losses.triton_linear import triton_adaptive_dpls_linear_loss

            loss, ce, eps_i = triton_adaptive_dpls_linear_loss(
                hidden, weight, target, bias=bias, epsilon=eps, epsilon_mode=mode, gamma=gamma,
                top_k=k, ignore_index=IGNORE_INDEX, softcap=softcap,
            )  # fmt: skip
            return loss, ce, _eps_report(eps_i, target)
        eps_arg = (
            adaptive_epsilon_from_hidden(hidden, weight, eps, mode, gamma, bias=bias, softcap=softcap)
            if eps > 0
            else eps
        )
        loss, ce = dpls_linear_loss(
            hidden, weight, target, bias=bias, softcap=softcap, **self._dpls_args(eps_arg, k)
        )
        return loss, ce, _eps_report(eps_arg, target)

    def _fused_kernel(self, x: torch.Tensor, *, linear: bool = False) -> bool:
        """Whether ``loss_impl`` resolves to the Triton kernels, which compute adaptive ε_i themselves."""
        return resolve_impl(self.cfg.loss_impl, x.device, x.dtype, linear=linear).name == "triton"

    def _dpls_args(self, epsilon: float | torch.Tensor, top_k: int) -> dict[str, Any]:
        """The arguments both DPLS entry points get (the plain CE comes back beside the loss)."""
        return {
            "epsilon": epsilon,
            "top_k": top_k,
            "ignore_index": IGNORE_INDEX,
            "impl": self.cfg.loss_impl,
            "return_nll": True,
        }


def _eps_report(eps: float | torch.Tensor, target: torch.Tensor) -> float | torch.Tensor:
    if not isinstance(eps, torch.Tensor):
        return float(eps)
    return _masked_mean(eps.detach(), target)  # stays on the device: no host sync


@register_objective("ce")
class CrossEntropyObjective(_SmoothedObjective):
    def _plan(self, v, step):
        return 0.0, 1, "constant", 1.0


@register_objective("ls")
class LabelSmoothingObjective(_SmoothedObjective):
    def _plan(self, v, step):
        return self.cfg.label_smoothing, v, "constant", 1.0

    def epsilon_at(self, step):
        return float(self.cfg.label_smoothing)


@register_objective("dpls")
class DPLSObjective(_SmoothedObjective):
    def __init__(self, cfg: LossConfig, token_prior: torch.Tensor | None = None) -> None:
        super().__init__(cfg, token_prior)
        self.schedule = cfg.schedule()

    def _plan(self, v, step):
        if self.cfg.dpls_top_k > v:
            raise ValueError(f"dpls_top_k must be in [1, V={v}], got {self.cfg.dpls_top_k}")
        return (
            self.schedule(step),
            self.cfg.dpls_top_k,
            self.cfg.dpls_epsilon_mode,
            float(self.cfg.dpls_gamma),
        )

    def epsilon_at(self, step):
        return self.schedule(step)


@register_objective("confidence_penalty")
class ConfidencePenaltyObjective(Objective):
    """``CE − β·H(p)``; from hidden states it forms the logits (no fused-linear form)."""

    def _loss(self, logits, target, step):
        loss, ce = confidence_penalty_loss(
            logits,
            target,
            beta=float(self.cfg.confidence_penalty_beta),
            ignore_index=IGNORE_INDEX,
            return_nll=True,
        )
        return loss, ce, 0.0


@register_objective("prior_ls")
class PriorLabelSmoothingObjective(Objective):
    """Label smoothing (ε = ``label_smoothing``) spread ∝ ``token_prior``; forms the logits from hidden states."""

    def __init__(self, cfg: LossConfig, token_prior: torch.Tensor | None = None) -> None:
        super().__init__(cfg, token_prior)
        if token_prior is None:
            raise ValueError("loss 'prior_ls' needs token_prior (a [V] distribution, e.g. token frequencies)")
        self.token_prior = check_prior(token_prior, token_prior.shape[0], token_prior.device)

    def _loss(self, logits, target, step):
        prior = self.token_prior
        if prior.shape[0] != logits.shape[-1]:
            raise ValueError(
                f"token_prior has {prior.shape[0]} entries but the vocabulary has {logits.shape[-1]}"
            )
        loss, ce = prior_label_smoothing_loss(
            logits,
            target,
            prior.to(logits.device),
            epsilon=float(self.cfg.label_smoothing),
            ignore_index=IGNORE_INDEX,
            return_nll=True,
        )
        return loss, ce, float(self.cfg.label_smoothing)

    def epsilon_at(self, step):
        return float(self.cfg.label_smoothing)


def build_objective(cfg: LossConfig, *, token_prior: torch.Tensor | None = None) -> Objective:
    """The :class:`Objective` named by ``cfg.loss``; every key is checked here, before training starts."""
    cls = _OBJECTIVES.get(cfg.loss)
    if cls is None:
        raise ValueError(f"loss must be one of {objective_names()}, got {cfg.loss!r}")
    return cls(cfg, token_prior)
