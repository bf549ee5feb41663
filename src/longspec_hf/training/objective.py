"""The training objective of a LongSpec draft: one teacher-forced draft pass over a sequence, conditioned on the
frozen target's last-layer KV at a random lag, scored against the data (cross-entropy) or the target (distillation).

Lag: at inference the root (position ``p``) sees target KV of positions ``< p`` and a tree node at depth ``d`` sees
the same prefix, i.e. a lag of ``d + 1``. Training draws a lag ``l`` in ``[lag_min, lag_max]`` per step: the draft at
sequence index ``i`` (predicting token ``i + 1``) cross-attends to target KV of indices ``<= i - l``.

Self-attention: the draft config's window rule (``window_rule``), as inference applies it along each path of a tree:
every token sees the sinks and the last ``path_window_keys`` tokens up to itself. That is all of "sink_window", and
for "official" the window of LongSpec's trainer and chain decoder (its tree decoder's per-level window over the
committed tokens is an inference-time rule that no teacher-forced sequence has; the official trainer does not train
it either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from ..compat import cache_kwarg
from ..drafting import target_last_layer_kv
from ..modeling import path_window_keys
from ..tree import tree_attention_bias


def self_attention_allowed(length: int, sink: int, window: int, device=None) -> torch.Tensor:
    """`[L, L]` bool: query i sees key j when j <= i and j is a sink or within the last `window` tokens up to i
    (itself included: pass `path_window_keys(config.window_rule, config.window_size)`)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & ((j < sink) | (i - j < window))


def cross_attention_allowed(length: int, lag: int, device=None) -> torch.Tensor:
    """`[L, L]` bool: query i sees target KV j when j <= i - lag. Rows with nothing visible see key 0 (their loss is
    dropped), which keeps the softmax finite."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i - lag
    allowed[:lag, 0] = True
    return allowed


@torch.no_grad()
def target_pass(target: PreTrainedModel, input_ids: torch.LongTensor, position_ids: torch.LongTensor,
                want_logits: bool):
    """Frozen target forward: last-layer KV `[B, Hkv, L, D]` and, for distillation, logits `[B, L, V]`."""
    cache = DynamicCache()
    out = target(input_ids=input_ids, position_ids=position_ids, **{cache_kwarg(target): cache}, use_cache=True,
                 logits_to_keep=0 if want_logits else 1)
    key, value = target_last_layer_kv(cache)
    return key, value, (out.logits if want_logits else None)


def token_weights(loss_mask: torch.Tensor, prompt_weight: float = 0.0) -> torch.Tensor:
    """`[B, L]` weight of predicting each token: 1 where `loss_mask` scores it (a continuation), `prompt_weight` for
    the real tokens before a row's last scored one (its prompt), 0 after it (padding after an early EOS)."""
    scored = loss_mask.bool()
    index = torch.arange(scored.shape[1], device=scored.device)
    last = torch.where(scored, index, -1).amax(dim=1, keepdim=True)  # [B, 1]
    context = ~scored & (index < last)
    return scored.float() + prompt_weight * context.float()


def unwrapped(draft):
    """The draft itself under a distributed wrapper (DDP keeps it as `.module`): its config and buffers."""
    return getattr(draft, "module", draft)


def draft_masks(draft, length: int, lag: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive `[1, 1, L, L]` self- and cross-attention masks of a teacher-forced draft pass at `lag`."""
    config = unwrapped(draft).config
    sink, window = config.sink_size, path_window_keys(config.window_rule, config.window_size)
    self_mask = tree_attention_bias(self_attention_allowed(length, sink, window, device), dtype)[None, None]
    cross_mask = tree_attention_bias(cross_attention_allowed(length, lag, device), dtype)[None, None]
    return self_mask, cross_mask


def weighted_mean(per_position: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return per_position.mean()
    return (per_position * weights).sum() / weights.sum().clamp(min=1e-6)


def draft_loss(
    draft,
    target: PreTrainedModel,
    input_ids: torch.LongTensor,
    position_ids: torch.LongTensor,
    lag: int,
    loss_type: str = "distill",
    loss_mask: torch.Tensor | None = None,
    prompt_weight: float = 0.0,
) -> torch.Tensor:
    """Mean next-token loss of the draft over positions `lag .. L-2` of `input_ids [B, L]`.

    `loss_type`: "ce" (data labels through the frozen head) or "distill" (KL divergence from the target's own
    next-token distribution at the same position to the draft's). `loss_mask [B, L]` (bool, optional): the mean
    runs over the predictions of tokens `i` with `loss_mask[:, i]` — e.g. a generated continuation — and, with
    weight `prompt_weight`, over the prompt before it; every position still attends as usual. A draft with a draft
    vocabulary is scored over it (the target's distribution renormalised to it): it can predict nothing else.
    """
    batch, length = input_ids.shape
    if length < lag + 2:
        raise ValueError(f"Training sequences need at least lag + 2 = {lag + 2} tokens, got {length}; use longer "
                         "sequences (--seq-len) or a smaller --lag-max.")
    if loss_type not in ("ce", "distill"):
        raise ValueError(f"Unknown loss {loss_type!r}; use 'ce' or 'distill'.")
    key, value, target_logits = target_pass(target, input_ids, position_ids, loss_type == "distill")
    self_mask, cross_mask = draft_masks(draft, length, lag, key.dtype, input_ids.device)
    logits = draft(input_ids, position_ids, key, value, None, self_mask, cross_mask, vocab_subset=True)  # [B, L, V']
    scored = slice(lag, length - 1)
    draft_logprobs = F.log_softmax(logits[:, scored].float(), dim=-1)
    vocab = unwrapped(draft).draft_vocab
    weights = None if loss_mask is None else token_weights(loss_mask, prompt_weight)[:, lag + 1 :]  # [B, L-lag-1]
    if loss_type == "ce":
        labels = input_ids[:, lag + 1 :]
        if vocab is not None:  # a label outside the draft vocabulary cannot be predicted: not scored
            column = vocab_columns(vocab, unwrapped(draft).config.vocab_size)
            labels = column[labels]
            inside = labels >= 0
            weights = inside.float() if weights is None else weights * inside
            labels = labels.clamp(min=0)
        per_position = -draft_logprobs.gather(-1, labels[..., None])[..., 0]  # [B, L-lag-1]
        return weighted_mean(per_position, weights)
    target_logits = target_logits[:, scored].float()
    if vocab is not None:
        target_logits = target_logits[..., vocab]
    target_logprobs = F.log_softmax(target_logits, dim=-1)
    per_position = F.kl_div(draft_logprobs, target_logprobs, log_target=True, reduction="none").sum(-1)
    return weighted_mean(per_position, weights)


def vocab_columns(vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[V]`: the column of each token id in a draft vocabulary's logits, -1 for ids outside it."""
    column = torch.full((vocab_size,), -1, dtype=torch.long, device=vocab.device)
    column[vocab] = torch.arange(len(vocab), device=vocab.device)
    return column


def feature_loss(draft, rows: dict[str, torch.Tensor], lag: int, prompt_weight: float = 0.0) -> torch.Tensor:
    """:func:`draft_loss` ("distill") from captured features (:mod:`~longspec_hf.training.features`) instead of a
    target forward: the KL divergence from the target's top-k next-token distribution, renormalised over its tokens
    the draft can predict, to the draft's."""
    input_ids, position_ids = rows["input_ids"].long(), rows["position_ids"].long()
    batch, length = input_ids.shape
    if length < lag + 2:
        raise ValueError(f"Training sequences need at least lag + 2 = {lag + 2} tokens, got {length}; use a smaller "
                         "--lag-max.")
    dtype = next(draft.parameters()).dtype
    key, value = rows["key"].to(dtype), rows["value"].to(dtype)
    self_mask, cross_mask = draft_masks(draft, length, lag, dtype, input_ids.device)
    logits = draft(input_ids, position_ids, key, value, None, self_mask, cross_mask, vocab_subset=True)  # [B, L, V']
    scored = slice(lag, length - 1)
    draft_logprobs = F.log_softmax(logits[:, scored].float(), dim=-1)  # [B, n, V']
    top_ids = rows["top_ids"][:, scored].long()  # [B, n, k]
    top_logprobs = rows["top_logprobs"][:, scored].float()
    vocab = unwrapped(draft).draft_vocab
    if vocab is not None:
        top_ids = vocab_columns(vocab, unwrapped(draft).config.vocab_size)[top_ids]
    inside = top_ids >= 0
    scorable = inside.any(-1)  # [B, n]: a position with none of its top-k inside the vocabulary is not scored
    # Renormalised over the tokens inside; a position with none gets a finite stand-in (its weight is 0), so no NaN
    # reaches the mean.
    masked = top_logprobs.masked_fill(~inside, float("-inf")).masked_fill(~scorable[..., None], 0.0)
    target_logprobs = torch.log_softmax(masked, dim=-1)  # [B, n, k]
    target_probs = target_logprobs.exp()  # 0 for the tokens outside
    gathered = draft_logprobs.gather(-1, top_ids.clamp(min=0))
    per_position = (target_probs * (target_logprobs.masked_fill(~inside, 0.0) - gathered)).sum(-1)  # [B, n]
    weights = token_weights(rows["loss_mask"], prompt_weight)[:, lag + 1 :] * scorable
    return weighted_mean(per_position, weights)
