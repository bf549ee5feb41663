"""SpecPV partial verification (approximate, opt-in): verify most rounds against a partial view of the target's KV.

At long context, verification is the target reading its whole KV cache every round. SpecPV (arXiv 2512.02337)
reads, in most rounds, only

    sink (first blocks) + retrieved blocks + recent window + pending tokens

and periodically runs a *full* verification. Per full-attention layer and KV head, the retrieved blocks are the
``retrieval_blocks`` blocks of ``block_size`` keys whose summaries (elementwise key max / min) give the largest
upper bound of the attention score ``q.k`` averaged over the round's queries (Quest-style scoring). They are chosen
at each full verification (a *refresh*) and copied once into a small contiguous KV per layer, so a partial round
costs ``O(sink + retrieval + window + pending)`` per layer whatever the context length.

Tokens accepted in partial rounds are *pending*: their KV were computed with partial attention. When
``refresh_interval`` of them have accumulated, the next round is a full verification that first re-computes the
pending tokens' KV over the full cache (they are re-fed before the tree in the same forward) and refreshes
retrieval. Pending tokens are not re-checked, so the output can differ from full verification: this mode trades
exactness for speed and is off by default. With a retrieval budget covering the context it is exact.

Enable it on the draft: ``draft.generation_config.specpv = {"retrieval_blocks": 64}`` (or a :class:`SpecPVConfig`);
after ``generate``, ``draft.stats.full_verifications`` / ``partial_verifications`` count the rounds of each kind.
Sliding-window layers always use their own (already bounded) attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .attention import merge_attention_states, prefix_attention_lse
from .rounds import Round, RoundHook
from .tree import tree_attention_bias


@dataclass
class SpecPVConfig:
    """Settings of partial verification (token counts are `blocks * block_size`).

    Args:
        block_size: keys per retrieval block.
        sink_blocks: first blocks always visible.
        retrieval_blocks: blocks retrieved per layer and KV head (the paper's default budget is 4096 tokens).
        window_blocks: most recent blocks (before the pending tokens) always visible.
        refresh_interval: pending tokens (accepted in partial rounds) that trigger a full verification.
    """

    block_size: int = 16
    sink_blocks: int = 2
    retrieval_blocks: int = 256
    window_blocks: int = 8
    refresh_interval: int = 20

    def __post_init__(self):
        for name, value in asdict(self).items():
            minimum = 0 if name in ("sink_blocks", "retrieval_blocks", "window_blocks") else 1
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"SpecPVConfig.{name} must be an integer >= {minimum}, got {value!r}.")

    @classmethod
    def from_value(cls, value) -> SpecPVConfig | None:
        """`None`/`False` (off), `True` (defaults), a dict of fields, or a `SpecPVConfig`."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"Unknown SpecPV settings {sorted(unknown)}; use {sorted(cls.__dataclass_fields__)}.")
            return cls(**value)
        raise TypeError(f"generation_config.specpv must be a dict, True or a SpecPVConfig, got {type(value).__name__}.")

    @property
    def sink_tokens(self) -> int:
        return self.sink_blocks * self.block_size

    @property
    def window_tokens(self) -> int:
        return self.window_blocks * self.block_size


def block_scores(query: torch.Tensor, key_max: torch.Tensor, key_min: torch.Tensor) -> torch.Tensor:
    """Upper bound of `q.k` over each block, averaged over the query heads of a KV head and over the queries.

    `query [B, H, q, D]`, `key_max/key_min [B, Hkv, N, D]` -> `[B, Hkv, N]` (fp32). Per dimension the largest
    `q_d k_d` over the block is `q_d * max_d` when `q_d >= 0`, else `q_d * min_d`.
    """
    b, h, n, d = query.shape
    hkv = key_max.shape[1]
    q = query.float().reshape(b, hkv, (h // hkv) * n, d)  # [B, Hkv, g*q, D]
    bound = q.clamp(min=0) @ key_max.float().transpose(-1, -2) + q.clamp(max=0) @ key_min.float().transpose(-1, -2)
    return bound.mean(dim=2)


def retrieval_index(query: torch.Tensor, key: torch.Tensor, config: SpecPVConfig) -> tuple[torch.Tensor, int]:
    """Slots of the prefix `key [B, Hkv, P, D]` a partial round reads besides its tail, per KV head.

    Returns `(index [B, Hkv, R], tail_start)`: the sink slots and the selected blocks' slots, in increasing order,
    and the first slot of the tail (recent window + everything after), which partial rounds read in full.
    """
    b, hkv, p, _ = key.shape
    bs = config.block_size
    sink = min(config.sink_tokens, p)
    blocks = max((p - sink - config.window_tokens) // bs, 0)
    tail_start = sink + blocks * bs
    sink_index = torch.arange(sink, device=key.device).expand(b, hkv, sink)
    if blocks == 0 or config.retrieval_blocks == 0:
        return sink_index, tail_start
    grouped = key[:, :, sink:tail_start].unflatten(2, (blocks, bs))  # [B, Hkv, N, bs, D]
    scores = block_scores(query, grouped.amax(dim=3), grouped.amin(dim=3))  # [B, Hkv, N]
    chosen = scores.topk(min(config.retrieval_blocks, blocks), dim=-1).indices.sort(dim=-1).values  # [B, Hkv, k]
    slots = sink + chosen[..., None] * bs + torch.arange(bs, device=key.device)  # [B, Hkv, k, bs]
    return torch.cat([sink_index, slots.flatten(2)], dim=-1), tail_start


def gather_heads(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x [B, Hkv, P, D]`, `index [B, Hkv, R]` -> `[B, Hkv, R, D]`."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def head_mask(valid: torch.Tensor | None, heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Per-KV-head validity `[B, Hkv, S]` (or `[B, S]`) -> additive mask `[B, H|1, 1, S]` for the query heads."""
    if valid is None or bool(valid.all()):
        return None
    if valid.dim() == 2:
        return tree_attention_bias(valid, dtype)[:, None, None]
    groups = heads // valid.shape[1]
    return tree_attention_bias(valid, dtype).repeat_interleave(groups, dim=1)[:, :, None]


@dataclass
class PartialKV:
    """What the attention function needs in a verification forward under SpecPV (passed as a forward kwarg).

    `mode` is "refresh" (full attention; choose and copy the retrieved KV) or "partial" (read retrieved + tail).
    `valid` is the prefix validity `[B, P]` of this forward (None when every slot is real).
    """

    config: SpecPVConfig
    mode: str = "refresh"
    valid: torch.Tensor | None = None
    tail_start: int | None = None
    retrieved: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def refresh(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Choose this layer's blocks with this forward's queries and keep a contiguous copy of their KV."""
        index, tail_start = retrieval_index(query, key, self.config)  # [B, Hkv, R]
        valid = None
        if self.valid is not None:
            valid = self.valid[:, None, :].expand(-1, key.shape[1], -1).gather(2, index)  # [B, Hkv, R]
        self.retrieved[layer] = (gather_heads(key, index), gather_heads(value, index), valid)
        self.tail_start = tail_start

    def attention(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                  backend: str, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix attention of a partial round: retrieved KV + the tail `key[:, :, tail_start:]`, merged exactly."""
        k_r, v_r, valid_r = self.retrieved[layer]
        heads = query.shape[1]
        tail = slice(self.tail_start, None)
        valid_t = None if self.valid is None else self.valid[:, tail]
        out, lse = prefix_attention_lse(query, key[:, :, tail], value[:, :, tail],
                                        head_mask(valid_t, heads, query.dtype), scale, backend, softcap)
        if k_r.shape[2]:
            o_r, lse_r = prefix_attention_lse(query, k_r, v_r, head_mask(valid_r, heads, query.dtype), scale, backend,
                                              softcap)
            out, lse = merge_attention_states(o_r, lse_r, out, lse)
        return out, lse

    def select_rows(self, rows: torch.Tensor) -> None:
        self.retrieved = {
            layer: (k[rows], v[rows], None if valid is None else valid[rows])
            for layer, (k, v, valid) in self.retrieved.items()
        }


@dataclass
class Refeed:
    """Committed tokens re-fed before the tree in a full verification: `tokens/positions [B, p]`, `valid [B, p]`."""

    tokens: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None


class PartialVerifier(RoundHook):
    """Decides each round between full and partial verification and keeps the pending tokens (see module doc).

    Its :meth:`verify` is the loop's verification; as a round hook it marks partial rounds and records their
    committed tokens."""

    def __init__(self, config: SpecPVConfig):
        self.config = config
        self.kv = PartialKV(config)
        self.pending: torch.Tensor | None = None  # [B, p] tokens committed in partial rounds
        self.last_round_full = False

    @property
    def num_pending(self) -> int:
        return 0 if self.pending is None else self.pending.shape[1]

    def next_round_is_full(self) -> bool:
        return self.kv.tail_start is None or self.num_pending >= self.config.refresh_interval

    def verify(self, target, state, tree, attn_backend: str, verify_tree) -> torch.Tensor:
        """One verification forward (full or partial); returns the tree's logits `[B, T, V]`."""
        self.last_round_full = self.next_round_is_full()
        if not self.last_round_full:
            self.kv.mode, self.kv.valid = "partial", state.valid
            return verify_tree(target, state, tree, attn_backend, tree_partial=self.kv)
        # Full round: drop the pending tokens' approximate KV and re-compute it before the tree, in one forward.
        p = self.num_pending
        refeed = None
        if p:
            state.cache.crop(-p)
            valid = state.valid
            refeed = Refeed(self.pending, state.slot_positions[:, -p:].clone(),
                            None if valid is None else valid[:, -p:].clone())
        with state.without_last(p):
            self.kv.mode, self.kv.valid = "refresh", state.valid
            logits = verify_tree(target, state, tree, attn_backend, refeed=refeed, tree_partial=self.kv)
        self.pending = None
        return logits

    def accepted(self, round: Round) -> None:
        round.full = self.last_round_full

    def committed(self, round: Round) -> None:
        self.record(round.committed)

    def record(self, committed: torch.Tensor) -> None:
        """After compaction: the round's committed tokens `[B, a]` are pending unless the round was full."""
        if self.last_round_full:
            return
        self.pending = committed if self.pending is None else torch.cat([self.pending, committed], dim=-1)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.kv.select_rows(rows)
        if self.pending is not None:
            self.pending = self.pending[rows]
