"""Target-side pieces of a round: the tree-verification forward, the acceptance walk and cache compaction."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from .attention import HYBRID_ATTENTION_NAME, attention_implementation
from .compat import cache_kwarg
from .support import FULL, SLIDING, UnsupportedTargetError
from .tree import DraftTree, tree_attention_bias


def layer_attention_types(config) -> tuple[set[str], int | None]:
    """The attention types of the target's layers and its sliding window (None when it has none)."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        return ({SLIDING} if window is not None else {FULL}), window
    types = set(layer_types)
    unsupported = types - {FULL, SLIDING}
    if unsupported:
        raise UnsupportedTargetError(
            f"{text.model_type} has layers of type {sorted(unsupported)}, which tree verification does not support; "
            "use a model with full or sliding-window attention layers."
        )
    return types, window


class Columns:
    """A `[B, n]` tensor that grows by whole columns every round without copying what it holds: the columns live in
    a buffer whose width doubles when full, so appending costs O(new columns), not O(n) (amortised)."""

    def __init__(self, value: torch.Tensor):
        self.buffer, self.width = value, value.shape[1]

    @property
    def value(self) -> torch.Tensor:
        return self.buffer[:, : self.width]  # [B, n], a view

    def append(self, columns: torch.Tensor) -> None:
        """Add `columns [B, k]` at the end."""
        end = self.width + columns.shape[1]
        if end > self.buffer.shape[1]:
            grown = self.buffer.new_empty(self.buffer.shape[0], max(2 * self.buffer.shape[1], end))
            grown[:, : self.width] = self.value
            self.buffer = grown
        self.buffer[:, self.width : end] = columns
        self.width = end


class TargetState:
    """The target's committed state for a batch of rows.

    Rows advance by different numbers of tokens per round, so the cache keeps a common slot count and marks the
    slots of rows that committed fewer tokens (and left padding) as not `valid`; positions are tracked per row.

    Attributes:
        cache: the target's `DynamicCache` (full layers), `S` slots per row.
        valid: `[B, S]` bool, or `None` when every slot of every row holds a real token.
        slot_positions: `[B, S]` position of the token in each slot (meaningless where not valid).
        next_positions: `[B]` position of each row's root (its newest committed token, not yet in the cache).

    `valid` and `slot_positions` grow by a round's slots with :meth:`append_slots`, in O(new slots).
    """

    def __init__(self, cache: Cache, valid: torch.Tensor | None, slot_positions: torch.Tensor,
                 next_positions: torch.Tensor):
        self.cache, self.valid, self.slot_positions, self.next_positions = cache, valid, slot_positions, next_positions

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self._valid is None else self._valid.value

    @valid.setter
    def valid(self, value: torch.Tensor | None) -> None:
        self._valid = None if value is None else Columns(value)

    @property
    def slot_positions(self) -> torch.Tensor:
        return self._positions.value

    @slot_positions.setter
    def slot_positions(self, value: torch.Tensor) -> None:
        self._positions = Columns(value)

    def append_slots(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Record `k` new slots per row: `positions [B, k]`, `valid [B, k]` (`None`: all valid)."""
        if valid is not None and self._valid is None:  # the first slot a row leaves empty
            self.valid = valid.new_ones(valid.shape[0], self._positions.width)
        if self._valid is not None:
            self._valid.append(valid if valid is not None else positions.new_ones(positions.shape, dtype=torch.bool))
        self._positions.append(positions)

    @contextlib.contextmanager
    def without_last(self, p: int):
        """Hide the last `p` slots' positions and validity for the duration (their KV is the caller's business)."""
        columns = [c for c in (self._positions, self._valid) if c is not None]
        for c in columns:
            c.width -= p
        try:
            yield
        finally:
            for c in columns:
                c.width += p

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive `[B, 1, 1, S]` mask hiding invalid slots, or `None` when there are none."""
        if self.valid is None:
            return None
        return tree_attention_bias(self.valid, dtype)[:, None, None]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.valid = None if self.valid is None else self.valid[rows]
        self.slot_positions = self.slot_positions[rows]
        self.next_positions = self.next_positions[rows]


def window_hidden(key_positions: torch.Tensor, query_positions: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, q, S]` bool: keys outside a sliding window. Same rule as transformers' sliding layers: key j is visible to
    query i when pos_j > pos_i - window."""
    return key_positions[:, None, :] <= (query_positions[:, :, None] - window)


def window_keys(state: TargetState, tree_size: int, window: int | None, refeed=None) -> int | None:
    """How many of the newest committed slots a sliding layer's verification reads, or None for all of them.

    When every slot holds a real token (no padding or placeholders: slot j is position j), the root at position S
    sees keys j > S - window and deeper nodes fewer, so only the last `window - 1` slots can be visible: the mask and
    the prefix attention of a sliding layer then cost O(window), not O(context), as a plain decode step's does.
    None as well where the window cannot bite yet (`S + T <= window`: every slot visible to every node).
    """
    slots = state.slot_positions.shape[1]
    if window is None or window <= 1 or state.valid is not None or refeed is not None or slots + tree_size <= window:
        return None
    return min(slots, max(window - 1, 0))


def verification_mask(
    state: TargetState, tree: DraftTree, dtype: torch.dtype, window: int | None, refeed=None
) -> torch.Tensor:
    """Additive mask over the committed slots, the `p` re-fed tokens (SpecPV's pending tokens, causal among
    themselves; `p = 0` without `refeed`) and the tree (ancestors and self): `[B, 1, p + T, S + p + T]`, or
    `[B, 1, p + T, p + T]` when every committed slot is visible to every query — the common case, which then costs
    no O(context) mask per round (the hybrid attention reads the prefix unmasked either way).

    Committed slots are visible where valid (and within `window`, if any); the tree sees the valid re-fed tokens.
    Where :func:`window_keys` bounds a sliding layer's reach to the last `M` slots, the mask is
    `[B, 1, T, M + T]` over those slots only.
    """
    batch, size = tree.tokens.shape
    query_pos = state.next_positions[:, None] + tree.depths[None]  # [B, T]
    reach = window_keys(state, size, window, refeed)
    if reach is not None:
        key_pos = state.slot_positions[:, state.slot_positions.shape[1] - reach:]  # [B, M]
        hidden = window_hidden(key_pos, query_pos, window)  # [B, T, M]
        prefix = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden,
                                                                                          torch.finfo(dtype).min)
        return torch.cat([prefix, tree_attention_bias(tree.ancestors, dtype)], dim=-1)[:, None]  # [B, 1, T, M + T]
    slots = state.slot_positions.shape[1]
    if refeed is not None:
        query_pos = torch.cat([refeed.positions, query_pos], dim=-1)  # [B, p + T]
    hidden = None if state.valid is None else ~state.valid[:, None, :]
    # A query's position is below slots + its index among the queries (positions never exceed slot indices), a bound
    # known on the host: past it the window may hide slots, and the exact mask is built (reading the largest position
    # instead would make the host wait for the device every round).
    if window is not None and slots and slots + query_pos.shape[1] >= window:
        outside = window_hidden(state.slot_positions, query_pos, window)
        hidden = outside if hidden is None else hidden | outside
    prefix = None
    if hidden is not None:
        prefix = torch.zeros(batch, query_pos.shape[1], slots, dtype=dtype, device=tree.tokens.device)  # [B, q, S]
        prefix.masked_fill_(hidden, torch.finfo(dtype).min)
    tree_part = tree_attention_bias(tree.ancestors, dtype)  # [B, T, T]
    if refeed is None:
        fed = tree_part
    else:
        p = refeed.tokens.shape[1]
        device = tree.tokens.device
        valid = refeed.valid if refeed.valid is not None else torch.ones(batch, p, dtype=torch.bool, device=device)
        eye = torch.eye(p, dtype=torch.bool, device=device)
        sees = valid[:, None, :] & torch.ones(p + size, p, dtype=torch.bool, device=device).tril()[None]
        sees[:, :p] |= eye  # a placeholder still sees itself, so no row is empty
        if window is not None:
            sees &= ~window_hidden(refeed.positions, query_pos, window) | torch.cat([eye, eye.new_zeros(size, p)])[None]
        below_tree = torch.full((batch, p, size), torch.finfo(dtype).min, dtype=dtype, device=device)
        fed = torch.cat([tree_attention_bias(sees, dtype), torch.cat([below_tree, tree_part], dim=1)], dim=-1)
    if prefix is None:
        return fed[:, None]  # [B, 1, p + T, p + T]
    return torch.cat([prefix, fed], dim=-1)[:, None]  # [B, 1, p + T, S + p + T]


def verify_tree(target: PreTrainedModel, state: TargetState, tree: DraftTree, attn_backend: str = "auto",
                refeed=None, tree_partial=None, forward: Callable | None = None):
    """One target forward over every row's tree; returns fp32 logits `[B, T, V]` (row i predicts node i's child).

    The trees' KV are appended to the cache; :func:`compact` keeps the accepted paths afterwards. With SpecPV,
    `refeed` (:class:`~longspec_hf.specpv.Refeed`) puts committed tokens before the tree in the same forward, and
    `tree_partial` (:class:`~longspec_hf.specpv.PartialKV`) tells the attention function what to read. `forward` runs
    the target (default: the target itself; a compiled call under compiled rounds, :mod:`~longspec_hf.compiled`).
    """
    types, window = layer_attention_types(target.config)
    dtype = target.dtype
    masks = {t: verification_mask(state, tree, dtype, window if t == SLIDING else None, refeed) for t in types}
    # Models with one layer type take a tensor; hybrid ones (e.g. Qwen2 with sliding layers) take a dict by type.
    attention_mask = masks.popitem()[1] if len(masks) == 1 else masks
    tokens = tree.tokens
    position_ids = state.next_positions[:, None] + tree.depths[None]  # [B, T]
    if refeed is not None:
        tokens = torch.cat([refeed.tokens, tokens], dim=-1)
        position_ids = torch.cat([refeed.positions, position_ids], dim=-1)
    with attention_implementation(target, HYBRID_ATTENTION_NAME):
        out = (forward or target)(
            input_ids=tokens,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=0,
            tree_prefix_len=state.cache.get_seq_length(),
            tree_prefix_masked=state.valid is not None,
            tree_window_keys=window_keys(state, len(tree), window, refeed),
            tree_attn_backend=attn_backend,
            tree_partial=tree_partial,
            **{cache_kwarg(target): state.cache},
        )
    logits = out.logits
    return (logits if refeed is None else logits[:, refeed.tokens.shape[1]:]).float()


def compact(state: TargetState, paths: list[list[int]]) -> torch.Tensor | None:
    """Keep, in every row, the root and its accepted `path` (tree indices) after the committed slots.

    Every row keeps `1 + max(len(path))` new slots; the unused ones of shorter rows become invalid. Accepted
    nodes are moved down in place and the tail is cropped — no Cache API does this. Only the moved slots are
    touched (a preallocated cache crops in O(1)), so the cost does not grow with the context.

    Returns:
        `[B, 1 + max_k]` bool, which of the new slots are valid; `None` when all are (every row accepted `max_k`).
    """
    cache = state.cache
    prefix_len = state.slot_positions.shape[1]
    total = cache.get_seq_length()
    device = state.next_positions.device
    host_lengths = [len(p) for p in paths]
    longest = max(host_lengths)
    lengths = torch.tensor(host_lengths, device=device)
    all_valid = min(host_lengths) == longest
    new_valid = None if all_valid else torch.arange(1 + longest, device=device)[None] <= lengths[:, None]  # [B, 1+k]
    # A path that is already in place (a chain accepted from its first node on) needs no move.
    in_place = all(p == list(range(1, len(p) + 1)) for p in paths)
    if longest and not in_place:
        src = torch.tensor([p + [0] * (longest - len(p)) for p in paths], device=device) + prefix_len  # [B, max_k]
        dst = slice(prefix_len + 1, prefix_len + 1 + longest)
        for layer in cache.layers:
            for kv in (layer.keys, layer.values):  # values may be narrower than keys (latent attention)
                b, h, _, d = kv.shape
                kv[:, :, dst] = kv.gather(2, src[:, None, :, None].expand(b, h, longest, d))
    if total > prefix_len + 1 + longest:
        cache.crop(-(total - prefix_len - 1 - longest))
    new_positions = state.next_positions[:, None] + torch.arange(1 + longest, device=device)[None]
    state.append_slots(new_positions, new_valid)
    state.next_positions = state.next_positions + 1 + lengths
    return new_valid


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[list[int]], list[list[int]]]:
    """The acceptance walk of :func:`accept_path` for greedy decoding without logits processors, for every row at
    once on the device, with one host transfer.

    A node is accepted when its token is the target's argmax at its parent and its parent is accepted; the walk ends
    at the deepest accepted node, whose argmax is the bonus token. Siblings carry distinct tokens, so at most one
    node per depth is accepted and that node is the walk's.

    Args:
        tree: the round's trees (`tokens/parents [B, T]`, `ancestors [B, T, T]`, `depths [T]`).
        logits: `[B, T, V]` target logits at each node.

    Returns:
        `(paths, tokens)` per row, as :func:`accept_path`.
    """
    predicted = logits.argmax(-1)  # [B, T]: the target's next token after each node
    at_parent = predicted.gather(1, tree.parents.clamp(min=0))  # [B, T]
    matches = tree.tokens == at_parent
    matches[:, 0] = True  # the root is committed
    accepted = ~(tree.ancestors & ~matches[:, None, :]).any(-1)  # [B, T]: the node and all its ancestors match
    depth = torch.where(accepted, tree.depths[None], -1)
    deepest = depth.argmax(-1, keepdim=True)  # [B, 1]
    on_path = tree.ancestors.gather(1, deepest[..., None].expand(-1, 1, len(tree))).squeeze(1)  # [B, T]
    bonus = predicted.gather(1, deepest)  # [B, 1]
    # Host side: path node ids in creation order (= depth order), then tokens; one transfer for the batch.
    host = torch.cat([on_path.long(), tree.tokens, bonus], dim=-1).tolist()
    size = len(tree)
    paths, tokens = [], []
    for row in host:
        path = [i for i in range(1, size) if row[i]]
        paths.append(path)
        tokens.append([row[size + i] for i in path] + [row[-1]])
    return paths, tokens


TokenSelector = Callable[[torch.Tensor], int]


def row_of_batch(logits_processor: Callable, batch: int, row: int) -> Callable:
    """Run `logits_processor` on row `row` of the `batch` it was built for.

    transformers' processors may hold per-row state (the repetition penalty's per-row prompt lengths under an
    attention mask; the batch id `prefix_allowed_tokens_fn` receives), so a lone `[1, n]` row is given to them as
    that row of a full-size batch of copies, and that row of the output is taken back.
    """
    if batch == 1:
        return logits_processor

    def process(sequence: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return logits_processor(sequence.repeat(batch, 1), scores.repeat(batch, 1))[row : row + 1]

    return process


def accept_path(
    children: list[list[int]],
    node_tokens: list[int],
    logits: torch.Tensor,
    sequence: torch.LongTensor,
    logits_processor: Callable[[torch.LongTensor, torch.Tensor], torch.Tensor],
    select: TokenSelector,
) -> tuple[list[int], list[int]]:
    """Walk one row's tree the way the target itself would decode.

    At the current node the target's (processed) scores give the next token ``x`` — argmax for greedy, one draw
    for sampling. If a child carries ``x`` the walk descends into it, otherwise ``x`` is the bonus token and the
    round ends. Every emitted token is therefore exactly what plain decoding would produce from the same prefix
    (greedy), or is drawn from exactly the same distribution (sampling): children are deterministic proposals,
    never accepted by a ratio test, so the draft only decides how many tokens one target forward yields.

    Args:
        children: per node, its children's indices.
        node_tokens: token of each node.
        logits: `[T, V]` target logits at each node.
        sequence: `[1, n]` committed tokens, the root included (what logits processors see).
        logits_processor: transformers' processors, applied exactly as in plain decoding.
        select: scores `[1, V]` -> token id.

    Returns:
        `(path, tokens)`: accepted tree indices (root excluded) and the new tokens (accepted tokens + bonus).
    """
    path: list[int] = []
    tokens: list[int] = []
    node = 0
    while True:
        scores = logits_processor(sequence, logits[node : node + 1])
        token = select(scores)
        tokens.append(token)
        child = next((c for c in children[node] if node_tokens[c] == token), None)
        if child is None:
            return path, tokens
        path.append(child)
        node = child
        sequence = torch.cat([sequence, sequence.new_tensor([[token]])], dim=-1)
