"""Greedy losslessness: generate(assistant_model=draft) is token-identical to plain greedy generate()."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conftest import FAMILIES, OracleDrafter, plain_greedy, random_prompt, tiny_target
from transformers import DynamicCache
from transformers.generation.stopping_criteria import logger as stopping_logger
from transformers.utils import logging as hf_logging

from longspec_hf import LongSpecDraftModel, SelfDraft
from longspec_hf.compat import cache_kwarg

TREES = {"chain": [1, 1, 1, 1], "beam": [4, 16, 16, 16, 16], "narrow": [2, 3, 2]}


def make_draft(target, tree, sink=4, window=16, seed=1):
    torch.manual_seed(seed)
    draft = LongSpecDraftModel.from_target(target, sink_size=sink, window_size=window)
    draft.generation_config.tree_shape = list(tree)
    return draft


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("prompt_len", [5, 120])
def test_random_draft_is_lossless(family, tree, prompt_len):
    target = tiny_target(family)
    ids = random_prompt(prompt_len, seed=prompt_len)
    expected = plain_greedy(target, ids, max_new_tokens=24)
    draft = make_draft(target, TREES[tree])
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=24)
    assert torch.equal(out, expected)
    assert draft.stats.new_tokens == 24
    assert draft.stats.rounds >= 1


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("corrupt_every", [0, 5])
def test_long_accepted_runs_are_lossless(family, tree, corrupt_every):
    target = tiny_target(family)
    ids = random_prompt(70, seed=3)
    expected = plain_greedy(target, ids, max_new_tokens=40)
    oracle = OracleDrafter(target, expected, TREES[tree], corrupt_every=corrupt_every)
    out = target.generate(ids, assistant_model=oracle, do_sample=False, max_new_tokens=40)
    assert torch.equal(out, expected)
    depth = len(TREES[tree])
    # The oracle's path is always in the tree: runs are as long as the tree (or the next corrupted token) allows.
    longest = depth if corrupt_every == 0 else min(depth, corrupt_every - 1)
    assert max(oracle.stats.acceptance_lengths) == longest
    if corrupt_every == 0:
        assert oracle.stats.tau > depth  # every round but possibly the last accepts the whole depth


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 7])
def test_max_new_tokens_is_exact(max_new_tokens):
    target = tiny_target("llama")
    ids = random_prompt(30, seed=5)
    expected = plain_greedy(target, ids, max_new_tokens=max_new_tokens)
    oracle = OracleDrafter(target, plain_greedy(target, ids, max_new_tokens=20), TREES["beam"])
    out = target.generate(ids, assistant_model=oracle, do_sample=False, max_new_tokens=max_new_tokens)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_stops_at_eos_inside_an_accepted_run(family_name):
    target = tiny_target(family_name)
    ids = random_prompt(40, seed=7)
    reference = plain_greedy(target, ids, max_new_tokens=30)
    # An EOS that first appears in the middle of the continuation, where the oracle's runs are long.
    generated = reference[0, ids.shape[1]:].tolist()
    eos = next(t for t in generated[3:] if generated.index(t) >= 3)
    expected = plain_greedy(target, ids, max_new_tokens=30, eos_token_id=eos)
    assert expected.shape[1] < reference.shape[1]
    oracle = OracleDrafter(target, reference, TREES["chain"])
    out = target.generate(ids, assistant_model=oracle, do_sample=False, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(out, expected)


def test_logits_processors_apply_per_token():
    target = tiny_target("qwen2")
    ids = random_prompt(25, seed=11)
    kwargs = dict(max_new_tokens=30, repetition_penalty=1.5, no_repeat_ngram_size=2)
    expected = plain_greedy(target, ids, **kwargs)
    oracle = OracleDrafter(target, expected, TREES["beam"])
    out = target.generate(ids, assistant_model=oracle, do_sample=False, **kwargs)
    assert torch.equal(out, expected)
    assert oracle.stats.accepted_tokens > 0


def test_stats_and_return_dict():
    target = tiny_target("llama")
    ids = random_prompt(20, seed=2)
    expected = plain_greedy(target, ids, max_new_tokens=16)
    oracle = OracleDrafter(target, expected, [1, 1, 1])
    out = target.generate(ids, assistant_model=oracle, max_new_tokens=16, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    stats = oracle.stats
    assert stats.new_tokens == 16
    assert stats.accepted_tokens + stats.rounds + 1 == 16  # every round adds accepted + bonus; the prefill adds 1
    assert stats.tau == pytest.approx((stats.accepted_tokens + stats.rounds) / stats.rounds)
    # The returned cache holds KV for every token but the last, as after plain decoding.
    assert out.past_key_values.get_seq_length() == expected.shape[1] - 1


def test_plain_generate_is_untouched():
    target = tiny_target("llama")
    ids = random_prompt(12, seed=4)
    a = target.generate(ids, do_sample=False, max_new_tokens=8)
    b = target.generate(ids, do_sample=False, max_new_tokens=8)
    assert torch.equal(a, b)
    assert target.config._attn_implementation in ("sdpa", "eager")


def test_generation_config_object_is_honoured():
    from transformers import GenerationConfig

    target = tiny_target("mistral")
    ids = random_prompt(60, seed=8)
    config = GenerationConfig(max_new_tokens=12, do_sample=False)
    expected = target.generate(ids, generation_config=config)
    out = target.generate(ids, generation_config=config, assistant_model=make_draft(target, TREES["narrow"]))
    assert torch.equal(out, expected)


def test_only_verification_uses_the_hybrid_attention(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from longspec_hf import HYBRID_ATTENTION_NAME

    calls = {"sdpa": [], HYBRID_ATTENTION_NAME: []}
    for name in calls:
        original = ALL_ATTENTION_FUNCTIONS[name]

        def spy(module, query, *args, _name=name, _original=original, **kwargs):
            calls[_name].append((query.shape[2], kwargs.get("tree_prefix_len")))
            return _original(module, query, *args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, name, spy)
    target = tiny_target("llama")
    ids = random_prompt(30, seed=1)
    draft = make_draft(target, TREES["narrow"])
    target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=10)
    layers = target.config.num_hidden_layers
    # The prefill with the target's own attention, and so is a last round with no room left for a tree: a plain step.
    plain_steps = (len(calls["sdpa"]) - layers) // layers
    assert calls["sdpa"] == [(30, None)] * layers + [(1, None)] * (plain_steps * layers) and plain_steps <= 1
    assert len(calls[HYBRID_ATTENTION_NAME]) == (draft.stats.rounds - plain_steps) * layers
    assert all(prefix is not None and q_len == 1 + 2 + 3 + 2
               for q_len, prefix in calls[HYBRID_ATTENTION_NAME][:layers])
    assert target.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("cached", [1, 69])
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_prompt_cache_is_continued_losslessly(family, cached, name):
    """A prompt cache prefilled once (as `longspec bench` does) is continued without re-reading the prefix, under
    transformers' current argument name and its deprecated one."""
    target = tiny_target(family)
    ids = random_prompt(70, seed=5)
    expected = plain_greedy(target, ids, max_new_tokens=20)
    cache = DynamicCache()
    with torch.no_grad():
        target(ids[:, :cached], use_cache=True, **{cache_kwarg(target): cache})
    reads = []
    hook = target.get_input_embeddings().register_forward_hook(lambda m, a, o: reads.append(a[0].shape[1]))
    oracle = OracleDrafter(target, expected, [1, 1, 1], corrupt_every=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
        out = target.generate(ids, assistant_model=oracle, max_new_tokens=20, **{name: cache})
    hook.remove()
    assert torch.equal(out, expected)
    assert reads[0] == 70 - cached  # the prefill reads only the tokens the cache lacks


def test_prompt_cache_errors_name_the_fix():
    target = tiny_target("llama")
    ids = random_prompt(12, seed=6)
    draft = make_draft(target, [1, 1])
    full = DynamicCache()
    with torch.no_grad():
        target(ids, use_cache=True, **{cache_kwarg(target): full})
    with pytest.raises(ValueError, match="at least its last token"):
        target.generate(ids, assistant_model=draft, max_new_tokens=4, cache=full)
    wide = DynamicCache()
    with torch.no_grad():
        target(ids[:, :6].expand(2, 6), use_cache=True, **{cache_kwarg(target): wide})
    with pytest.raises(ValueError, match="batch size"):
        target.generate(ids, assistant_model=draft, max_new_tokens=4, cache=wide)


PAST_POSITIONS = "exceeded the model's predefined maximum length"


@pytest.mark.parametrize("kind", ["auto", "chain", "lookup", "self_draft", "processors"])
def test_prompts_beyond_the_target_positions_run_as_in_plain_generate(kind, caplog):
    """What plain generate() accepts, the draft accepts: a prompt longer than max_position_embeddings (1024 here) is
    decoded, with transformers' own warning, to the same tokens."""
    target = tiny_target("qwen2")
    ids = random_prompt(1100, seed=8)
    ids[0, -40:] = ids[0, 300:340]  # a repeat, so the lookup branch has matches
    settings = dict(max_new_tokens=16, do_sample=False)
    if kind == "processors":  # acceptance walked row by row through the logits processors
        settings["repetition_penalty"] = 1.3
    expected = plain_greedy(target, ids, **{k: v for k, v in settings.items() if k != "do_sample"})
    if kind == "self_draft":
        draft = SelfDraft.from_target(target, sink_size=2, window_size=32)
    else:
        draft = make_draft(target, [1, 1, 1])
        if kind == "auto":
            draft.generation_config.tree_shape = "auto"
        if kind == "lookup":
            draft.generation_config.prompt_lookup_num_tokens = 6
    hf_logging.enable_propagation()
    try:
        stopping_logger.warning_once.cache_clear()  # earlier tests may have logged it already
        with caplog.at_level(logging.WARNING):
            out = target.generate(ids, assistant_model=draft, **settings)
    finally:
        hf_logging.disable_propagation()
    assert torch.equal(out, expected)
    assert PAST_POSITIONS in caplog.text
    assert draft.stats.rounds >= 1
