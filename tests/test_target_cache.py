"""The target's cache in the speculative loop: preallocated, written by index, compacted in place, and handed back as
plain decoding hands back its cache. Plus the vectorised greedy acceptance and per-part round timings."""

from __future__ import annotations

import pytest
import torch
from conftest import OracleDrafter, plain_greedy, random_prompt, tiny_target
from transformers import DynamicCache

from longspec_hf.cache import PreallocatedCache, PreallocatedLayer
from longspec_hf.tree import build_beam_tree
from longspec_hf.verify import accept_greedy, accept_path


def kv(n, batch=2, heads=3, dim=4, start=0):
    t = torch.arange(start, start + n, dtype=torch.float32).view(1, 1, n, 1).expand(batch, heads, n, dim).clone()
    return t, -t


def test_update_writes_by_index_into_one_buffer():
    layer = PreallocatedLayer(reserve=16)
    keys, values = layer.update(*kv(5))
    buffer = layer._key_buffer
    assert layer.capacity == 16 and keys.shape == (2, 3, 5, 4)
    keys, values = layer.update(*kv(3, start=5))
    assert layer._key_buffer is buffer  # no reallocation, no concatenation
    assert keys.data_ptr() == buffer.data_ptr()  # a view of the filled prefix
    assert keys[0, 0, :, 0].tolist() == list(range(8)) and torch.equal(values, -keys)
    assert layer.get_seq_length() == 8 and layer.get_mask_sizes(2) == (10, 0)


def test_growth_keeps_the_filled_slots():
    layer = PreallocatedLayer(reserve=4)
    layer.update(*kv(4))
    layer.update(*kv(3, start=4))
    assert layer.capacity >= 7 and layer.keys[1, 2, :, 0].tolist() == list(range(7))


def test_crop_and_compaction_write_through_the_views():
    layer = PreallocatedLayer(reserve=32)
    layer.update(*kv(10))
    layer.keys[:, :, 4:6] = layer.keys.gather(2, torch.tensor([7, 9]).view(1, 1, 2, 1).expand(2, 3, 2, 4))
    layer.crop(-4)
    assert layer.get_seq_length() == 6 and layer.keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 7, 9]
    with pytest.raises(ValueError, match="negative"):
        layer.crop(2)


def test_batch_select_and_round_trip_through_a_dynamic_cache():
    prompt = DynamicCache()
    prompt.update(*kv(6), 0)
    prompt.update(*kv(6, start=100), 1)
    cache = PreallocatedCache.from_dynamic(prompt, reserve=20)
    assert cache.get_seq_length() == 6 and cache.layers[1].capacity == 20
    cache.update(*kv(2, start=6), 0)
    cache.update(*kv(2, start=106), 1)
    cache.batch_select_indices(torch.tensor([1]))
    out = cache.write_to(prompt)
    assert out is prompt and out.get_seq_length() == 8 and out.layers[0].keys.shape[0] == 1
    assert out.layers[1].keys[0, 0, :, 0].tolist() == list(range(100, 108))
    out.update(*kv(1, batch=1, start=8), 0)  # a plain DynamicCache again: plain decoding continues it
    assert out.get_seq_length() == 9


def test_the_loop_never_reallocates_the_target_cache():
    """No O(context) copy per round: every round's verification writes into the buffer reserved at prefill."""
    target = tiny_target("llama")
    ids = random_prompt(40, seed=3)
    expected = plain_greedy(target, ids, max_new_tokens=24)
    buffers = []

    class Spy(OracleDrafter):
        def draft(self, state, root_tokens, root_positions, target_state, tree_shape):
            buffers.append([layer._key_buffer.data_ptr() for layer in target_state.cache.layers])
            return super().draft(state, root_tokens, root_positions, target_state, tree_shape)

    oracle = Spy(target, expected, [4, 16, 16], corrupt_every=5)
    assert torch.equal(target.generate(ids, assistant_model=oracle, max_new_tokens=24), expected)
    assert len(buffers) == oracle.stats.rounds > 1 and all(b == buffers[0] for b in buffers)


@pytest.mark.parametrize("cached", [0, 25])
def test_returned_cache_is_what_plain_decoding_returns(cached):
    target = tiny_target("qwen2")
    ids = random_prompt(30, seed=4)

    def prompt_cache():
        cache = DynamicCache()
        if cached:
            with torch.no_grad():
                target(ids[:, :cached], use_cache=True, **{"past_key_values": cache})
        return cache

    plain_cache = prompt_cache()
    plain = target.generate(ids, do_sample=False, max_new_tokens=12, past_key_values=plain_cache,
                            return_dict_in_generate=True)
    oracle = OracleDrafter(target, plain.sequences, [1, 1, 1], corrupt_every=4)
    mine = prompt_cache()
    out = target.generate(ids, assistant_model=oracle, max_new_tokens=12, past_key_values=mine,
                          return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain.sequences)
    assert type(out.past_key_values) is DynamicCache and out.past_key_values is mine  # filled in place, as plain
    assert mine.get_seq_length() == plain_cache.get_seq_length() == out.sequences.shape[1] - 1
    for a, b in zip(mine.layers, plain_cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def random_tree(batch, shape, vocab, seed):
    g = torch.Generator().manual_seed(seed)

    def step(tokens, positions, bias):
        return torch.randn(*tokens.shape, vocab, generator=g) * 3

    return build_beam_tree(step, torch.randint(vocab, (batch,), generator=g), torch.zeros(batch, dtype=torch.long),
                           shape)


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 16, 16), (2, 3, 2), (3,)])
def test_vectorised_greedy_acceptance_is_the_walk(shape):
    """On trees whose nodes the target often agrees with, the device pass gives the walk's paths and tokens."""
    vocab, batch = 7, 3
    for seed in range(20):
        tree = random_tree(batch, shape, vocab, seed)
        g = torch.Generator().manual_seed(100 + seed)
        logits = torch.randn(batch, len(tree), vocab, generator=g)
        # Make the target agree with a random child of most nodes, so long paths are accepted.
        for b, row in enumerate(tree.parents.tolist()):
            for node, parent in enumerate(row):
                if parent >= 0 and torch.rand(1, generator=g) < 0.7:
                    logits[b, parent, tree.tokens[b, node]] = 10.0
        paths, tokens = accept_greedy(tree, logits)
        children = tree.children()
        for b in range(batch):
            walk = accept_path(children[b], tree.tokens[b].tolist(), logits[b], torch.zeros(1, 1, dtype=torch.long),
                               lambda ids, scores: scores, lambda scores: int(scores[0].argmax()))
            assert (paths[b], tokens[b]) == walk


def test_greedy_without_processors_uses_the_device_pass(monkeypatch):
    import longspec_hf.generation as generation

    walks = []
    monkeypatch.setattr(generation, "accept_path", lambda *a: walks.append(1) or accept_path(*a))
    target = tiny_target("llama")
    ids = random_prompt(20, seed=2)
    expected = plain_greedy(target, ids, max_new_tokens=10)
    oracle = OracleDrafter(target, expected, [2, 2])
    assert torch.equal(target.generate(ids, assistant_model=oracle, max_new_tokens=10), expected)
    assert not walks
    # A processor (here repetition_penalty) depends on the path, so the walk runs, on the nodes it reaches only.
    expected = plain_greedy(target, ids, max_new_tokens=10, repetition_penalty=1.3)
    oracle = OracleDrafter(target, expected, [2, 2])
    out = target.generate(ids, assistant_model=oracle, max_new_tokens=10, repetition_penalty=1.3)
    assert torch.equal(out, expected) and len(walks) == oracle.stats.rounds


def test_round_timings_are_opt_in():
    target = tiny_target("llama")
    ids = random_prompt(20, seed=2)
    expected = plain_greedy(target, ids, max_new_tokens=8)
    oracle = OracleDrafter(target, expected, [1, 1])
    target.generate(ids, assistant_model=oracle, max_new_tokens=8)
    assert oracle.stats.timings == {}
    oracle.generation_config.profile_rounds = True
    target.generate(ids, assistant_model=oracle, max_new_tokens=8)
    assert set(oracle.stats.timings) == {"draft", "verify", "accept", "commit"}
    assert all(t > 0 for t in oracle.stats.timings.values())


def test_host_stopping_decides_as_the_criteria_do():
    from transformers.generation.stopping_criteria import (
        EosTokenCriteria,
        MaxLengthCriteria,
        StoppingCriteriaList,
        StopStringCriteria,
    )

    from longspec_hf.generation import emit, host_stopping

    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length=12), EosTokenCriteria([5, 9])])
    host_stop = host_stopping(criteria)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        sequence = torch.randint(10, (1, int(torch.randint(3, 11, (1,), generator=g))), generator=g)
        tokens = torch.randint(12, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        on_device = emit(tokens, sequence, criteria, None)
        on_host = emit(tokens, sequence, criteria, None, host_stop)
        assert torch.equal(on_device[0], on_host[0]) and on_device[1:] == on_host[1:]
    assert host_stopping(StoppingCriteriaList([*criteria, StopStringCriteria.__new__(StopStringCriteria)])) is None


def test_verification_mask_covers_the_prefix_only_when_something_there_is_hidden():
    from longspec_hf.verify import TargetState, verification_mask

    tree = random_tree(2, (2, 3), 11, seed=0)
    slots = 300
    state = TargetState(cache=None, valid=None, slot_positions=torch.arange(slots)[None].expand(2, slots),
                        next_positions=torch.full((2,), slots))
    assert verification_mask(state, tree, torch.float32, None).shape == (2, 1, len(tree), len(tree))
    assert verification_mask(state, tree, torch.float32, 1000).shape == (2, 1, len(tree), len(tree))
    # A biting window reads only the last window - 1 slots: O(window) mask and keys, whatever the context.
    assert verification_mask(state, tree, torch.float32, 64).shape == (2, 1, len(tree), 63 + len(tree))
    state.valid = torch.ones(2, slots, dtype=torch.bool)
    state.valid[1, :5] = False  # left padding
    mask = verification_mask(state, tree, torch.float32, None)
    assert mask.shape == (2, 1, len(tree), slots + len(tree)) and bool((mask[1, 0, :, :5] < 0).all())
