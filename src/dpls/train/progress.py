"""The training progress bar: steps done, loss, tokens/s and ETA, on stderr.

Shown only on rank 0 and only on a terminal (tqdm's ``disable=None``); elsewhere, e.g.
in a batch job's log, each logged step is printed as one plain line instead, so the log
stays readable without carriage-return clutter.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


class ProgressBar:
    def __init__(self, total: int, initial: int, *, enabled: bool, echo: bool, desc: str = "train") -> None:
        """``enabled``: show the bar (if stderr is a terminal); ``echo``: print lines when it is not shown."""
        self.echo = echo
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=None if enabled else True,  # None: off when stderr is not a terminal
        )
        self.shown = not self._bar.disable

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(n)

    def write(self, line: str) -> None:
        """A message line: above the bar when it is shown, else a plain print (if ``echo``)."""
        if self.shown:
            self._bar.write(line, file=sys.stderr)
        elif self.echo:
            print(line, flush=True)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
