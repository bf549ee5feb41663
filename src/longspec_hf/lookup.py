"""Prompt-lookup branches: a chain copied from the text itself, grafted onto the draft's tree.

Long-context generation repeats its context (code edits, quotes, summaries of the document) and, with small targets,
itself. A trained draft learns some of that; an n-gram match finds it for free (prompt lookup decoding, as
transformers' ``prompt_lookup_num_tokens``). With ``prompt_lookup_num_tokens=L`` each round's tree gets one more
branch: the `L` tokens that followed the most recent earlier occurrence of the text's last n-gram (n from
``max_matching_ngram_size`` down to 1). Any tree is verified exactly, so the output does not change; the target
accepts whichever of the two proposals (draft or lookup) agrees with it for longer.

Grafting keeps the batch's shared depths (:class:`~longspec_hf.tree.DraftTree`): every row gets `L` new nodes at
depths 1..L. Where the draft's tree already holds the chain's first `m` tokens, the chain continues from that node
(so the draft's path and the lookup extend each other) and the row's first `m` new nodes are dead copies of the
tokens already there — equal siblings, which both acceptance walks resolve to the draft's node first.
"""

from __future__ import annotations

import torch

from .rounds import Round, RoundHook
from .tree import DraftTree


class NgramIndex:
    """One row's tokens and, per n-gram (n <= `max_ngram`), where the token after its most recent occurrence is.

    Only occurrences whose next token is known are indexed, so a lookup of the text's own last n-gram finds an earlier
    occurrence, never itself. Appending a token updates at most `max_ngram` entries: O(1) per token, whatever the
    context length.
    """

    def __init__(self, tokens: list[int], max_ngram: int):
        self.tokens: list[int] = []
        self.max_ngram = max_ngram
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it last
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before `token` are now followed by it
            for n in range(1, min(self.max_ngram, end) + 1):
                self.after[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def continuation(self, length: int) -> list[int] | None:
        """The `length` tokens after the most recent earlier occurrence of the longest matching suffix n-gram, or
        None. A match close to the end runs into the text's own end: the continuation then repeats the period it
        found (the pattern ``a b c a b`` continues ``c a b c ...``)."""
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            start = self.after.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                period = len(tokens) - start
                return [tokens[start + j % period] for j in range(length)]
        return None


def lookup_chains(indexes: list[NgramIndex], length: int, device: torch.device) -> torch.Tensor | None:
    """`[B, length]` continuation per row (a row without a match proposes its last token, harmlessly), or None when no
    row has a match (the round then verifies the draft's tree alone)."""
    chains = [index.continuation(length) for index in indexes]
    if length < 1 or all(chain is None for chain in chains):
        return None
    rows = [chain if chain is not None else [index.tokens[-1]] * length for chain, index in zip(chains, indexes,
                                                                                                  strict=True)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def graft_chain(tree: DraftTree, chains: torch.Tensor) -> DraftTree:
    """Add each row's chain (`chains [B, L]`, the tokens at depths 1..L after the root) to its tree, on the device.

    Returns a tree of `T + L` nodes: the first `T` are the input tree's, unchanged; node `T + d - 1` sits at depth `d`.
    """
    batch, size = tree.tokens.shape
    length = chains.shape[1]
    device = tree.tokens.device
    rows = torch.arange(batch, device=device)
    # 1. the deepest node of each row's tree whose path from the root spells the chain's first tokens
    depth_index = (tree.depths - 1).clamp(min=0)[None].expand(batch, size)  # [B, T]
    wanted = chains.gather(1, depth_index.clamp(max=length - 1))  # [B, T]: the chain's token at each node's depth
    agrees = (tree.tokens == wanted) & (tree.depths <= length)[None]
    agrees[:, 0] = True  # the root
    spells = ~(tree.ancestors & ~agrees[:, None, :]).any(-1)  # [B, T]: the node and all its ancestors agree
    matched = torch.where(spells, tree.depths[None], -1)  # [B, T]
    anchor = matched.argmax(-1)  # [B] (first of the deepest: the draft's node)
    matched_depth = matched.gather(1, anchor[:, None]).squeeze(1)  # [B]
    # 2. new node T + j sits at depth j + 1. The first `m` (m = matched depth) are dead copies chained from the root;
    #    the live rest hangs under the anchor, each under the previous one. All rows at once, no loop over nodes.
    j = torch.arange(length, device=device)
    live = j[None] >= matched_depth[:, None]  # [B, L]
    previous = torch.where(j == 0, 0, size + j - 1)  # [L]
    parents = torch.where(j[None] == matched_depth[:, None], anchor[:, None], previous[None])  # [B, L]
    root_only = torch.zeros(size, dtype=torch.bool, device=device)
    root_only[0] = True
    above = torch.where(live[..., None], tree.ancestors[rows, anchor][:, None, :], root_only)  # [B, L, T]
    chained = torch.ones(length, length, dtype=torch.bool, device=device).tril()  # [L, L]: i <= j
    within = chained & (live[:, :, None] == live[:, None, :])  # [B, L, L]: same segment (dead or live)
    total = size + length
    ancestors = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
    ancestors[:, :size, :size] = tree.ancestors
    ancestors[:, size:, :size] = above
    ancestors[:, size:, size:] = within
    return DraftTree(
        tokens=torch.cat([tree.tokens, chains], dim=1),
        parents=torch.cat([tree.parents, parents], dim=1),
        depths=torch.cat([tree.depths, j + 1]),
        ancestors=ancestors,
        logprobs=torch.cat([tree.logprobs, tree.logprobs.new_zeros(batch, length)], dim=1),
    )


class LookupBranch(RoundHook):
    """The loop's prompt-lookup branch: each round, every row's chain of `length` tokens (cut to the room left) is
    offered before drafting (``round.branch``; a later hook may withdraw it) and grafted onto the draft's tree."""

    def __init__(self, texts: dict[int, list[int]], length: int, max_ngram: int, device: torch.device):
        self.indexes = {row: NgramIndex(tokens, max_ngram) for row, tokens in texts.items()}  # text indexed once
        self.length, self.device = length, device

    @classmethod
    def from_prompts(cls, input_ids: torch.LongTensor, mask: torch.Tensor | None, first_tokens: dict[int, int],
                     length: int, max_ngram: int) -> LookupBranch:
        """Index each row's prompt (padding dropped) and its first token; rows are those of `first_tokens`."""
        ids, keep = input_ids.tolist(), None if mask is None else mask.bool().tolist()
        texts = {row: [t for j, t in enumerate(ids[row]) if keep is None or keep[row][j]] + [token]
                 for row, token in first_tokens.items()}
        return cls(texts, length, max_ngram, input_ids.device)

    def plan(self, round: Round) -> None:
        round.branch = lookup_chains([self.indexes[row] for row in round.rows], min(self.length, round.room),
                                     self.device)  # [A, L] or None

    def drafted(self, round: Round) -> None:
        if round.branch is not None:  # its nodes come after the draft's
            round.tree = graft_chain(round.tree, round.branch)

    def emitted(self, round: Round, row: int, tokens: list[int]) -> None:
        self.indexes[round.rows[row]].extend(tokens)
