"""What the decode loop needs from a draft, whatever it is (a LongSpec layer, the target itself, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from .tree import DraftTree


@dataclass
class DraftState:
    """Per-call draft state: its own cache plus anything a drafter wants to keep between rounds."""

    cache: Cache
    extra: dict[str, Any] = field(default_factory=dict)


class Drafter:
    """Mixin marking an ``assistant_model`` that the LongSpec decode loop drives.

    A drafter is bound to the target, starts from the prompt, proposes a token tree per round and is told which
    tokens were committed. It must not change the target cache.
    """

    is_longspec_drafter = True

    def bind(self, target) -> None:
        raise NotImplementedError

    def start(self, input_ids: torch.LongTensor, target_cache: Cache) -> DraftState:
        """Prepare the draft for a prompt `input_ids [1, n]` whose target KV is in `target_cache`."""
        raise NotImplementedError

    def draft(
        self, state: DraftState, root_token: torch.Tensor, root_position: int, target_cache: Cache,
        tree_shape: tuple[int, ...],
    ) -> DraftTree:
        """Propose a tree rooted at the newest committed token (`root_token`, whose target KV is not cached yet)."""
        raise NotImplementedError

    def commit(self, state: DraftState, tokens: torch.LongTensor, start_position: int) -> None:
        """Drop the speculative state and record the committed tokens `tokens [1, a]` starting at `start_position`."""
        raise NotImplementedError


def is_drafter(model: Any) -> bool:
    return getattr(model, "is_longspec_drafter", False) is True


def target_last_layer_kv(cache: Cache) -> tuple[torch.Tensor, torch.Tensor]:
    """`(keys, values)`, each `[B, Hkv, L, D]` (post-RoPE), of the target's last decoder layer."""
    layer = cache.layers[-1]
    return layer.keys, layer.values
