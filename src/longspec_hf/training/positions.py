"""Anchor-offset position indices (LongSpec §3.3): train on short sequences as if they sat deep in a long context.

A short sequence of length ``L`` keeps its first ``anchor`` tokens at positions ``0..anchor-1`` (attention sinks stay
sinks) and moves the rest to ``offset + i``, with ``anchor ~ U{0..max_anchor}`` and ``offset ~ U{0..max_positions-L}``.
The target forward that produces the KV the draft cross-attends to uses the same positions. Sequences longer than
``long_threshold`` use plain positions. Inference always uses true positions.
"""

from __future__ import annotations

import torch


def anchor_offset_positions(
    length: int,
    max_positions: int,
    generator: torch.Generator,
    max_anchor: int = 4,
    long_threshold: int = 1200,
) -> torch.LongTensor:
    """Position ids `[length]` for one training sequence (strictly increasing, all `< max_positions`)."""
    if length > max_positions:
        raise ValueError(f"A training sequence of {length} tokens exceeds the target's {max_positions} positions.")
    positions = torch.arange(length)
    if length > long_threshold or length == max_positions:
        return positions
    anchor = int(torch.randint(0, min(max_anchor, length) + 1, (1,), generator=generator))
    offset = int(torch.randint(0, max_positions - length + 1, (1,), generator=generator))
    positions[anchor:] += offset
    return positions
