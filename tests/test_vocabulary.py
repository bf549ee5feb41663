"""A frequency-ranked draft vocabulary: the draft scores a subset of tokens, the output stays the target's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, plain_greedy, random_prompt, tiny_target
from test_sampling import PROMPT, SAMPLES, chi_square_p_value, exact_last_two, sample_last_two, small_vocab_target
from transformers import DynamicCache

from longspec_hf import LongSpecDraftModel
from longspec_hf.compat import cache_kwarg
from longspec_hf.vocabulary import count_target_outputs, ranked_vocabulary

SHAPES = {"chain": [1, 1, 1], "tree": [2, 3, 2], "auto": "auto"}


def subset_draft(target, ids, tree_shape="auto", seed=1):
    torch.manual_seed(seed)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    draft.generation_config.tree_shape = tree_shape
    draft.set_draft_vocabulary(ids)
    return draft


def target_ranking(target, size):
    counts = count_target_outputs(target, torch.cat([random_prompt(64, seed=s) for s in range(4)]))
    return ranked_vocabulary(counts, size)


def test_ranking_is_by_count_with_ties_by_id_and_forced_ids_first():
    counts = torch.tensor([5, 0, 7, 5, 1, 9])
    assert ranked_vocabulary(counts, 6).tolist() == [5, 2, 0, 3, 4, 1]
    assert ranked_vocabulary(counts, 3, always=[1]).tolist() == [1, 5, 2]
    assert ranked_vocabulary(counts, 4).tolist()[:2] == ranked_vocabulary(counts, 2).tolist()  # prefixes nest
    with pytest.raises(ValueError, match="between 1 and 6"):
        ranked_vocabulary(counts, 0)


def test_counts_are_the_targets_greedy_predictions():
    target = tiny_target("llama")
    ids = random_prompt(40)
    counts = count_target_outputs(target, ids)
    expected = torch.bincount(target(ids).logits.argmax(-1).flatten(), minlength=counts.numel())
    assert torch.equal(counts, expected) and counts.sum() == 40


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_output_is_unchanged_with_a_draft_vocabulary(family, shape):
    target = tiny_target(family)
    draft = subset_draft(target, target_ranking(target, VOCAB // 3), SHAPES[shape])
    prompt = torch.cat([random_prompt(70, seed=3), random_prompt(70, seed=4)])
    mask = torch.ones_like(prompt)
    mask[1, :9] = 0  # left padding in row 1
    expected = plain_greedy(target, prompt, attention_mask=mask, max_new_tokens=24)
    out = target.generate(prompt, attention_mask=mask, assistant_model=draft, do_sample=False, max_new_tokens=24)
    assert torch.equal(out, expected)


def test_drafted_tokens_stay_in_the_vocabulary_and_logits_match_the_whole_head():
    target = tiny_target("llama")
    ids = target_ranking(target, 20)
    draft = subset_draft(target, ids, [3, 4, 4])
    state = draft.start(random_prompt(30), None, None)
    cache = DynamicCache()
    target(random_prompt(30)[:, :-1], **{cache_kwarg(target): cache}, use_cache=True)
    # What draft() reads of the target's state: its cache, and no masked keys (no padding).
    target_state = SimpleNamespace(cache=cache, key_bias=lambda dtype: None)
    tree = draft.draft(state, random_prompt(30)[:, -1], torch.tensor([29]), target_state, (3, 4, 4))
    assert set(tree.tokens[0, 1:].tolist()) <= set(ids.tolist())

    key, value = cache.layers[-1].keys, cache.layers[-1].values
    tokens, positions = random_prompt(5), torch.arange(30, 35)[None]
    subset = draft(tokens, positions, key, value, vocab_subset=True)  # [1, 5, 20]
    full = draft(tokens, positions, key, value)  # [1, 5, V]
    draft.set_draft_vocabulary(None)
    whole = draft(tokens, positions, key, value)
    torch.testing.assert_close(subset, whole[..., ids])
    torch.testing.assert_close(full[..., ids], subset)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert (full[..., outside] == torch.finfo(full.dtype).min).all()


def test_sampling_with_a_draft_vocabulary_matches_the_target_distribution():
    target = small_vocab_target("llama")
    draft = subset_draft(target, [2, 5, 7], [2, 2, 2])  # 3 of 8 tokens: most target tokens cannot be drafted
    samples, accepted = sample_last_two(target, draft, 1.0)
    assert accepted > SAMPLES // 20
    assert chi_square_p_value(samples, exact_last_two(target, PROMPT, 1.0)) > 1e-3


def test_the_vocabulary_is_saved_loaded_and_shown(tmp_path):
    target = tiny_target("llama")
    ids = target_ranking(target, 32)
    draft = subset_draft(target, ids, [1, 1, 1])
    draft.save_pretrained(tmp_path)
    loaded = LongSpecDraftModel.from_pretrained(tmp_path)
    assert loaded.config.draft_vocab_size == 32 and torch.equal(loaded.draft_vocab, ids)
    assert "draft vocabulary" in (tmp_path / "README.md").read_text()
    prompt = random_prompt(50, seed=5)
    out = target.generate(prompt, assistant_model=loaded, do_sample=False, max_new_tokens=16)
    assert torch.equal(out, plain_greedy(target, prompt, max_new_tokens=16))


@pytest.mark.parametrize("ids, match", [([1, 1, 2], "duplicates"), ([0, VOCAB], r"lie in \[0"), ([], "non-empty"),
                                        ([[1, 2]], "1-D")])
def test_a_bad_vocabulary_is_refused_with_the_reason(ids, match):
    draft = LongSpecDraftModel.from_target(tiny_target("llama"))
    with pytest.raises(ValueError, match=match):
        draft.set_draft_vocabulary(torch.tensor(ids, dtype=torch.long))
