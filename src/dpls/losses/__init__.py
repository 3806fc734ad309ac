"""The DPLS loss library (SPEC §1): kernel → functional → ``nn.Module``.

Implementations register in :mod:`dpls.losses.registry`; importing this package registers the
pure-PyTorch ones (``reference``, ``chunked``) and never imports triton.
"""

from __future__ import annotations

from dpls.losses import chunked as _chunked  # noqa: F401 - registers "chunked"
from dpls.losses import reference as _reference  # noqa: F401 - registers "reference"
from dpls.losses.functional import dpls_loss, label_smoothing_loss
from dpls.losses.linear import dpls_linear_loss
from dpls.losses.modules import DPLSLoss
from dpls.losses.registry import available_impls, register_impl, register_linear_impl

__all__ = [
    "DPLSLoss",
    "available_impls",
    "dpls_linear_loss",
    "dpls_loss",
    "label_smoothing_loss",
    "register_impl",
    "register_linear_impl",
]
