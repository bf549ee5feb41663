"""The speculative decode loop behind ``target.generate(input_ids, assistant_model=draft)``.

One loop serves every drafter and every tree shape (a chain is a tree of width 1). Per round:

1. the draft proposes a token tree rooted at the newest committed token (one draft forward per level);
2. the target verifies the whole tree in one forward (hybrid prefix/tree attention);
3. the acceptance walk emits the target's own tokens along the deepest matching path, plus one bonus token;
4. the target cache is compacted to the accepted path and the draft commits the same tokens;
5. stopping criteria and the streamer see the new tokens one by one, as in plain decoding.

Losslessness: step 3 computes every emitted token from the target's logits at exactly the prefix plain decoding would
use, with transformers' own logits processors, so greedy output is token-identical and sampled output has the same
distribution (each token is drawn from the target's processed distribution; draft tokens are deterministic children,
never accepted by a ratio test).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .drafting import Drafter
from .tree import validate_tree_shape
from .verify import accept_path, compact_cache, verify_tree


@dataclass
class SpeculativeStats:
    """Statistics of the last ``generate`` call.

    Attributes:
        rounds: target verification forwards (the prefill is not counted).
        drafted_tokens: tree nodes proposed by the draft (roots excluded), summed over rounds.
        accepted_tokens: draft tokens accepted by the target.
        new_tokens: tokens emitted (includes the first token, which comes from the prefill).
        acceptance_lengths: accepted draft tokens per round.
    """

    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    acceptance_lengths: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean tokens produced per target verification forward (accepted draft tokens + the bonus token)."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    def __repr__(self) -> str:
        return (
            f"SpeculativeStats(rounds={self.rounds}, accepted_tokens={self.accepted_tokens}, "
            f"drafted_tokens={self.drafted_tokens}, new_tokens={self.new_tokens}, tau={self.tau:.3f})"
        )


def validate_inputs(
    target: PreTrainedModel, input_ids: torch.LongTensor, generation_config: GenerationConfig, model_kwargs: dict
) -> None:
    """Refuse what this engine cannot do exactly, with a one-line error naming the fix."""
    if input_ids.shape[0] != 1:
        raise NotImplementedError(
            f"Batch size {input_ids.shape[0]} with a LongSpec draft is not supported yet; call generate once per "
            "prompt (batch size 1)."
        )
    if input_ids.shape[1] == 0:
        raise ValueError("The prompt is empty; pass at least one token (e.g. the tokenizer's BOS token).")
    max_positions = getattr(target.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if max_positions is not None and input_ids.shape[1] > max_positions:
        raise ValueError(
            f"The prompt has {input_ids.shape[1]} tokens but the target supports at most {max_positions} positions; "
            "truncate the prompt (e.g. tokenizer(..., truncation=True, max_length=...))."
        )
    mask = model_kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise ValueError(
            "attention_mask contains padding, which a LongSpec draft does not support yet at batch size 1; "
            "pass the unpadded prompt."
        )
    cache = model_kwargs.get("past_key_values")
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            "Continuing from a filled past_key_values is not supported with a LongSpec draft; pass the full prompt "
            "without a cache."
        )
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise NotImplementedError(
                f"{flag}=True is not supported with a LongSpec draft; generate without it (sequences are returned)."
            )


def token_selector(generation_config: GenerationConfig):
    if generation_config.do_sample:
        return lambda scores: int(torch.multinomial(torch.softmax(scores[0], dim=-1), 1))
    return lambda scores: int(scores[0].argmax())


def emit(tokens: list[int], sequence: torch.LongTensor, stopping_criteria, scores: torch.Tensor):
    """Append `tokens` one by one until a stopping criterion fires; returns `(sequence, n_appended, finished)`."""
    for i, token in enumerate(tokens):
        sequence = torch.cat([sequence, sequence.new_tensor([[token]])], dim=-1)
        if bool(stopping_criteria(sequence, scores).all()):
            return sequence, i + 1, True
    return sequence, len(tokens), False


def speculative_generate(
    target: PreTrainedModel,
    input_ids: torch.LongTensor,
    drafter: Drafter,
    logits_processor,
    stopping_criteria,
    generation_config: GenerationConfig,
    streamer=None,
    **model_kwargs,
):
    """Run the LongSpec decode loop; arguments as prepared by ``GenerationMixin.generate`` (see ``hook.py``)."""
    validate_inputs(target, input_ids, generation_config, model_kwargs)
    drafter.bind(target)
    tree_shape = validate_tree_shape(getattr(drafter.generation_config, "tree_shape", None) or [1])
    attn_backend = getattr(drafter.generation_config, "tree_attn_backend", "auto")
    select = token_selector(generation_config)
    stats = SpeculativeStats()
    drafter.stats = stats
    max_length = generation_config.max_length

    # 1. prefill: the target reads the prompt with its own attention, the draft fills its constant-size cache
    cache = DynamicCache()  # full layers, so any rejected tree tail can be cropped
    n = input_ids.shape[1]
    position_ids = torch.arange(n, device=input_ids.device)[None]
    logits = target(
        input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True, logits_to_keep=1
    ).logits[:, -1].float()  # [1, V]
    state = drafter.start(input_ids, cache)

    # 2. the first token comes from the prefill, exactly as in plain decoding; it is the first round's root
    root = select(logits_processor(input_ids, logits))
    sequence, _, finished = emit([root], input_ids, stopping_criteria, logits)
    stats.new_tokens = 1
    if streamer is not None:
        streamer.put(sequence[:, -1:].cpu())

    while not finished:
        prefix_len = cache.get_seq_length()  # committed tokens with target KV; the root sits at this position
        # 3. draft a tree no deeper than the tokens still allowed
        depth = min(len(tree_shape), max_length - sequence.shape[1] - 1)
        tree = drafter.draft(state, sequence[0, -1], prefix_len, cache, tree_shape[: max(depth, 0)])
        # 4. verify the whole tree in one target forward
        logits = verify_tree(target, cache, tree, attn_backend)  # [T, V]
        # 5. accept the deepest path the target agrees with, plus its bonus token
        path, tokens = accept_path(tree, logits, sequence, logits_processor, select)
        compact_cache(cache, prefix_len, path)
        committed = torch.cat([tree.tokens[:1], tree.tokens[path]])[None] if path else tree.tokens[:1][None]
        drafter.commit(state, committed, prefix_len)
        # 6. stopping criteria and streamer see tokens one at a time, so a stop inside a run emits nothing after it
        sequence, appended, finished = emit(tokens, sequence, stopping_criteria, logits[-1:])
        if streamer is not None:
            streamer.put(sequence[:, -appended:].cpu())
        stats.rounds += 1
        stats.drafted_tokens += len(tree) - 1
        stats.accepted_tokens += len(path)
        stats.acceptance_lengths.append(len(path))
        stats.new_tokens += appended

    if streamer is not None:
        streamer.end()
    # Leave the cache as plain decoding does: KV for every token but the last.
    overshoot = cache.get_seq_length() - (sequence.shape[1] - 1)
    if overshoot > 0:
        cache.crop(-overshoot)
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequence, past_key_values=cache)
    return sequence
