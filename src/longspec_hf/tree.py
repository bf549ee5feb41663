"""Token trees: the beam tree of LongSpec (a chain is the tree of width 1) and its attention mask.

A tree is stored flat, in creation order (level by level), so every node comes after its parent. Node 0 is the
*root*: the last committed token, whose target KV is not in the cache yet. A node at depth ``d`` sits at position
``root_position + d`` and may attend to the committed prefix, its ancestors and itself.

Beam tree (``tree_shape = [k_1, ..., k_L]``): level 1 holds the draft's top-``k_1`` tokens after the root; level
``d > 1`` holds the global top-``k_d`` over (node of level ``d-1``) x (vocabulary) by cumulative draft
log-probability. One draft forward per level; ``[1] * L`` is a chain of ``L`` greedy draft tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_TREE_SHAPE = (4, 16, 16, 16, 16)


@dataclass
class DraftTree:
    """A flat token tree.

    Attributes:
        tokens: `[T]` token ids, node 0 is the root.
        parents: `T` parent indices (host list; the root's parent is -1).
        depths: `[T]` depth of each node (root = 0).
        ancestors: `[T, T]` bool, `ancestors[i, j]` is True when node j is node i or one of its ancestors.
    """

    tokens: torch.Tensor
    parents: list[int]
    depths: torch.Tensor
    ancestors: torch.Tensor

    def __len__(self) -> int:
        return len(self.parents)

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.parents]
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                kids[parent].append(node)
        return kids


def validate_tree_shape(tree_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(k) for k in tree_shape)
    if any(k < 1 for k in shape):
        raise ValueError(
            f"tree_shape must be a list of positive widths, e.g. [4, 16, 16] or [1, 1, 1]; got {tree_shape}."
        )
    return shape


def tree_attention_bias(ancestors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask `[T, T]`: 0 where a node may attend (ancestors and itself), the dtype's minimum elsewhere."""
    bias = torch.zeros(ancestors.shape, dtype=dtype, device=ancestors.device)
    return bias.masked_fill_(~ancestors, torch.finfo(dtype).min)


def top_children(
    logprobs: torch.Tensor, scores: torch.Tensor, width: int, per_parent: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick the next level of the beam tree.

    Args:
        logprobs: `[m, V]` draft log-probabilities at the `m` nodes of the current level.
        scores: `[m]` cumulative log-probabilities of those nodes.
        width: number of children to keep in total.
        per_parent: first level (one parent): plain top-k of that parent.

    Returns:
        `(parent_local [k], tokens [k], scores [k])`, `parent_local` indexing the current level.
    """
    vocab = logprobs.shape[-1]
    if per_parent:
        top = logprobs[0].topk(min(width, vocab))
        parent_local = torch.zeros_like(top.indices)
        return parent_local, top.indices, scores[0] + top.values
    cumulative = (scores[:, None] + logprobs).flatten()  # [m * V]
    top = cumulative.topk(min(width, cumulative.numel()))
    return top.indices // vocab, top.indices % vocab, top.values


DraftStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def build_beam_tree(
    step: DraftStep, root_token: torch.Tensor, root_position: int, tree_shape: Sequence[int]
) -> DraftTree:
    """Grow a beam tree with one draft forward per level.

    Args:
        step: `step(tokens [m], positions [m], tree_bias [m, n]) -> logits [m, V]` runs the draft on the `m` newest
            nodes; `tree_bias` is the additive mask of those nodes over all `n` tree nodes so far (themselves
            included), which the draft appends to whatever committed cache it attends to.
        root_token: `[]` the root's token id.
        root_position: absolute position of the root.
        tree_shape: widths of levels 1..L.
    """
    device = root_token.device
    max_nodes = 1 + sum(tree_shape)
    ancestors = torch.zeros(max_nodes, max_nodes, dtype=torch.bool, device=device)
    ancestors[0, 0] = True
    tokens = [root_token.view(1)]
    depth_list = [torch.zeros(1, dtype=torch.long, device=device)]
    parents = [-1]
    scores = torch.zeros(1, device=device)
    level_start, n = 0, 1
    for depth, width in enumerate(tree_shape):
        level_tokens = tokens[-1]
        positions = torch.full_like(level_tokens, root_position + depth)
        bias = tree_attention_bias(ancestors[level_start:n, :n], torch.float32)
        logits = step(level_tokens, positions, bias)  # [m, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        parent_local, child_tokens, scores = top_children(logprobs, scores, width, per_parent=depth == 0)
        k = child_tokens.numel()
        parent_global = parent_local + level_start
        new = torch.arange(n, n + k, device=device)
        ancestors[new] = ancestors[parent_global]
        ancestors[new, new] = True
        parents.extend((parent_global).tolist())
        tokens.append(child_tokens)
        depth_list.append(torch.full((k,), depth + 1, dtype=torch.long, device=device))
        level_start, n = n, n + k
    return DraftTree(
        tokens=torch.cat(tokens),
        parents=parents,
        depths=torch.cat(depth_list),
        ancestors=ancestors[:n, :n],
    )
