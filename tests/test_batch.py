"""Batches: left padding, per-row acceptance, finished rows dropped, num_return_sequences."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, OracleDrafter, plain_greedy, random_prompt, tiny_target

from longspec_hf import LongSpecDraftModel

PAD = 0


def left_padded(prompts: list[torch.LongTensor], extra: int = 0) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Prompts `[1, n_i]` left-padded to the longest (plus `extra` padding on every row): `(ids, mask)` `[B, L]`."""
    length = max(p.shape[1] for p in prompts) + extra
    ids = torch.full((len(prompts), length), PAD)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, length - p.shape[1]:] = p[0]
        mask[row, length - p.shape[1]:] = 1
    return ids, mask


def strip(row: torch.LongTensor, prompt_pad: int) -> torch.LongTensor:
    """Drop the left padding and the right padding of a finished row."""
    row = row[prompt_pad:]
    while row.numel() and row[-1] == PAD:
        row = row[:-1]
    return row


def make_draft(target, tree, seed=1):
    torch.manual_seed(seed)
    draft = LongSpecDraftModel.from_target(target, sink_size=4, window_size=16)
    draft.generation_config.tree_shape = tree
    return draft


@pytest.mark.parametrize("tree", [[1, 1, 1], [4, 16, 16, 16, 16]])
@pytest.mark.parametrize("oracle", [False, True])
def test_padded_batch_matches_each_row_alone(family, tree, oracle):
    target = tiny_target(family)
    prompts = [random_prompt(n, seed=n) for n in (5, 90, 33)]
    alone = [plain_greedy(target, p, max_new_tokens=20) for p in prompts]
    ids, mask = left_padded(prompts)
    draft = OracleDrafter(target, alone, tree, corrupt_every=4) if oracle else make_draft(target, tree)
    out = target.generate(ids, attention_mask=mask, assistant_model=draft, do_sample=False, max_new_tokens=20)
    assert out.shape == (3, ids.shape[1] + 20)
    for row, (p, expected) in enumerate(zip(prompts, alone, strict=True)):
        assert torch.equal(out[row, ids.shape[1] - p.shape[1]:], expected[0])
    if oracle:
        assert len(set(draft.stats.acceptance_lengths)) > 1  # rows really advanced by different amounts


def test_rows_finish_at_different_times_and_stop_costing_compute(monkeypatch):
    import longspec_hf.generation as generation

    target = tiny_target("qwen2")
    prompts = [random_prompt(n, seed=n + 100) for n in (12, 30, 21)]
    reference = plain_greedy(target, prompts[1], max_new_tokens=24)[0, 30:].tolist()
    eos = reference[4]  # row 1 stops early; other rows stop wherever this token shows up, or at the limit
    alone = [plain_greedy(target, p, max_new_tokens=24, eos_token_id=eos, pad_token_id=PAD) for p in prompts]
    batch_sizes = []
    real_verify = generation.verify_tree

    def spy(target, state, tree, backend):
        batch_sizes.append(tree.tokens.shape[0])
        return real_verify(target, state, tree, backend)

    monkeypatch.setattr(generation, "verify_tree", spy)
    ids, mask = left_padded(prompts)
    full = [plain_greedy(target, p, max_new_tokens=24) for p in prompts]
    oracle = OracleDrafter(target, full, [1, 1, 1])
    out = target.generate(ids, attention_mask=mask, assistant_model=oracle, do_sample=False, max_new_tokens=24,
                          eos_token_id=eos, pad_token_id=PAD)
    for row, (p, expected) in enumerate(zip(prompts, alone, strict=True)):
        assert torch.equal(strip(out[row], ids.shape[1] - p.shape[1]), strip(expected[0], 0))
    assert batch_sizes[0] == 3 and batch_sizes[-1] < 3  # the finished row left the batch


def test_num_return_sequences_when_sampling():
    # (greedy with num_return_sequences > 1 is refused by transformers itself, with or without a draft)
    target = tiny_target("llama")
    ids = random_prompt(20, seed=9)
    draft = make_draft(target, [2, 4])
    torch.manual_seed(0)
    sampled = target.generate(ids, assistant_model=draft, do_sample=True, max_new_tokens=10, num_return_sequences=4)
    assert sampled.shape == (4, 30)
    assert len({tuple(row.tolist()) for row in sampled}) > 1  # rows are sampled independently


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_batched_sliding_window_and_long_prompts(family_name):
    target = tiny_target(family_name)
    prompts = [random_prompt(n, seed=3 * n) for n in (70, 130)]
    alone = [plain_greedy(target, p, max_new_tokens=16) for p in prompts]
    ids, mask = left_padded(prompts)
    oracle = OracleDrafter(target, alone, [2, 3, 3])
    out = target.generate(ids, attention_mask=mask, assistant_model=oracle, do_sample=False, max_new_tokens=16)
    for row, (p, expected) in enumerate(zip(prompts, alone, strict=True)):
        assert torch.equal(out[row, ids.shape[1] - p.shape[1]:], expected[0])
