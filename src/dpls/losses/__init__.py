"""The DPLS loss library (docs/losses.md): kernel → functional → ``nn.Module`` → training objective.

Implementations register in :mod:`dpls.losses.registry`; importing this package registers the
pure-PyTorch ones (``reference``, ``chunked``) and never imports triton (the ``triton``
implementation is imported on first use with a CUDA tensor). See docs/losses.md.
"""

from __future__ import annotations

from dpls.losses import chunked as _chunked  # noqa: F401 - registers "chunked"
from dpls.losses import reference as _reference  # noqa: F401 - registers "reference"
from dpls.losses.adaptive import adaptive_epsilon, adaptive_epsilon_from_hidden
from dpls.losses.functional import dpls_loss, label_smoothing_loss
from dpls.losses.hf import make_hf_loss
from dpls.losses.linear import dpls_linear_loss
from dpls.losses.modules import DPLSLoss
from dpls.losses.objective import LossConfig, Objective, ObjectiveOutput, build_objective, register_objective
from dpls.losses.registry import available_impls, register_impl, register_linear_impl
from dpls.losses.related import (
    confidence_penalty_loss,
    dpls_kl_loss,
    prior_label_smoothing_loss,
    z_loss,
)
from dpls.losses.schedules import EpsilonSchedule

__all__ = [
    "DPLSLoss",
    "EpsilonSchedule",
    "LossConfig",
    "Objective",
    "ObjectiveOutput",
    "adaptive_epsilon",
    "adaptive_epsilon_from_hidden",
    "available_impls",
    "build_objective",
    "confidence_penalty_loss",
    "dpls_kl_loss",
    "dpls_linear_loss",
    "dpls_loss",
    "label_smoothing_loss",
    "make_hf_loss",
    "prior_label_smoothing_loss",
    "register_impl",
    "register_linear_impl",
    "register_objective",
    "z_loss",
]
