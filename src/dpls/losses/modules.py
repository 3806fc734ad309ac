"""``nn.Module`` wrappers of the functional losses (the top layer: kernel → functional → module)."""

from __future__ import annotations

import torch
from torch import nn

from dpls.losses.functional import dpls_loss
from dpls.losses.registry import check_impl_name
from dpls.losses.softcap import check_softcap
from dpls.losses.validation import check_reduction, check_scalar_epsilon


class DPLSLoss(nn.Module):
    """``DPLSLoss(epsilon, top_k, ...)(logits, target)`` — see :func:`dpls.losses.dpls_loss`."""

    def __init__(
        self,
        epsilon: float = 0.1,
        top_k: int = 100,
        ignore_index: int = -100,
        reduction: str = "mean",
        impl: str = "auto",
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        # Checked here too, so a bad config fails when the model is built, not at the first step.
        self.epsilon = check_scalar_epsilon(epsilon)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1 (and <= V at call time), got {top_k!r}")
        check_reduction(reduction)
        check_impl_name(impl)
        self.top_k, self.ignore_index, self.reduction, self.impl = top_k, ignore_index, reduction, impl
        self.softcap = check_softcap(softcap)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, epsilon: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        return dpls_loss(
            logits,
            target,
            epsilon=self.epsilon if epsilon is None else epsilon,
            top_k=self.top_k,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            impl=self.impl,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        cap = "" if self.softcap is None else f", softcap={self.softcap}"
        return f"epsilon={self.epsilon}, top_k={self.top_k}, reduction={self.reduction!r}, impl={self.impl!r}{cap}"
