"""Prompt-lookup branches (``prompt_lookup_num_tokens``): the index, the graft, and losslessness with them."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_LIKE, GPU_LIKE, OracleDrafter, plain_greedy, random_prompt, tiny_target
from test_sampling import (
    PROMPT,
    SAMPLES,
    chi_square_p_value,
    exact_last_two,
    fresh_draft,
    sample_last_two,
    small_vocab_target,
)

import longspec_hf.lookup as lookup_module
from longspec_hf import LongSpecDraftModel, build_beam_tree
from longspec_hf.lookup import NgramIndex, graft_chain, lookup_chains
from longspec_hf.verify import accept_greedy

# ------------------------------------------------------------------------------------------------------------ index


def test_index_finds_the_most_recent_earlier_occurrence_of_the_longest_ngram():
    index = NgramIndex([5, 6, 7, 1, 2, 8, 9, 5, 6, 3, 4, 5, 6], max_ngram=2)
    assert index.continuation(3) == [3, 4, 5]  # "5 6" last followed by 3 (not by 7, an older occurrence)
    index = NgramIndex([1, 2, 9, 7, 2, 4, 4, 7, 2], max_ngram=2)
    assert index.continuation(2) == [4, 4]  # "7 2" beats the more recent 1-gram "2" (followed by nothing known)
    index.extend([4, 4])
    assert index.continuation(2) == [7, 2]  # "4 4" was followed by 7


def test_index_repeats_the_period_it_found_and_reports_no_match():
    assert NgramIndex([1, 2, 3, 1, 2], max_ngram=3).continuation(5) == [3, 1, 2, 3, 1]
    assert NgramIndex([7, 7], max_ngram=2).continuation(3) == [7, 7, 7]
    assert NgramIndex([1, 2, 3, 4], max_ngram=2).continuation(3) is None
    assert NgramIndex([1], max_ngram=2).continuation(3) is None


def test_lookup_chains_skip_rounds_without_any_match():
    rows = [NgramIndex([1, 2, 3], 2), NgramIndex([4, 5, 4], 2)]
    assert torch.equal(lookup_chains(rows, 2, torch.device("cpu")), torch.tensor([[3, 3], [5, 4]]))
    assert lookup_chains(rows[:1], 2, torch.device("cpu")) is None
    assert lookup_chains(rows, 0, torch.device("cpu")) is None


# ------------------------------------------------------------------------------------------------------------ graft


def fixed_tree(shape, batch=2, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)

    def step(tokens, positions, bias):
        return torch.randn(*tokens.shape, vocab, generator=g)

    return build_beam_tree(step, torch.tensor([1] * batch), torch.tensor([10] * batch), shape)


def check_structure(tree):
    """Parents, depths and ancestors agree; every node's ancestors are its parent's plus itself."""
    for row in range(tree.tokens.shape[0]):
        for node in range(1, len(tree)):
            parent = int(tree.parents[row, node])
            assert 0 <= parent < node
            assert int(tree.depths[node]) == int(tree.depths[parent]) + 1
            expected = tree.ancestors[row, parent].clone()
            expected[node] = True
            assert torch.equal(tree.ancestors[row, node], expected)


def path_tokens(tree, row, node):
    tokens = []
    while node > 0:
        tokens.append(int(tree.tokens[row, node]))
        node = int(tree.parents[row, node])
    return tokens[::-1]


def test_graft_continues_the_drafts_matching_path_and_keeps_depths_shared():
    tree = fixed_tree([2, 2])
    # row 0: the chain starts with the draft's best path (2 levels), row 1 with tokens the draft never proposed
    row0 = path_tokens(tree, 0, 3)  # node 3: the first node of level 2
    chains = torch.tensor([row0 + [17, 18], [19, 19, 19, 19]])
    grafted = graft_chain(tree, chains)
    check_structure(grafted)
    size = len(tree)
    assert len(grafted) == size + 4
    assert grafted.depths[size:].tolist() == [1, 2, 3, 4]
    assert torch.equal(grafted.tokens[:, :size], tree.tokens)
    assert int(grafted.parents[0, size + 2]) == 3  # the live chain hangs under the draft's node
    assert path_tokens(grafted, 0, size + 3) == chains[0].tolist()
    assert int(grafted.parents[1, size]) == 0  # no match: a branch from the root
    assert path_tokens(grafted, 1, size + 3) == chains[1].tolist()


def test_greedy_acceptance_takes_the_longer_of_draft_and_lookup():
    tree = fixed_tree([1, 1], batch=1)
    draft_path = path_tokens(tree, 0, 2)
    second = (draft_path[1] + 1) % 20
    chains = torch.tensor([[draft_path[0], second, 12]])  # agrees with the draft's first token, then differs
    grafted = graft_chain(tree, chains)
    check_structure(grafted)
    truth = [draft_path[0], second, 12, 3]  # what the target writes after the root
    logits = torch.zeros(1, len(grafted), 20)
    for node in range(len(grafted)):
        path = path_tokens(grafted, 0, node)
        logits[0, node, truth[len(path)] if path == truth[: len(path)] else 4] = 5.0
    paths, tokens = accept_greedy(grafted, logits)
    assert tokens[0] == truth
    assert paths[0][0] == 1  # the shared first token is the draft's node, the rest is the lookup branch
    assert all(node >= len(tree) for node in paths[0][1:])


# ------------------------------------------------------------------------------------------------------ end to end


def cycling_prompt(target, length=40, seed=7):
    """A prompt followed by the target's own greedy output, which on these tiny models soon repeats itself: the
    lookup branch then has something to find."""
    ids = random_prompt(length, seed=seed)
    return plain_greedy(target, ids, attention_mask=torch.ones_like(ids), max_new_tokens=60)


def generate_with_lookup(target, ids, tree, lookup=6, new_tokens=40):
    ones = torch.ones_like(ids)  # the text may hold the pad id: every token is real
    torch.manual_seed(1)
    draft = LongSpecDraftModel.from_target(target, sink_size=4, window_size=16)
    draft.generation_config.tree_shape = tree
    out = target.generate(ids, attention_mask=ones, assistant_model=draft, do_sample=False,
                          max_new_tokens=new_tokens, prompt_lookup_num_tokens=lookup)
    return out, plain_greedy(target, ids, attention_mask=ones, max_new_tokens=new_tokens), draft.stats


@pytest.mark.parametrize("tree", [[1, 1], [4, 16, 16], "auto"])
def test_lookup_branches_are_lossless(family, tree, device_costs, monkeypatch):
    device_costs(**GPU_LIKE)
    grafts = []
    monkeypatch.setattr(lookup_module, "graft_chain",
                        lambda tree, chains: grafts.append(1) or graft_chain(tree, chains))
    target = tiny_target(family)
    out, expected, stats = generate_with_lookup(target, cycling_prompt(target), tree)
    assert torch.equal(out, expected)
    assert len(grafts) > stats.rounds // 2  # the branch was there in most rounds (1-gram matches are common)


@pytest.mark.parametrize("tree", [[1, 1], [4, 16, 16]])
def test_lookup_branches_are_accepted_when_the_text_repeats(tree):
    target = tiny_target("gemma")  # its greedy output soon cycles: a useless draft, a useful lookup
    out, expected, stats = generate_with_lookup(target, cycling_prompt(target), tree)
    assert torch.equal(out, expected)
    assert stats.lookup_accepted_tokens > 10  # beyond the draft's depth: only the 6-token branch reaches there
    assert stats.tau > 3


def test_lookup_in_the_drafts_generation_config_with_padded_batches():
    target = tiny_target("gemma")
    rows = [cycling_prompt(target, length=30, seed=s)[0] for s in (3, 4)]
    rows[1] = rows[1][7:]
    width = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()
    expected = plain_greedy(target, ids, attention_mask=mask, max_new_tokens=30)
    oracle = OracleDrafter(target, [r for r in expected], [1, 1], corrupt_every=4)  # a draft right 3 times in 4
    oracle.generation_config.prompt_lookup_num_tokens = 5
    oracle.generation_config.max_matching_ngram_size = 3
    out = target.generate(ids, attention_mask=mask, assistant_model=oracle, do_sample=False, max_new_tokens=30)
    assert torch.equal(out, expected)
    assert oracle.stats.lookup_accepted_tokens > 0


def test_sampling_with_lookup_branches_matches_the_target_distribution(family):
    target = small_vocab_target(family)  # 8 tokens: the lookup finds a match almost every round
    draft = fresh_draft(target, [1, 1])
    draft.generation_config.prompt_lookup_num_tokens = 3
    samples, accepted = sample_last_two(target, draft, 1.0)
    assert accepted > SAMPLES // 20
    assert chi_square_p_value(samples, exact_last_two(target, PROMPT, 1.0)) > 1e-3


@pytest.mark.parametrize("value", [-1, 2.5, "4", True])
def test_bad_lookup_settings_name_the_fix(value):
    target = tiny_target("llama")
    draft = LongSpecDraftModel.from_target(target, sink_size=4, window_size=16)
    draft.generation_config.prompt_lookup_num_tokens = value
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be"):
        target.generate(random_prompt(8), assistant_model=draft, max_new_tokens=4)
    draft.generation_config.prompt_lookup_num_tokens = 4
    draft.generation_config.max_matching_ngram_size = 0
    with pytest.raises(ValueError, match="max_matching_ngram_size must be a positive int"):
        target.generate(random_prompt(8), assistant_model=draft, max_new_tokens=4)


@pytest.mark.parametrize("kind", ["self", "specpv"])
def test_lookup_branches_with_self_draft_and_specpv_are_lossless(family, kind):
    from test_specpv import COVERING, make_drafter

    target = tiny_target(family)
    draft = make_drafter("self" if kind == "self" else "longspec", target)
    if kind == "specpv":
        draft.generation_config.specpv = COVERING  # a budget covering the context: exact
    draft.generation_config.prompt_lookup_num_tokens = 5
    ids = cycling_prompt(target, length=150, seed=2)
    ones = torch.ones_like(ids)
    out = target.generate(ids, attention_mask=ones, assistant_model=draft, do_sample=False, max_new_tokens=40)
    assert torch.equal(out, plain_greedy(target, ids, attention_mask=ones, max_new_tokens=40))


@pytest.mark.parametrize("costs", ["cpu", "gpu"])
def test_auto_verifies_the_lookup_branch_where_it_pays(costs, device_costs):
    device_costs(**(CPU_LIKE if costs == "cpu" else GPU_LIKE))
    target = tiny_target("llama")  # its text does not repeat: the branch is rarely right
    out, expected, stats = generate_with_lookup(target, cycling_prompt(target), "auto", new_tokens=60)
    assert torch.equal(out, expected)
    if costs == "gpu":  # nodes are nearly free: always worth verifying
        assert stats.lookup_rounds >= stats.rounds * 0.75
    else:  # each node costs half a step: after the first tries, only the exploration rounds
        assert stats.lookup_rounds <= stats.rounds * 0.5


def test_the_lookup_rule_weighs_its_tokens_against_the_seconds_its_nodes_add():
    from conftest import FrozenCost

    from longspec_hf.acceptance import AcceptanceModel
    from longspec_hf.auto_tree import AutoTree

    auto = AutoTree(FrozenCost(**CPU_LIKE), AcceptanceModel(), torch.device("cpu"))
    auto.lookup_gain = 2.0  # tokens per round; a round of one node makes 1 token per step
    assert auto.begin_round(1000, 1, 8, lookup_nodes=2).lookup  # 2 nodes add one step: 2 tokens pay for it
    assert not auto.begin_round(1000, 1, 8, lookup_nodes=6).lookup  # 6 nodes add three steps
    assert auto.nodes == 1
    auto.rounds_without_lookup = 3  # but it is tried every few rounds, to keep its estimate current
    assert auto.begin_round(1000, 1, 8, lookup_nodes=6).lookup and auto.nodes == 7


def test_the_benchs_calibration_line_leaves_the_lookup_branchs_tokens_out(device_costs):
    """`longspec bench` sets the acceptance model's prediction (the draft's trees) beside the tokens accepted from the
    draft's trees, not beside every accepted token: the lookup branch's, which the model never predicts, stay out."""
    from longspec_hf.bench.methods import speculative
    from longspec_hf.bench.runner import prefill

    device_costs(**GPU_LIKE)  # the branch is verified in every round
    target = tiny_target("gemma")  # its text cycles: the branch accepts many tokens
    ids = cycling_prompt(target)
    torch.manual_seed(1)
    draft = LongSpecDraftModel.from_target(target, sink_size=4, window_size=16)
    used = set(ids[0].tolist())
    draft.set_draft_vocabulary([t for t in range(target.config.vocab_size) if t not in used][:8])  # drafts miss
    cache, _ = prefill(target, ids)
    output = speculative(draft, "auto", "longspec", lookup=6).generate(target, ids, cache, 40)
    stats = draft.stats
    assert stats.lookup_accepted_tokens > 10
    _, accepted = output.predicted_accepted
    assert accepted == stats.accepted_tokens - stats.lookup_accepted_tokens
    assert accepted <= 2  # a draft that can only propose tokens absent from the text is rarely right
