"""Hypothesis fuzzing of losslessness over family, tree shape, prompt length, sink/window sizes and seed."""

from __future__ import annotations

import torch
from conftest import FAMILIES, OracleDrafter, plain_greedy, random_prompt, tiny_target
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longspec_hf import LongSpecDraftModel

tree_shapes = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    tree_shape=tree_shapes,
    prompt_len=st.integers(min_value=1, max_value=160),
    sink=st.integers(min_value=0, max_value=8),
    window=st.integers(min_value=1, max_value=64),
    max_new_tokens=st.integers(min_value=1, max_value=24),
    seed=st.integers(min_value=0, max_value=2**16),
    oracle=st.booleans(),
)
def test_fuzz_lossless(family, tree_shape, prompt_len, sink, window, max_new_tokens, seed, oracle):
    target = tiny_target(family)
    ids = random_prompt(prompt_len, seed=seed)
    expected = plain_greedy(target, ids, max_new_tokens=max_new_tokens)
    if oracle:
        draft = OracleDrafter(target, expected, tree_shape, corrupt_every=seed % 7, seed=seed)
    else:
        torch.manual_seed(seed)
        draft = LongSpecDraftModel.from_target(target, sink_size=sink, window_size=window)
        draft.generation_config.tree_shape = tree_shape
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=max_new_tokens)
    assert torch.equal(out, expected)
