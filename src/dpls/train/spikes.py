"""Loss spikes, counted on every step on the device: `SpikeCounter`.

The rule is OLMo-core's stability monitor (its ``StabilityMonitorCallback``): the loss of a
step is a spike when it lies more than ``sigmas`` standard deviations above the mean of the
``window`` losses before it,

    spike_t  ⇔  L_t > mean(L_{t−w..t−1}) + k · σ(L_{t−w..t−1}),   w = spike_window, k = spike_sigmas,

with σ the population standard deviation (divisor w, not w − 1). As there:

* nothing is judged until the window holds ``window`` losses;
* the tested loss enters the window afterwards, spike or not (a lasting jump in the loss
  counts once, then becomes the new normal);
* a window whose σ is below 1e-10 judges nothing (a constant loss has no scale to exceed).

One choice is ours: a non-finite loss (a step the trainer skips, counted as ``skipped``) is
neither a spike nor part of the window, which would otherwise be NaN for ``window`` steps.

The loss is the objective the trainer logs (``loss``: the mean over the whole global batch,
all-reduced, so every rank holds the same value and counts the same spikes). Everything is a
tensor op on the loss's device: `update` never waits for the device, and the count is read
(`count`) only on log steps, where the loop reads the step's values anyway. The window is kept
in order, oldest first, so a checkpoint stores it as a plain list and a resumed run sums the
same numbers in the same order: it counts exactly as the uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

MIN_SIGMA = 1e-10  # a window with a smaller standard deviation judges nothing (as OLMo-core)


class SpikeCounter:
    """Counts loss spikes (see the module docstring) of a run on ``device``."""

    def __init__(self, window: int, sigmas: float, device: torch.device | str = "cpu") -> None:
        if window < 2:
            raise ValueError(f"spike_window must be an integer >= 2, got {window}")
        if not (math.isfinite(sigmas) and sigmas > 0):
            raise ValueError(f"spike_sigmas must be a finite number > 0, got {sigmas}")
        self.window, self.sigmas = window, float(sigmas)
        self._losses = torch.zeros(window, dtype=torch.float64, device=device)  # oldest first
        self._seen = torch.zeros((), dtype=torch.int64, device=device)  # finite losses so far
        self._spikes = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor) -> None:
        """Judge one step's loss (a 0-d or one-element tensor), then add it to the window.
        Only tensor ops: nothing here waits for the device."""
        x = loss.detach().reshape(()).to(self._losses.dtype)
        finite = torch.isfinite(x)
        sd, mean = torch.std_mean(self._losses, correction=0)
        full = self._seen >= self.window
        spike = full & finite & (sd >= MIN_SIGMA) & (x > mean + self.sigmas * sd)
        self._spikes += spike
        shifted = torch.cat([self._losses[1:], x.reshape(1)])
        self._losses = torch.where(finite, shifted, self._losses)
        self._seen += finite

    def count(self) -> int:
        """Spikes so far: one small copy to the host (log steps)."""
        return int(self._spikes.item())

    def state_dict(self) -> dict[str, Any]:
        """The window, the number of losses seen and the count, as JSON-able numbers (reads the device)."""
        seen = int(self._seen.item())
        kept = min(seen, self.window)
        losses = self._losses.tolist()[self.window - kept :]
        return {"spike_losses": losses, "spike_seen": seen, "spike_count": self.count()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict`'s numbers. A checkpoint made with another window keeps its
        newest losses (fewer than ``window``: the window fills up again before it judges)."""
        losses = [float(v) for v in state.get("spike_losses", [])][-self.window :]
        seen = int(state.get("spike_seen", 0))
        if seen > len(losses) < self.window:  # the checkpoint's window was shorter than ours
            seen = len(losses)
        device = self._losses.device
        padded = [0.0] * (self.window - len(losses)) + losses
        self._losses = torch.tensor(padded, dtype=torch.float64, device=device)
        self._seen = torch.tensor(seen, dtype=torch.int64, device=device)
        self._spikes = torch.tensor(int(state.get("spike_count", 0)), dtype=torch.int64, device=device)
