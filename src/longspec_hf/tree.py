"""Token trees: the beam tree of LongSpec (a chain is the tree of width 1) and its attention mask.

A tree is stored flat, in creation order (level by level), so every node comes after its parent. Node 0 is the
*root*: the last committed token, whose target KV is not in the cache yet. A node at depth ``d`` sits at position
``root_position + d`` and may attend to the committed prefix, its ancestors and itself. In a batch every row has its
own tree with the same level sizes, so depths are shared and parents differ.

Beam tree (``tree_shape = [k_1, ..., k_L]``): level 1 holds the draft's top-``k_1`` tokens after the root; level
``d > 1`` holds the global top-``k_d`` over (node of level ``d-1``) x (vocabulary) by cumulative draft
log-probability. One draft forward per level; ``[1] * L`` is a chain of ``L`` greedy draft tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

DEFAULT_TREE_SHAPE = (4, 16, 16, 16, 16)
# `tree_shape="auto"`: each round grows the tree that maximises expected tokens per second (see auto_tree.py).
AUTO = "auto"
# The largest tree "auto" may grow: depth 8 covers the chains a confident draft pays for, width 16 the official beam.
AUTO_ENVELOPE = (16,) * 8


@dataclass
class DraftTree:
    """A batch of flat token trees with identical level sizes.

    Attributes:
        tokens: `[B, T]` token ids, node 0 is the root.
        parents: `[B, T]` parent index of each node (the root's is -1).
        depths: `[T]` depth of each node (root = 0), the same in every row.
        ancestors: `[B, T, T]` bool, `ancestors[b, i, j]`: node j is node i or one of its ancestors.
        logprobs: `[B, T]` draft log-probability of each node given its parent (0 for the root).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    ancestors: torch.Tensor
    logprobs: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[1]

    def children(self) -> list[list[list[int]]]:
        """Per row, per node: the indices of its children (host lists, built once per round)."""
        kids: list[list[list[int]]] = []
        for row in self.parents.tolist():
            row_kids: list[list[int]] = [[] for _ in row]
            for node, parent in enumerate(row):
                if parent >= 0:
                    row_kids[parent].append(node)
            kids.append(row_kids)
        return kids


def level_width(value) -> int | None:
    """One level's width as an int, or None if it is not a whole number (`int()` would truncate 2.5 and read True)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.isdecimal() else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def validate_tree_shape(tree_shape: Sequence[int] | str) -> tuple[int, ...]:
    """The level widths of `tree_shape`: a sequence of positive ints, or the same written "4,16,16" (a string is
    split at commas, never read character by character)."""
    items = tree_shape.split(",") if isinstance(tree_shape, str) else tree_shape
    try:
        widths = [level_width(k) for k in items]
    except TypeError:  # not iterable, e.g. a bare int
        widths = [None]
    if any(k is None or k < 1 for k in widths):
        raise ValueError(
            f"tree_shape must be positive level widths: a list such as [4, 16, 16] (a chain of k tokens is [1] * k), "
            f"the same as a string, '4,16,16', or 'auto'; got {tree_shape!r}."
        )
    return tuple(widths)


def tree_setting(value) -> tuple[int, ...] | str:
    """A drafter's ``generation_config.tree_shape``: fixed level widths, or ``"auto"`` (also what an unset one
    means)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return AUTO
    return validate_tree_shape(value)


def tree_setting_text(value) -> str:
    """How a ``tree_shape`` setting reads in cards and reports: ``auto`` or ``[4, 16, 16]``."""
    setting = tree_setting(value)
    return setting if setting == AUTO else str(list(setting))


def setting_envelope(value) -> tuple[int, ...]:
    """The largest tree a ``tree_shape`` setting may draft in a round (what a drafter sizes its caches for)."""
    setting = tree_setting(value)
    return AUTO_ENVELOPE if setting == AUTO else setting


class TreeGrowth(Protocol):
    """Decides a tree's level widths while it is drafted, from the draft's own probabilities (see
    :class:`~longspec_hf.auto_tree.AutoTree`). Any tree is verified exactly, so no decision can change the output."""

    envelope: tuple[int, ...]  # the largest tree it may grow (sizes caches and window rules); widths are its maxima

    def expand(self, depth: int, width: int) -> bool:
        """Before the draft forward over the `width` nodes at `depth`: run it (and see the next level's candidates)?"""

    def choose(self, depth: int, parent_local: torch.Tensor, child_logprobs: torch.Tensor,
               level_logprobs: torch.Tensor, vocab: torch.Tensor | None = None) -> int:
        """How many of the next level's candidates to keep (0 ends the tree at `depth`). Candidates come in beam order:
        `parent_local [B, K]`, their conditional `child_logprobs [B, K]`; `level_logprobs [B, m, V']` is the draft's
        distribution at each node of the level, over the token ids `vocab [V']` where the draft scores part of the
        vocabulary (None: column `i` is token `i`)."""


def tree_envelope(tree_shape: Sequence[int] | TreeGrowth) -> tuple[int, ...]:
    """The largest tree a round may draft: the shape itself, or a growth's envelope."""
    return tuple(getattr(tree_shape, "envelope", tree_shape))


def tree_attention_bias(ancestors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (same shape as the bool `ancestors`): 0 where attention is allowed, the dtype's minimum elsewhere.

    The one bool -> additive conversion of the package (tree masks, placeholder slots, training masks)."""
    bias = torch.zeros(ancestors.shape, dtype=dtype, device=ancestors.device)
    return bias.masked_fill_(~ancestors, torch.finfo(dtype).min)


def top_children(
    logprobs: torch.Tensor, scores: torch.Tensor, width: int, per_parent: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the next level of the beam tree in every row.

    Args:
        logprobs: `[B, m, V]` draft log-probabilities at the `m` nodes of the current level.
        scores: `[B, m]` cumulative log-probabilities of those nodes.
        width: number of children to keep per row.
        per_parent: first level (one parent): plain top-k of that parent.

    Returns:
        `(parent_local [B, k], tokens [B, k], scores [B, k], logprobs [B, k])`; `parent_local` indexes the level.
    """
    vocab = logprobs.shape[-1]
    if per_parent:
        top = logprobs[:, 0].topk(min(width, vocab), dim=-1)
        return torch.zeros_like(top.indices), top.indices, scores[:, :1] + top.values, top.values
    cumulative = (scores[..., None] + logprobs).flatten(1)  # [B, m * V]
    top = cumulative.topk(min(width, cumulative.shape[1]), dim=-1)
    parent_local, tokens = top.indices // vocab, top.indices % vocab
    return parent_local, tokens, top.values, logprobs.flatten(1).gather(1, top.indices)


DraftStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_beam_tree(
    step: DraftStep, root_tokens: torch.Tensor, root_positions: torch.Tensor, tree_shape: Sequence[int] | TreeGrowth,
    vocab: torch.Tensor | None = None,
) -> DraftTree:
    """Grow a beam tree per row with one draft forward per level.

    Args:
        step: `step(tokens [B, m], positions [B, m], tree_bias [B, m, n]) -> logits [B, m, V']` runs the draft on the
            `m` newest nodes; `tree_bias` is the additive mask of those nodes over all `n` tree nodes so far
            (themselves included), which the draft appends to whatever committed cache it attends to.
        root_tokens: `[B]` the roots' token ids.
        root_positions: `[B]` absolute positions of the roots.
        tree_shape: widths of levels 1..L, or a :class:`TreeGrowth` that picks each width (up to its envelope's)
            after seeing the level's candidates, and may stop early.
        vocab: `[V']` the token id of each logit column, where the draft scores only part of the vocabulary (a
            frequency-ranked draft vocabulary); None: all `V` tokens, column `i` is token `i`.
    """
    growth = None if isinstance(tree_shape, Sequence) else tree_shape
    widths = tree_envelope(tree_shape)
    device = root_tokens.device
    batch = root_tokens.shape[0]
    rows = torch.arange(batch, device=device)[:, None]
    max_nodes = 1 + sum(widths)
    ancestors = torch.zeros(batch, max_nodes, max_nodes, dtype=torch.bool, device=device)
    ancestors[:, 0, 0] = True
    tokens, parents = [root_tokens[:, None]], [torch.full((batch, 1), -1, device=device)]
    logprob_list = [torch.zeros(batch, 1, device=device)]
    depths = [torch.zeros(1, dtype=torch.long, device=device)]
    scores = torch.zeros(batch, 1, device=device)
    level_start, n = 0, 1
    for depth, width in enumerate(widths):
        if growth is not None and not growth.expand(depth, n - level_start):
            break
        positions = (root_positions + depth)[:, None].expand_as(tokens[-1])
        bias = tree_attention_bias(ancestors[:, level_start:n, :n], torch.float32)
        logits = step(tokens[-1], positions, bias)  # [B, m, V']
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        parent_local, child_tokens, child_scores, child_logprobs = top_children(logprobs, scores, width, depth == 0)
        if vocab is not None:
            child_tokens = vocab[child_tokens]
        if growth is not None:
            k = growth.choose(depth, parent_local, child_logprobs, logprobs, vocab)
            if k == 0:
                break
            parent_local, child_tokens = parent_local[:, :k], child_tokens[:, :k]
            child_scores, child_logprobs = child_scores[:, :k], child_logprobs[:, :k]
        scores = child_scores
        k = child_tokens.shape[1]
        parent_global = parent_local + level_start  # [B, k]
        ancestors[:, n : n + k] = ancestors[rows, parent_global]
        new = torch.arange(n, n + k, device=device)
        ancestors[:, new, new] = True
        tokens.append(child_tokens)
        parents.append(parent_global)
        logprob_list.append(child_logprobs)
        depths.append(torch.full((k,), depth + 1, dtype=torch.long, device=device))
        level_start, n = n, n + k
    return DraftTree(
        tokens=torch.cat(tokens, dim=1),
        parents=torch.cat(parents, dim=1),
        depths=torch.cat(depths),
        ancestors=ancestors[:, :n, :n],
        logprobs=torch.cat(logprob_list, dim=1),
    )
