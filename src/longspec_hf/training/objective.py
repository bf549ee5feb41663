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


def draft_loss(
    draft,
    target: PreTrainedModel,
    input_ids: torch.LongTensor,
    position_ids: torch.LongTensor,
    lag: int,
    loss_type: str = "distill",
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token loss of the draft over positions `lag .. L-2` of `input_ids [B, L]`.

    `loss_type`: "ce" (data labels through the frozen head) or "distill" (KL divergence from the target's own
    next-token distribution at the same position to the draft's). `loss_mask [B, L]` (bool, optional): the mean
    runs over the predictions of tokens `i` with `loss_mask[:, i]` only — e.g. a generated continuation, with its
    prompt as context; every position still attends as usual.
    """
    batch, length = input_ids.shape
    if length < lag + 2:
        raise ValueError(f"Training sequences need at least lag + 2 = {lag + 2} tokens, got {length}; use longer "
                         "sequences (--seq-len) or a smaller --lag-max.")
    key, value, target_logits = target_pass(target, input_ids, position_ids, loss_type == "distill")
    dtype = key.dtype
    sink, window = draft.config.sink_size, path_window_keys(draft.config.window_rule, draft.config.window_size)
    self_mask = tree_attention_bias(self_attention_allowed(length, sink, window, input_ids.device), dtype)[None, None]
    cross_mask = tree_attention_bias(cross_attention_allowed(length, lag, input_ids.device), dtype)[None, None]
    logits = draft(input_ids, position_ids, key, value, None, self_mask, cross_mask)  # [B, L, V]
    scored = slice(lag, length - 1)
    draft_logprobs = F.log_softmax(logits[:, scored].float(), dim=-1)
    if loss_type not in ("ce", "distill"):
        raise ValueError(f"Unknown loss {loss_type!r}; use 'ce' or 'distill'.")
    if loss_mask is None:  # the unmasked means, as the loss was always computed
        if loss_type == "ce":
            return F.nll_loss(draft_logprobs.flatten(0, 1), input_ids[:, lag + 1 :].flatten())
        target_logprobs = F.log_softmax(target_logits[:, scored].float(), dim=-1)
        return F.kl_div(draft_logprobs.flatten(0, 1), target_logprobs.flatten(0, 1), log_target=True,
                        reduction="batchmean")
    if loss_type == "ce":
        per_position = -draft_logprobs.gather(-1, input_ids[:, lag + 1 :, None])[..., 0]  # [B, L-lag-1]
    else:
        target_logprobs = F.log_softmax(target_logits[:, scored].float(), dim=-1)
        per_position = F.kl_div(draft_logprobs, target_logprobs, log_target=True, reduction="none").sum(-1)
    weights = loss_mask[:, lag + 1 :].to(per_position.dtype)  # [B, L-lag-1]: whether each predicted token counts
    return (per_position * weights).sum() / weights.sum().clamp(min=1)
