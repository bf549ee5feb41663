"""The training-free self-speculative draft: the target over a sink + window view of its own KV cache."""

from __future__ import annotations

import pytest
import torch
from conftest import plain_greedy, random_prompt, tiny_target
from test_batch import left_padded
from test_sampling import PROMPT, SAMPLES, SIGNIFICANCE, chi_square_p_value, exact_last_two, sample_last_two
from test_sampling import small_vocab_target as small_vocab

from longspec_hf import SelfDraft, SinkWindowCache
from longspec_hf.verify import TargetState


@pytest.mark.parametrize("tree_shape", [[1, 1, 1, 1], [2, 3, 3]])
def test_greedy_is_token_identical(family, tree_shape):
    target = tiny_target(family)
    draft = SelfDraft.from_target(target, sink_size=2, window_size=16, tree_shape=tree_shape)
    ids = random_prompt(80, seed=3)
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=24)
    assert torch.equal(out, plain_greedy(target, ids, max_new_tokens=24))
    assert draft.stats.rounds < 24


@pytest.mark.parametrize("family_name", ["llama", "qwen3", "gemma"])
def test_a_window_covering_the_context_drafts_exactly_the_target(family_name):
    """With nothing evicted the draft *is* the target, so every drafted token is accepted: a check of the draft's
    cache hand-over (prefill slots, committed slots from the target's compacted cache) and of its masks."""
    target = tiny_target(family_name)
    draft = SelfDraft.from_target(target, sink_size=2, window_size=500, tree_shape=[1, 1, 1, 1])
    ids = random_prompt(60)
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=30)
    assert torch.equal(out, plain_greedy(target, ids, max_new_tokens=30))
    assert draft.stats.accepted_tokens == draft.stats.drafted_tokens  # every drafted token accepted
    assert draft.stats.tau > 4.5


def test_memory_is_constant_in_the_context_length():
    target = tiny_target("qwen2")
    sizes = []
    for n in (100, 700):
        draft = SelfDraft.from_target(target, sink_size=4, window_size=32)
        target.generate(random_prompt(n), assistant_model=draft, do_sample=False, max_new_tokens=8)
        sizes.append(draft.stats.draft_cache_bytes)
    per_token = 2 * 2 * 16 * 4 * target.config.num_hidden_layers  # K and V, 2 KV heads, head_dim 16, fp32
    assert sizes[0] == sizes[1] <= (4 + 32 + 5) * per_token


def test_sliding_window_targets_draft_with_their_own_window():
    target = tiny_target("mistral")  # sliding_window 48 on every layer
    draft = SelfDraft.from_target(target, sink_size=4, window_size=512)
    assert (draft.sink_size, draft.window_size) == (0, 47)


def test_padded_batch_matches_each_row_alone():
    target = tiny_target("llama")
    prompts = [random_prompt(n, seed=n) for n in (7, 60, 31)]
    alone = [plain_greedy(target, p, max_new_tokens=16) for p in prompts]
    ids, mask = left_padded(prompts)
    draft = SelfDraft.from_target(target, sink_size=2, window_size=20, tree_shape=[2, 2])
    out = target.generate(ids, attention_mask=mask, assistant_model=draft, do_sample=False, max_new_tokens=16)
    for row, (p, expected) in enumerate(zip(prompts, alone, strict=True)):
        assert torch.equal(out[row, ids.shape[1] - p.shape[1]:], expected[0])


@pytest.mark.parametrize("tree_shape", [[1, 1, 1], [2, 2, 2]])
def test_sampling_matches_the_target_distribution(tree_shape):
    target = small_vocab("llama")
    draft = SelfDraft.from_target(target, sink_size=1, window_size=2, tree_shape=tree_shape)  # really approximate
    samples, accepted = sample_last_two(target, draft, 1.0)
    assert accepted > SAMPLES // 20
    assert chi_square_p_value(samples, exact_last_two(target, PROMPT, 1.0)) > SIGNIFICANCE


def test_binding_to_another_model_is_refused():
    draft = SelfDraft.from_target(tiny_target("llama"))
    with pytest.raises(ValueError, match=r"SelfDraft.from_target\(target\)"):
        tiny_target("qwen2").generate(random_prompt(10), assistant_model=draft, max_new_tokens=2)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="window_size >= 1"):
        SelfDraft.from_target(tiny_target("llama"), window_size=0)


def test_draft_cache_is_a_sink_window_cache_of_every_layer():
    target = tiny_target("gemma")
    draft = SelfDraft.from_target(target, sink_size=2, window_size=8)
    ids = random_prompt(50)
    out = target(ids, use_cache=True)
    state = TargetState(cache=out.past_key_values, valid=None, slot_positions=torch.arange(50)[None],
                        next_positions=torch.tensor([50]))
    cache = draft.start(ids, None, state).cache
    assert isinstance(cache, SinkWindowCache)
    assert len(cache.layers) == target.config.num_hidden_layers
    assert cache.get_seq_length() == 50 and cache.get_stored_length() == 10
    torch.testing.assert_close(cache.layers[1].keys[:, :, 2:], out.past_key_values.layers[1].keys[:, :, -8:])
