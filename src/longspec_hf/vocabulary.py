"""A draft vocabulary: the target's most frequent outputs, the only tokens a draft scores.

A draft step ends in the target's LM head, `[V, hidden]` — for SmolLM2-135M 28.3M of the step's 32.6M weights. Most
of its rows are tokens the target almost never emits. A draft that scores only the `V'` most frequent ones does a
fraction of the work per step and loses few acceptances. Verification always reads the target's whole
distribution, so the output never depends on the subset: a token outside it simply is never drafted.

The ranking is the target's own: how often each token is the target's greedy prediction over some text (its
continuations included), so it follows what the draft has to predict, not the text's own statistics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def subset_head(head: nn.Module, vocab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The rows of a linear LM head for the token ids `vocab [V']`: `(weight [V', hidden], bias [V'] | None)`."""
    weight = head.weight.detach()[vocab]
    bias = getattr(head, "bias", None)
    return weight, (None if bias is None else bias.detach()[vocab])


def check_vocabulary(token_ids: torch.Tensor, vocab_size: int) -> torch.LongTensor:
    """`token_ids` as a 1-D long tensor of distinct ids in `[0, vocab_size)`, or a ValueError saying what is wrong."""
    ids = torch.as_tensor(token_ids)
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
        raise ValueError(f"A draft vocabulary is a non-empty 1-D list of token ids; got shape {tuple(ids.shape)} of "
                         f"{ids.dtype}.")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"Draft vocabulary ids must lie in [0, {vocab_size}); got ids from {int(ids.min())} to "
                         f"{int(ids.max())}.")
    if len(torch.unique(ids)) != len(ids):
        raise ValueError("A draft vocabulary lists each token id once; this one has duplicates.")
    return ids


def ranked_vocabulary(counts: torch.Tensor, size: int, always: Iterable[int] = ()) -> torch.LongTensor:
    """The `size` ids with the highest `counts [V]`, most frequent first (ties: lower id first), with the `always`
    ids (e.g. end-of-sequence) in front. Any prefix of the result is the ranked vocabulary of that size."""
    always = list(dict.fromkeys(int(t) for t in always if t is not None))
    if not 0 < size <= len(counts):
        raise ValueError(f"A draft vocabulary size must be between 1 and {len(counts)}; got {size}.")
    # A stable sort on the negated counts keeps equal counts in id order: the ranking is reproducible.
    order = torch.sort(-counts.double(), stable=True).indices
    keep = torch.ones(len(counts), dtype=torch.bool)
    keep[always] = False
    return torch.cat([torch.tensor(always, dtype=torch.long), order[keep[order]]])[:size]


@torch.no_grad()
def count_target_outputs(target, sequences: torch.LongTensor, batch_size: int = 1,
                         counts: torch.Tensor | None = None) -> torch.Tensor:
    """Add to `counts [V]` (new if None) how often each token is the target's greedy next token over
    `sequences [N, L]`. Returns the counts."""
    vocab = target.get_output_embeddings().weight.shape[0]
    counts = torch.zeros(vocab, dtype=torch.long) if counts is None else counts
    for start in range(0, len(sequences), batch_size):
        ids = sequences[start:start + batch_size].to(target.device)
        predicted = target(input_ids=ids, use_cache=False).logits.argmax(-1)  # [b, L]
        counts += torch.bincount(predicted.flatten().cpu(), minlength=vocab)
    return counts
