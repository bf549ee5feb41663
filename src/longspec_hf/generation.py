"""The speculative decode loop behind ``target.generate(input_ids, assistant_model=draft)``.

One loop serves every drafter and every tree shape (a chain is a tree of width 1). Per round:

1. plan: the tree's level widths (fixed, or chosen level by level under ``tree_shape="auto"``) and extra branches;
2. the draft proposes a token tree rooted at the newest committed token (one draft forward per level), plus, with
   ``prompt_lookup_num_tokens``, a branch copied from an earlier occurrence of the text's last n-gram (``lookup.py``);
3. the target verifies the whole tree in one forward (hybrid prefix/tree attention);
4. the acceptance walk emits the target's own tokens along the deepest matching path, plus one bonus token;
5. the target cache is compacted to the accepted path and the draft commits the same tokens;
6. stopping criteria and the streamer see the new tokens one by one, as in plain decoding.

Features take part through round hooks (``rounds.py``): the tree-shape policy, the lookup branch, SpecPV and the
statistics each read the round at every step and fill in what is theirs; the loop names none of them. A round reads
one value from the device (the acceptance's transfer), plus one per level that ``"auto"`` chooses the width of.

With a ``compile_config`` (transformers' own option), the draft's level forwards and the verification forward run
through ``torch.compile`` (``compiled.py``); nothing else changes.

Losslessness: step 3 computes every emitted token from the target's logits at exactly the prefix plain decoding would
use, with transformers' own logits processors, so greedy output is token-identical and sampled output has the same
distribution (each token is drawn from the target's processed distribution; draft tokens are deterministic children,
never accepted by a ratio test). The one exception is SpecPV partial verification (opt-in, approximate; see
``specpv.py``), where step 2 reads only part of the target's KV in most rounds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.stopping_criteria import logger as stopping_logger

from .acceptance import AcceptanceModel
from .attention import resolve_backend
from .auto_tree import AutoShape, AutoTree
from .cache import PreallocatedCache, kv_bytes
from .compat import cache_kwarg, config_value, decoder_output, prompt_cache
from .compiled import compiled_call, fallback_count, round_compile_config, warn_on_fallback
from .cost_model import cost_model_for
from .drafting import Drafter
from .lookup import LookupBranch
from .probe import last_layer_kv_geometry
from .rounds import FixedShape, Round, RoundHook, RoundHooks
from .specpv import PartialVerifier, SpecPVConfig
from .timing import RoundTimer
from .tree import AUTO, setting_envelope, tree_setting
from .verify import TargetState, accept_greedy, accept_path, compact, row_of_batch, verify_tree


@dataclass
class SpeculativeStats:
    """Statistics of the last ``generate`` call.

    Attributes:
        rounds: target verification forwards (the prefill is not counted).
        drafted_tokens: tree nodes proposed by the draft (roots excluded), summed over rounds.
        accepted_tokens: draft tokens accepted by the target.
        new_tokens: tokens emitted (includes the first token, which comes from the prefill).
        acceptance_lengths: accepted draft tokens per round.
        draft_cache_bytes: the most bytes the draft's own cache held during the call (constant for a sink+window
            cache, whatever the context length).
        full_verifications / partial_verifications: rounds of each kind under SpecPV (all rounds are full without).
        timings: seconds per part of the rounds ("draft", "verify", "accept", "commit"), summed over the call; only
            filled when ``draft.generation_config.profile_rounds`` is True (timing synchronises the device).
        tree_shapes: under ``tree_shape="auto"``, how many rounds used each tree (level widths "1,1,1"; "none": the
            root only, a plain decode step).
        predicted_accepted: under "auto", the accepted tokens of the draft's trees the acceptance model expected,
            summed over rounds (compare with `accepted_tokens - lookup_accepted_tokens` for its calibration).
        measure_seconds: under "auto", seconds spent timing forwards for the cost model (first use at a context).
        lookup_accepted_tokens: with ``prompt_lookup_num_tokens``, accepted tokens that came from the lookup branch
            (beyond what the draft's own tree proposed); included in `accepted_tokens`. `lookup_rounds`: rounds that
            verified the branch (a round has none without an n-gram match, or under "auto" when it would not pay).
    """

    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    acceptance_lengths: list[int] = field(default_factory=list)
    draft_cache_bytes: int = 0
    full_verifications: int = 0
    partial_verifications: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    tree_shapes: dict[str, int] = field(default_factory=dict)
    predicted_accepted: float = 0.0
    measure_seconds: float = 0.0
    lookup_accepted_tokens: int = 0
    lookup_rounds: int = 0

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
    target: PreTrainedModel, input_ids: torch.LongTensor, generation_config: GenerationConfig, model_kwargs: dict,
    streamer,
) -> torch.Tensor | None:
    """Refuse what this engine cannot do exactly, with a one-line error naming the fix; returns the 2D mask."""
    if input_ids.shape[1] == 0:
        raise ValueError("The prompt is empty; pass at least one token (e.g. the tokenizer's BOS token).")
    mask = model_kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError("attention_mask must be 2D [batch, length] with a LongSpec draft.")
        mask = mask.to(device=input_ids.device, dtype=torch.long)
        if bool((mask.sum(-1) == 0).any()):
            raise ValueError("A prompt is empty (all padding); pass at least one token per row (e.g. the BOS token).")
        if bool((mask[:, -1] == 0).any()):
            raise ValueError(
                "Right padding detected in attention_mask; LongSpec drafts need left padding: set "
                "tokenizer.padding_side = 'left'."
            )
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise ValueError("attention_mask has holes; only left padding (zeros before the prompt) is supported.")
        if bool(mask.all()):
            mask = None
    # Prompts longer than the target's positions run, as in plain generate(), whose max-length criterion warns (so
    # does the loop's host-side copy of it, `host_stopping`).
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("Streamers support batch size 1 only; generate one prompt at a time to stream.")
    cache = prompt_cache(model_kwargs)
    if cache is not None and cache.get_seq_length() > 0:
        check_prompt_cache(cache, input_ids, mask)
    for flag in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(generation_config, flag, False):
            raise NotImplementedError(
                f"{flag}=True is not supported with a LongSpec draft; generate without it (sequences are returned)."
            )
    return mask


def target_positions(target: PreTrainedModel) -> int | None:
    return getattr(target.config.get_text_config(decoder=True), "max_position_embeddings", None)


def warn_past_positions(length: int, max_positions: int | None) -> None:
    """transformers' own warning (its max-length criterion logs it once) for a sequence past the target's positions."""
    if max_positions is not None and length > max_positions:
        stopping_logger.warning_once(
            "This is a friendly reminder - the current text generation call has exceeded the model's predefined "
            f"maximum length ({max_positions}). Depending on the model, you may observe exceptions, performance "
            "degradation, or nothing at all."
        )


def check_prompt_cache(cache, input_ids: torch.LongTensor, mask: torch.Tensor | None) -> None:
    """A filled prompt cache (`cache=`, formerly `past_key_values=`) is continued when it holds the KV of a prefix of
    every row."""
    if mask is not None:
        raise ValueError("A filled cache (cache=...) cannot be continued for left-padded rows with a LongSpec draft; "
                         "pass the full padded prompts without a cache.")
    if not is_plain_dynamic(cache):
        raise ValueError("A filled cache (cache=...) must be a plain DynamicCache() (full layers, built without a "
                         "config) to be continued with a LongSpec draft: rejected tree tokens are cropped from it.")
    cached = cache.get_seq_length()
    if cached >= input_ids.shape[1]:
        raise ValueError(f"The cache already holds {cached} tokens but the prompt has {input_ids.shape[1]}; "
                         "pass the full prompt, with at least its last token not yet in the cache.")
    if cache.layers[0].keys.shape[0] != input_ids.shape[0]:
        raise ValueError(f"The cache has batch size {cache.layers[0].keys.shape[0]} but input_ids has "
                         f"{input_ids.shape[0]}; expand the cache to the batch (or generate per row).")


def token_selector(generation_config: GenerationConfig):
    """Scores `[1, V]` -> token id: argmax for greedy, one draw for sampling (as plain decoding does)."""
    if generation_config.do_sample:
        return lambda scores: int(torch.multinomial(torch.softmax(scores[0], dim=-1), 1))
    return lambda scores: int(scores[0].argmax())


def lookup_setting(generation_config: GenerationConfig, drafter: Drafter) -> tuple[int, int]:
    """`(L, n)`: tokens of the prompt-lookup branch grafted onto each round's tree (0: none) and the longest n-gram
    matched. The call's ``prompt_lookup_num_tokens`` / ``max_matching_ngram_size`` (transformers' own options) win over
    the draft's ``generation_config``."""
    values = []
    for name, default in (("prompt_lookup_num_tokens", 0), ("max_matching_ngram_size", 2)):
        value = getattr(generation_config, name, None)
        if value is None:
            value = getattr(drafter.generation_config, name, None)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and default):
            raise ValueError(f"{name} must be a {'non-negative' if not default else 'positive'} int (e.g. "
                             f"prompt_lookup_num_tokens=4, max_matching_ngram_size=2); got {value!r}.")
        values.append(value)
    return values[0], values[1]


def emit(tokens: list[int], sequence: torch.LongTensor, stopping_criteria, scores: torch.Tensor,
         host_stop: HostStop | None = None):
    """Append `tokens` one by one until a stopping criterion fires; returns `(sequence, n_appended, finished)`.

    With `host_stop` (only transformers' max-length / EOS criteria are in play) the same per-token decision is made
    on host integers and the tokens are appended at once, so emitting costs no device synchronisation.
    """
    if host_stop is not None:
        appended, finished = host_stop(sequence.shape[1], tokens)
        return torch.cat([sequence, sequence.new_tensor([tokens[:appended]])], dim=-1), appended, finished
    for i, token in enumerate(tokens):
        sequence = torch.cat([sequence, sequence.new_tensor([[token]])], dim=-1)
        if bool(stopping_criteria(sequence, scores).all()):
            return sequence, i + 1, True
    return sequence, len(tokens), False


HostStop = Callable[[int, list[int]], tuple[int, bool]]


def host_stopping(stopping_criteria) -> HostStop | None:
    """transformers' default criteria (max length, EOS ids) evaluated on host integers, token by token, exactly as
    they would be on the sequence; `None` when any other criterion (stop strings, the caller's own) is present."""
    max_length, eos, max_positions = None, set(), None
    for criterion in stopping_criteria or []:
        if type(criterion) is MaxLengthCriteria:
            max_length = criterion.max_length if max_length is None else min(max_length, criterion.max_length)
            max_positions = criterion.max_position_embeddings
        elif type(criterion) is EosTokenCriteria:
            eos.update(torch.as_tensor(criterion.eos_token_id).flatten().tolist())
        else:
            return None

    def stop(length: int, tokens: list[int]) -> tuple[int, bool]:
        for i, token in enumerate(tokens):
            if token in eos or (max_length is not None and length + i + 1 >= max_length):
                return i + 1, True
        warn_past_positions(length + len(tokens), max_positions)
        return len(tokens), False

    return stop


def pad_sequences(sequences: list[torch.LongTensor], pad_token_id: int) -> torch.LongTensor:
    """Right-pad finished rows, as plain decoding fills finished rows with the pad token."""
    length = max(s.shape[1] for s in sequences)
    out = sequences[0].new_full((len(sequences), length), pad_token_id)
    for row, seq in enumerate(sequences):
        out[row, : seq.shape[1]] = seq[0]
    return out


def resolve_pad_token_id(generation_config: GenerationConfig) -> int:
    for value in (generation_config.pad_token_id, generation_config.eos_token_id):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


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
    """Run the LongSpec decode loop; arguments as prepared by ``GenerationMixin.generate`` (see ``hook.py``).

    Returns the sequences `[B, L]` (left padding kept, finished rows right-padded with the pad token), or with
    ``return_dict_in_generate=True`` a ``GenerateDecoderOnlyOutput`` with ``sequences`` and, for one unpadded row,
    ``cache`` (KV of every token but the last, as after plain decoding; ``None`` for padded batches,
    whose cache holds placeholder slots).
    """
    input_ids = input_ids.to(target.device)
    mask = validate_inputs(target, input_ids, generation_config, model_kwargs, streamer)
    drafter.bind(target)
    setting = tree_setting(getattr(drafter.generation_config, "tree_shape", None))
    attn_backend = target_backend(target, getattr(drafter.generation_config, "tree_attn_backend", "auto"))
    lookup, max_ngram = lookup_setting(generation_config, drafter)
    specpv = SpecPVConfig.from_value(getattr(drafter.generation_config, "specpv", None))
    partial = None if specpv is None else PartialVerifier(specpv)
    compile_config = round_compile_config(generation_config, drafter)
    fallbacks = None if compile_config is None else fallback_count()
    verify = round_verifier(target, compile_config, plain_root=specpv is None)
    select = token_selector(generation_config)
    accept = acceptance_walk(generation_config, logits_processor, select, input_ids.shape[0])
    host_stop = host_stopping(stopping_criteria)
    stats = drafter.stats = SpeculativeStats()
    timer = RoundTimer(target.device, stats.timings if getattr(drafter.generation_config, "profile_rounds", False)
                       else None)
    max_length = generation_config.max_length
    batch, n = input_ids.shape

    # 1. prefill: the target reads the prompts with its own attention (only the tokens a given prompt cache lacks),
    #    into a cache preallocated for the whole generation; the draft fills its constant-size cache
    user_cache = prompt_cache(model_kwargs)
    cached = 0 if user_cache is None else user_cache.get_seq_length()
    # Room for the largest tree a round may verify: the draft's envelope plus the lookup branch.
    cache = target_cache(target, user_cache if cached else None, max_length, setting_envelope(setting) + (lookup,),
                         n)
    if mask is None:
        position_ids = torch.arange(n, device=input_ids.device)[None].expand(batch, n)
    else:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = target(
        input_ids=input_ids[:, cached:], attention_mask=mask, position_ids=position_ids[:, cached:],
        use_cache=True, logits_to_keep=1, **{cache_kwarg(target): cache},
    ).logits[:, -1].float()  # [B, V]
    state = TargetState(cache=cache, valid=None if mask is None else mask.bool(), slot_positions=position_ids,
                        next_positions=position_ids[:, -1] + 1)
    draft_state = drafter.start(input_ids, mask, state)
    draft_state.compile_config = compile_config

    # 2. the first token comes from the prefill, exactly as in plain decoding; it is each row's first root
    scores = logits_processor(input_ids, logits)
    sequences = [input_ids[b : b + 1] for b in range(batch)]
    active: list[int] = []
    last_tokens = []  # each row's newest token, kept on the host: the next round's root
    for b in range(batch):
        first = select(scores[b : b + 1])
        last_tokens.append(first)
        sequences[b], _, finished = emit([first], sequences[b], stopping_criteria, logits[b:b + 1], host_stop)
        if not finished:
            active.append(b)
    stats.new_tokens = batch
    if streamer is not None:
        streamer.put(sequences[0][:, -1:].cpu())
    if len(active) < batch:
        keep_rows(state, drafter, draft_state, active, list(range(batch)))

    # 3. the features that take part in each round (tree shape, lookup branch, SpecPV, statistics), in step order
    hooks = RoundHooks()
    if lookup and active:
        hooks.append(LookupBranch.from_prompts(input_ids, mask, {b: last_tokens[b] for b in active}, lookup,
                                               max_ngram))
    if setting != AUTO:
        hooks.append(FixedShape(setting))
    elif active:
        auto = AutoTree(cost_model_for(target, drafter, compile_config is not None), call_acceptance(drafter),
                        target.device, stats)
        roots = torch.tensor([last_tokens[b] for b in active], device=input_ids.device)
        stats.measure_seconds = auto.measure(target, state, drafter, draft_state, roots, attn_backend, verify,
                                             warm_up=compile_config is not None)
        hooks.append(AutoShape(auto))
    if partial is not None:  # under SpecPV, most rounds verify against a partial KV
        verify = functools.partial(partial.verify, verify_tree=verify)
        hooks.append(partial)
    hooks.append(CountRounds(stats, draft_state))

    while active:
        roots = torch.tensor([last_tokens[b] for b in active], device=input_ids.device)
        root_positions = state.next_positions
        # 4. plan the round: the draft's tree no deeper than the tokens any row may still produce, extra branches
        round = Round(rows=active, context=state.cache.get_seq_length(),
                      room=max(max_length - sequences[b].shape[1] for b in active) - 1)
        hooks.plan(round)
        # 5. draft a tree per row (one draft forward per level), then the hooks' branches
        with timer("draft"):
            round.tree = drafter.draft(draft_state, roots, root_positions, state, round.shape)
            round.drafted = len(round.tree)
            hooks.drafted(round)
        # 6. verify every row's tree in one target forward
        with timer("verify"):
            logits = verify(target, state, round.tree, attn_backend)  # [A, T, V]
        # 7. each row accepts the deepest path the target agrees with, plus its bonus token
        with timer("accept"):
            round.paths, round.new_tokens = accept(round.tree, logits, active, sequences)
        hooks.accepted(round)
        # 8. the target's cache and the draft keep the accepted paths: each row's root and accepted tokens
        with timer("commit"):
            new_valid = compact(state, round.paths)
            width = 1 + max(len(p) for p in round.paths)
            round.committed = torch.tensor([[last_tokens[b], *tokens[:-1]] + [0] * (width - len(tokens))
                                            for b, tokens in zip(active, round.new_tokens, strict=True)],
                                           device=input_ids.device)  # [A, 1 + max_k]
            drafter.commit(draft_state, round.committed, new_valid, root_positions)
        hooks.committed(round)
        # 9. stopping criteria and streamer see tokens one at a time, so a stop inside a run emits nothing after it
        still_active = []
        for i, b in enumerate(active):
            sequences[b], appended, finished = emit(round.new_tokens[i], sequences[b], stopping_criteria,
                                                    logits[i, -1:], host_stop)
            last_tokens[b] = round.new_tokens[i][-1]
            if streamer is not None:
                streamer.put(sequences[b][:, -appended:].cpu())
            hooks.emitted(round, i, round.new_tokens[i][:appended])
            if not finished:
                still_active.append(b)
        if len(still_active) < len(active):
            keep_rows(state, drafter, draft_state, still_active, active, hooks)
        active = still_active

    if streamer is not None:
        streamer.end()
    hooks.finish()
    if fallbacks is not None:
        warn_on_fallback(fallbacks)
    output = pad_sequences(sequences, resolve_pad_token_id(generation_config))
    if not generation_config.return_dict_in_generate:
        return output
    past = None
    if batch == 1 and state.valid is None:
        # Leave the cache as plain decoding does: KV for every token but the last, in the caller's cache if any.
        overshoot = cache.get_seq_length() - (output.shape[1] - 1)
        if overshoot > 0:
            cache.crop(-overshoot)
        past = cache.write_to(user_cache if is_plain_dynamic(user_cache) else DynamicCache())
    return decoder_output(output, past)


class CountRounds(RoundHook):
    """Fills the call's :class:`SpeculativeStats` from each round."""

    def __init__(self, stats: SpeculativeStats, draft_state):
        self.stats, self.draft_state = stats, draft_state

    def committed(self, round: Round) -> None:
        stats, paths = self.stats, round.paths
        stats.rounds += 1
        stats.drafted_tokens += (len(round.tree) - 1) * len(round.rows)
        stats.accepted_tokens += sum(len(p) for p in paths)
        stats.lookup_accepted_tokens += sum(node >= round.drafted for p in paths for node in p)
        stats.lookup_rounds += len(round.tree) > round.drafted
        stats.acceptance_lengths.extend(len(p) for p in paths)
        stats.full_verifications += round.full
        stats.partial_verifications += not round.full
        stats.draft_cache_bytes = max(stats.draft_cache_bytes, kv_bytes(self.draft_state.cache))

    def emitted(self, round: Round, row: int, tokens: list[int]) -> None:
        self.stats.new_tokens += len(tokens)


def round_verifier(target: PreTrainedModel, compile_config, plain_root: bool) -> Callable:
    """The round's verification `(target, state, tree, attn_backend) -> logits [A, T, V]`: eager or through
    torch.compile; eager rounds with the root alone run as plain decode steps (not under SpecPV, which re-feeds
    tokens before the tree)."""
    if compile_config is not None:
        return functools.partial(verify_tree, forward=compiled_call(target, compile_config))
    return root_only_as_plain_step(verify_tree) if plain_root else verify_tree


def acceptance_walk(generation_config: GenerationConfig, logits_processor, select, batch: int) -> Callable:
    """The round's acceptance `(tree, logits, rows, sequences) -> (paths, new_tokens)` for a call of `batch` rows:
    greedy without processors, the whole tree at once on the device with one host transfer; otherwise the walk of
    :func:`~longspec_hf.verify.accept_path`, row by row, with transformers' processors on each row's own prefix."""
    if not generation_config.do_sample and len(logits_processor or []) == 0:
        return lambda tree, logits, *_: accept_greedy(tree, logits)

    def walk(tree, logits, rows, sequences):
        children, node_tokens = tree.children(), tree.tokens.tolist()
        paths, new_tokens = [], []
        for i, b in enumerate(rows):
            path, tokens = accept_path(children[i], node_tokens[i], logits[i], sequences[b],
                                       row_of_batch(logits_processor, batch, b), select)
            paths.append(path)
            new_tokens.append(tokens)
        return paths, new_tokens

    return walk


def target_backend(target: PreTrainedModel, backend: str) -> str:
    """The call's prefix-attention backend for this target's device, dtype and heads (decided once, eagerly)."""
    text = target.config.get_text_config(decoder=True)
    heads = config_value(text, "num_attention_heads") or 1
    geometry = last_layer_kv_geometry(target)  # what the probe found in the cache: exact where configs vary by layer
    if geometry is not None:
        (kv_heads, head_dim), _ = geometry
    else:
        kv_heads = config_value(text, "num_key_value_heads") or heads
        head_dim = config_value(text, "head_dim") or (config_value(text, "hidden_size") or 64 * heads) // heads
    return resolve_backend(backend, target.device, target.dtype, heads, kv_heads, head_dim)



def root_only_as_plain_step(verify: Callable) -> Callable:
    """`verify`, except that a round whose tree is the root alone (what "auto" chooses when drafting would not pay)
    runs as the plain decode step it is: the target's own attention over its cache, as plain generate() runs it, so
    such a round costs what a plain step costs. Padded rows keep the tree path, whose mask skips their holes."""

    def run(target: PreTrainedModel, state: TargetState, tree, attn_backend: str = "auto"):
        if len(tree) > 1 or state.valid is not None:
            return verify(target, state, tree, attn_backend)
        out = target(input_ids=tree.tokens, position_ids=state.next_positions[:, None], use_cache=True,
                     logits_to_keep=1, **{cache_kwarg(target): state.cache})
        return out.logits.float()  # [B, 1, V]

    return run


def is_plain_dynamic(cache) -> bool:
    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def call_acceptance(drafter: Drafter) -> AcceptanceModel:
    """The drafter's acceptance model, carried over from its previous call with its evidence halved (a new call may
    read other text; the draft's calibration mostly carries over)."""
    model = getattr(drafter, "_auto_acceptance", None)
    if model is None:
        model = AcceptanceModel()
        drafter._auto_acceptance = model
    else:
        model.forget()
    return model


def target_cache(target: PreTrainedModel, prompt: DynamicCache | None, max_length: int,
                 tree_shape: tuple[int, ...], prompt_length: int = 0) -> PreallocatedCache:
    """The target's cache for the loop, with room for the whole generation plus one tree (and a caller's prompt
    cache copied in). The reservation is capped at the target's positions (or the prompt, when longer), so an
    unbounded `max_length` does not reserve memory the target is unlikely to use; the cache grows past it if needed."""
    reserve = min(max_length, max(target_positions(target) or max_length, prompt_length)) + 1 + sum(tree_shape)
    if prompt is None:
        return PreallocatedCache(reserve)
    cache = PreallocatedCache.from_dynamic(prompt, reserve)
    # The caller's cache now views the copy, so its own tensors are freed (unless held elsewhere): a long prompt cache
    # is not held twice. Its content is unchanged, and the loop leaves the final KV in it at the end.
    cache.write_to(prompt)
    return cache


def keep_rows(state: TargetState, drafter: Drafter, draft_state, keep: list[int], current: list[int],
              hooks: RoundHooks | None = None) -> None:
    """Drop finished rows from the target and draft state (and the hooks'), so they cost no more compute."""
    rows = torch.tensor([current.index(b) for b in keep], device=state.next_positions.device, dtype=torch.long)
    if rows.numel():
        state.select_rows(rows)
        drafter.select_rows(draft_state, rows)
        if hooks is not None:
            hooks.select_rows(rows)
