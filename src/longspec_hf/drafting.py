"""What the decode loop needs from a draft, whatever it is (a LongSpec layer, the target itself, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from .tree import DraftTree


@dataclass
class DraftState:
    """Per-call draft state: its own cache plus anything a drafter wants to keep between rounds.

    `compile_config` (set by the loop under compiled rounds, :mod:`~longspec_hf.compiled`): the drafter runs its
    level forwards through :func:`~longspec_hf.compiled.compiled_call` under it.
    """

    cache: Cache
    extra: dict[str, Any] = field(default_factory=dict)
    compile_config: Any = None
    _forwards: dict = field(default_factory=dict, repr=False)  # id(module) -> its compiled call, for this call

    def forward_of(self, module):
        """`module`, or its compiled call under compiled rounds (looked up once per call, not per round)."""
        if self.compile_config is None:
            return module
        if id(module) not in self._forwards:
            from .compiled import compiled_call

            self._forwards[id(module)] = compiled_call(module, self.compile_config)
        return self._forwards[id(module)]


class Drafter:
    """Mixin marking an ``assistant_model`` that the LongSpec decode loop drives.

    A drafter is bound to the target, starts from the prompts, proposes one token tree per row and round, and is
    told which tokens each row committed. It reads the target's state but never changes it. Shapes: `B` rows,
    `n` prompt tokens, `a` committed tokens per round (rows that committed fewer carry invalid placeholders).
    """

    is_longspec_drafter = True

    def bind(self, target) -> None:
        raise NotImplementedError

    def start(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, target_state) -> DraftState:
        """Prepare for prompts `input_ids [B, n]` (left-padded where `attention_mask [B, n]` is 0)."""
        raise NotImplementedError

    def draft(
        self, state: DraftState, root_tokens: torch.Tensor, root_positions: torch.Tensor, target_state,
        tree_shape: tuple[int, ...],
    ) -> DraftTree:
        """Propose a tree per row, rooted at its newest committed token (`root_tokens [B]` at `root_positions [B]`,
        whose target KV is not cached yet); `target_state` is a :class:`~longspec_hf.verify.TargetState`."""
        raise NotImplementedError

    def commit(
        self, state: DraftState, tokens: torch.LongTensor, valid: torch.Tensor | None, start_positions: torch.Tensor
    ) -> None:
        """Drop the speculative state and record the committed `tokens [B, a]` (where `valid [B, a]`; `None` when
        every row committed `a` tokens, known on the host without reading the device), the first one of each row at
        `start_positions [B]`."""
        raise NotImplementedError

    def select_rows(self, state: DraftState, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch (finished rows are dropped)."""
        raise NotImplementedError

    def discard(self, state: DraftState) -> None:
        """Drop a drafted tree without committing anything (a tree drafted only to time the draft)."""
        end = getattr(state.cache, "end_speculation", None)
        if end is not None:
            end(None)


def is_drafter(model: Any) -> bool:
    return getattr(model, "is_longspec_drafter", False) is True


def target_last_layer_kv(cache: Cache) -> tuple[torch.Tensor, torch.Tensor]:
    """`(keys, values)`, each `[B, Hkv, L, D]` (post-RoPE), of the target's last decoder layer."""
    layer = cache.layers[-1]
    return layer.keys, layer.values
