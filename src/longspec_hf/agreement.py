"""Teacher-forced agreement: how often a LongSpec draft's top-1 token is the target's greedy token, per lag, on text.

A chain round accepts its first draft token exactly when the draft, fed the last committed token and the target's
KV of everything before it (lag 1), puts its top-1 on the target's greedy token; the token at depth ``d`` sees the
same KV, i.e. lag ``d + 1`` (see `training.objective`). One target forward and one draft forward per lag over a
window of text therefore score every position of it, where `longspec eval`'s tau only scores the ~100 tokens a
prompt's continuation has: thousands of positions per prompt, so far less noise per second of compute, which is
what comparing checkpoints needs. It is measured on the text itself (the inputs are the text's tokens, not the
target's continuation of it), so it ranks drafts rather than predicting tau exactly.

On the target's own greedy continuation of a prompt, the same hits give the chain's tau exactly (:func:`chain_tau`):
the rounds a greedy chain decode would run, without running one — one plain `generate()` per prompt, shared by every
draft measured on it, then a forward per lag.
"""

from __future__ import annotations

import torch

from .training.objective import draft_masks, target_pass


def is_teacher_forceable(draft) -> bool:
    """Whether `draft` runs a teacher-forced pass over the target's KV (a LongSpec draft; not a self-draft)."""
    from .modeling import LongSpecDraftModel

    return isinstance(draft, LongSpecDraftModel)


@torch.no_grad()
def target_view(target, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor]:
    """The target's last-layer KV `[1, Hkv, L, D]` (twice) over `input_ids [1, L]` and its greedy token after each
    position `[1, L]`; computed once per window and shared by every draft and lag scored on it."""
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    key, value, logits = target_pass(target, input_ids, position_ids, want_logits=True)
    return key, value, logits.argmax(-1)


@torch.no_grad()
def agreement_hits(draft, input_ids: torch.LongTensor, view, lag: int) -> torch.Tensor:
    """`[B, L - lag - 1]` bool: at index ``i`` in ``lag .. L-2`` (input token ``i``, target KV of indices
    ``<= i - lag``), whether the draft's top-1 is the target's greedy token."""
    key, value, greedy = view
    length = input_ids.shape[1]
    if length < lag + 2:
        raise ValueError(f"A {length}-token window cannot score lag {lag}; use windows of at least {lag + 2} tokens.")
    position_ids = torch.arange(length, device=input_ids.device)[None]
    self_mask, cross_mask = draft_masks(draft, length, lag, key.dtype, input_ids.device)
    logits = draft(input_ids, position_ids, key, value, None, self_mask, cross_mask, vocab_subset=True)  # [B, L, V']
    top = logits[:, lag : length - 1].argmax(-1)  # [B, n]
    if draft.draft_vocab is not None:  # columns of the draft vocabulary -> token ids
        top = draft.draft_vocab[top]
    return top == greedy[:, lag : length - 1]


def chain_depth(tree_shape) -> int | None:
    """The depth of a chain tree (every level one token wide), None for any other tree or "auto"."""
    if isinstance(tree_shape, (list, tuple)) and tree_shape and all(width == 1 for width in tree_shape):
        return len(tree_shape)
    return None


def chain_walk(hits: dict[int, torch.Tensor], start: int, length: int, depth: int) -> list[int]:
    """Accepted draft tokens per round of a greedy chain of `depth` tokens over a sequence of `length` tokens that
    is the target's own greedy continuation from index `start` (the first round's root: the prefill's token), given
    `hits[lag] [L - lag - 1]` of :func:`agreement_hits` for lags ``1 .. depth``: a round rooted at ``p`` accepts
    while the token at depth ``d`` (index ``p + d``, lag ``d + 1``, target KV of indices ``< p``) agrees, never
    past the end: the last round drafts only what leaves room for its bonus token, as generate() does near
    `max_new_tokens`."""
    rounds, p = [], start
    while p < length - 1:
        accepted = 0
        while accepted < depth and p + accepted < length - 2 and hits[accepted + 1][p - 1]:
            accepted += 1
        rounds.append(accepted)
        p += accepted + 1
    return rounds


def measure_agreement(target, draft, prompts: list[torch.LongTensor], lags: list[int]) -> list[dict]:
    """One row per lag: the fraction of the prompts' positions where the draft's top-1 is the target's greedy
    token (pooled over the prompts), and how many positions were scored."""
    if min(lags) < 1:
        raise ValueError(f"Lags start at 1 (a round's first draft token), got {min(lags)}.")
    if not is_teacher_forceable(draft):
        raise ValueError(f"Teacher-forced agreement needs a LongSpec draft (its forward reads the target's KV); "
                         f"a {type(draft).__name__} has none: measure it with tau instead (drop --agreement).")
    hits = {lag: 0 for lag in lags}
    scored = {lag: 0 for lag in lags}
    for ids in prompts:
        view = target_view(target, ids)
        for lag in lags:
            h = agreement_hits(draft, ids, view, lag)
            hits[lag] += int(h.sum())
            scored[lag] += h.numel()
    return [{"lag": lag, "agreement": hits[lag] / max(scored[lag], 1), "positions": scored[lag],
             "prompts": len(prompts)} for lag in lags]


@torch.no_grad()
def greedy_continuations(target, prompts: list[torch.LongTensor], max_new_tokens: int) -> list[tuple]:
    """Per prompt `[1, T]`: `(sequence [1, T + n], target_view of it, T)`, the sequence being the target's plain
    greedy continuation: what any lossless greedy decode of that prompt returns (kept on disk once generated:
    `longspec_hf.continuations`)."""
    from .continuations import greedy_continuation

    items = []
    for ids in prompts:
        full = greedy_continuation(target, ids, max_new_tokens)  # [1, T + n]
        items.append((full, target_view(target, full), ids.shape[1]))
    return items


def chain_tau(draft, continuations: list[tuple], depth: int) -> dict:
    """tau of a greedy chain of `depth` draft tokens (the draft alone) over `continuations`
    (:func:`greedy_continuations`), pooled like `longspec eval`'s: (accepted draft tokens + rounds) / rounds."""
    rounds = accepted = 0
    for full, view, prompt_length in continuations:
        hits = {lag: agreement_hits(draft, full, view, lag)[0] for lag in range(1, depth + 1)}
        walk = chain_walk(hits, prompt_length, full.shape[1], depth)
        rounds += len(walk)
        accepted += sum(walk)
    return {"tau": (accepted + rounds) / max(rounds, 1), "rounds": rounds, "accepted_tokens": accepted,
            "prompts": len(continuations)}
