"""A training-free draft: the target itself, reading a constant-size sink + window view of its own KV cache.

StreamingLLM-style self-speculation (as in MagicDec and TriForce): drafting runs the target's own layers, but
attention only sees the first ``sink_size`` and the last ``window_size`` committed tokens, so a draft step costs the
same at 4k or 128k tokens of context while the (exact) verification reads the whole cache. No weights are added.

The draft's cache is filled from the target's: after the prefill it takes the sink and window slots of every layer,
and after each round it appends the committed tokens' KV straight from the target's compacted cache. Those KV were
computed by the target over the full context, which is what makes the draft accurate, and cost nothing to produce.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedModel

from .cache import SinkWindowCache, gather_slots, sink_window_slots
from .compat import cache_kwarg
from .drafting import Drafter, DraftState
from .tree import AUTO, DraftTree, TreeGrowth, build_beam_tree, tree_attention_bias
from .verify import SLIDING, layer_attention_types

DEFAULT_SELF_DRAFT_TREE = AUTO


class SelfDraft(Drafter):
    """The target as its own draft over a sink + window cache. Use it as ``target.generate(ids, assistant_model=d)``.

    Tree settings live on ``draft.generation_config`` (``tree_shape``: ``"auto"`` by default, or fixed level widths
    such as a chain of 4, ``[1, 1, 1, 1]``); after each call,
    ``draft.stats`` holds the decoding statistics. The draft is tied to the target it was made from.
    """

    def __init__(self, target: PreTrainedModel, sink_size: int = 4, window_size: int = 512,
                 tree_shape: tuple[int, ...] | str = DEFAULT_SELF_DRAFT_TREE):
        from .probe import check_supported_target

        if sink_size < 0 or window_size < 1:
            raise ValueError(f"SelfDraft needs sink_size >= 0 and window_size >= 1, got {sink_size}, {window_size}.")
        check_supported_target(target)
        types, sliding_window = layer_attention_types(target.config)
        if types == {SLIDING} and sliding_window is not None and sink_size + window_size >= sliding_window:
            # A target that only ever sees its last `sliding_window` tokens is best imitated by the same window.
            sink_size, window_size = 0, max(sliding_window - 1, 1)
        self.target = target
        self.sink_size, self.window_size = sink_size, window_size
        self.generation_config = GenerationConfig(tree_shape=tree_shape if isinstance(tree_shape, str)
                                                  else list(tree_shape))
        self.stats = None

    @classmethod
    def from_target(cls, target: PreTrainedModel, sink_size: int = 4, window_size: int = 512, **kwargs) -> SelfDraft:
        return cls(target, sink_size=sink_size, window_size=window_size, **kwargs)

    @property
    def config(self):
        """The target's config (the draft shares its vocabulary, which `generate` checks)."""
        return self.target.config

    @property
    def device(self) -> torch.device:
        return self.target.device

    def bind(self, target: PreTrainedModel) -> None:
        if target is not self.target:
            raise ValueError(
                "This SelfDraft drafts with the weights of another model; create one for this target with "
                "SelfDraft.from_target(target)."
            )

    def start(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, target_state) -> DraftState:
        """Take the sink and window slots of every layer from the target's prefilled cache (`[B, Hkv, S, D]` each)."""
        source = target_state.cache
        slots = source.get_seq_length()
        valid = target_state.valid
        padded = valid is not None
        if not padded:
            valid = torch.ones(input_ids.shape[0], slots, dtype=torch.bool, device=input_ids.device)
        src, kept = sink_window_slots(valid, self.sink_size, self.window_size)  # [B, C]
        cache = SinkWindowCache(self.sink_size, self.window_size, num_layers=len(source.layers))
        for layer, target_layer in zip(cache.layers, source.layers, strict=True):
            layer.commit(gather_slots(target_layer.keys, src), gather_slots(target_layer.values, src),
                         kept if padded else None)
            layer.cumulative_length = slots  # evicted slots still count towards the absolute length
        return DraftState(cache=cache, extra={"target_cache": source})

    def draft(self, state: DraftState, root_tokens: torch.Tensor, root_positions: torch.Tensor, target_state,
              tree_shape: tuple[int, ...] | TreeGrowth) -> DraftTree:
        cache: SinkWindowCache = state.cache
        valid = cache.layers[0].valid
        if valid is None:
            valid = torch.ones(len(root_tokens), cache.get_stored_length(), dtype=torch.bool, device=root_tokens.device)
        committed_bias = tree_attention_bias(valid, torch.float32)[:, None]  # [B, 1, C], built once per round
        types, _ = layer_attention_types(self.target.config)
        dtype = self.target.dtype
        forward = state.forward_of(self.target)
        cache.begin_speculation()

        def step(tokens: torch.Tensor, positions: torch.Tensor, tree_bias: torch.Tensor) -> torch.Tensor:
            prefix = committed_bias.expand(-1, tokens.shape[1], -1)  # [B, m, C]
            bias = torch.cat([prefix, tree_bias], dim=-1)[:, None].to(dtype)  # [B, 1, m, C + n]
            mask = bias if len(types) == 1 else {t: bias for t in types}
            out = forward(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True,
                              **{cache_kwarg(self.target): cache})
            return out.logits.float()

        return build_beam_tree(step, root_tokens, root_positions, tree_shape)

    def commit(self, state: DraftState, tokens: torch.LongTensor, valid: torch.Tensor | None,
               start_positions: torch.Tensor) -> None:
        """Append the committed tokens' KV from the target's cache, whose last `a` slots hold them after compaction."""
        a = tokens.shape[1]
        for layer, target_layer in zip(state.cache.layers, state.extra["target_cache"].layers, strict=True):
            layer.commit(target_layer.keys[:, :, -a:], target_layer.values[:, :, -a:], valid)

    def select_rows(self, state: DraftState, rows: torch.Tensor) -> None:
        state.cache.batch_select_indices(rows)
