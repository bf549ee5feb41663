"""Per-part timing of speculative rounds (opt-in: ``draft.generation_config.profile_rounds = True``).

Timing a part of a GPU round needs a device synchronisation before and after it, which itself slows the round, so it
is off by default; ``longspec cost`` turns it on to split a round into its parts.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch

PARTS = ("draft", "verify", "accept", "commit")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RoundTimer:
    """Accumulates wall seconds per part of a round into `totals` (a dict shared with the caller's stats); with
    `totals=None` every part gets one shared no-op context, so the default loop pays nothing per round."""

    _OFF = nullcontext()

    def __init__(self, device: torch.device, totals: dict[str, float] | None):
        self.device = device
        self.totals = totals

    def __call__(self, part: str):
        return self._OFF if self.totals is None else self._timed(part)

    @contextmanager
    def _timed(self, part: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[part] = self.totals.get(part, 0.0) + time.perf_counter() - start
