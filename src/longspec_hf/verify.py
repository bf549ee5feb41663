"""Target-side pieces of a round: the tree-verification forward, the acceptance walk and cache compaction."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from .attention import HYBRID_ATTENTION_NAME
from .tree import DraftTree, tree_attention_bias

FULL, SLIDING = "full_attention", "sliding_attention"


@contextmanager
def attention_implementation(model: PreTrainedModel, name: str):
    """Select the attention function `name` for the duration of one forward, then restore the user's choice.

    Only the verification forward switches, so prefill keeps the target's own (possibly faster) attention.
    """
    config = model.config.get_text_config(decoder=True)
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


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
        raise ValueError(
            f"{text.model_type} has layers of type {sorted(unsupported)}, which tree verification does not support; "
            "use a model with full or sliding-window attention layers."
        )
    return types, window


def verification_mask(
    tree: DraftTree, prefix_len: int, dtype: torch.dtype, window: int | None
) -> torch.Tensor:
    """Additive mask `[1, 1, T, P + T]`: the committed prefix (within `window`, if any) plus ancestors and self."""
    tree_bias = tree_attention_bias(tree.ancestors, dtype)  # [T, T]
    prefix = tree_bias.new_zeros(len(tree), prefix_len)  # [T, P]
    if window is not None and prefix_len + int(tree.depths.max()) >= window:
        query_pos = prefix_len + tree.depths  # [T]
        key_pos = torch.arange(prefix_len, device=tree_bias.device)  # [P]
        # Same rule as transformers' sliding layers: key j is visible to query i when j > i - window.
        outside = key_pos[None, :] <= (query_pos[:, None] - window)
        prefix.masked_fill_(outside, torch.finfo(dtype).min)
    return torch.cat([prefix, tree_bias], dim=-1)[None, None]


def verify_tree(
    target: PreTrainedModel, cache: Cache, tree: DraftTree, attn_backend: str = "auto"
) -> torch.Tensor:
    """One target forward over the whole tree; returns fp32 logits `[T, V]` (row i predicts node i's child).

    The tree's KV is appended to `cache`; :func:`compact_cache` keeps the accepted path afterwards.
    """
    prefix_len = cache.get_seq_length()
    types, window = layer_attention_types(target.config)
    dtype = target.dtype
    masks = {t: verification_mask(tree, prefix_len, dtype, window if t == SLIDING else None) for t in types}
    # Models with one layer type take a tensor; hybrid ones (e.g. Qwen2 with sliding layers) take a dict by type.
    attention_mask = masks.popitem()[1] if len(masks) == 1 else masks
    position_ids = (prefix_len + tree.depths)[None]  # [1, T]
    with attention_implementation(target, HYBRID_ATTENTION_NAME):
        out = target(
            input_ids=tree.tokens[None],
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0,
            tree_prefix_len=prefix_len,
            tree_attn_backend=attn_backend,
        )
    return out.logits[0].float()


def compact_cache(cache: Cache, prefix_len: int, path: list[int]) -> None:
    """Keep the committed prefix, the root and the accepted `path` (tree indices) in every layer of `cache`.

    Accepted nodes are moved down in place to follow the root, then the tail is cropped; no Cache API does this.
    """
    total = cache.get_seq_length()
    kept = 1 + len(path)
    if path and path != list(range(1, kept)):
        src = torch.tensor(path, device=cache.layers[0].keys.device) + prefix_len
        dst = slice(prefix_len + 1, prefix_len + kept)
        for layer in cache.layers:
            layer.keys[..., dst, :] = layer.keys.index_select(-2, src)
            layer.values[..., dst, :] = layer.values.index_select(-2, src)
    if total > prefix_len + kept:
        cache.crop(-(total - prefix_len - kept))


TokenSelector = Callable[[torch.Tensor], int]


def accept_path(
    tree: DraftTree,
    logits: torch.Tensor,
    sequence: torch.LongTensor,
    logits_processor: Callable[[torch.LongTensor, torch.Tensor], torch.Tensor],
    select: TokenSelector,
) -> tuple[list[int], list[int]]:
    """Walk the tree the way the target itself would decode.

    At the current node the target's (processed) scores give the next token ``x`` — argmax for greedy, a sample for
    sampling. If a child carries ``x`` the walk descends into it, otherwise ``x`` is the bonus token and the round
    ends. Every emitted token is therefore exactly what plain decoding would have produced from the same prefix
    (greedy) or is distributed exactly like it (sampling): the draft only decides how many of them one target
    forward yields.

    Args:
        tree: the verified tree.
        logits: `[T, V]` target logits at each node.
        sequence: `[1, n]` committed tokens, the root included (what logits processors see).
        logits_processor: transformers' processors, applied exactly as in plain decoding.
        select: scores `[1, V]` -> token id.

    Returns:
        `(path, tokens)`: accepted tree indices (root excluded) and the new tokens (accepted tokens + bonus).
    """
    children = tree.children()
    node_tokens = tree.tokens.tolist()
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
