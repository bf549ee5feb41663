"""Sampling with a draft draws from exactly the target's distribution.

Goodness-of-fit: on tiny models with an 8-token vocabulary, the empirical joint distribution of generated tokens 3
and 4 — the ones the tree decides (token 1 comes from the prefill, tokens 2-4 from tree nodes up to depth 2, or
bonus tokens) — is compared with the exact distribution computed from the target's own logits, with Pearson's
chi-square test at significance ``SIGNIFICANCE``: a correct rule fails by chance once in a thousand runs, and the
seeds are fixed, so the test is deterministic. The same check rejects a deliberately biased rule (SpecInfer's ratio
test applied to deterministic top-k children, as in the official LongSpec code), so it has teeth.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from conftest import FAMILIES, GPU_LIKE, OracleDrafter, random_prompt, tiny_target
from transformers import GenerationConfig

import longspec_hf.generation as generation
from longspec_hf import LongSpecDraftModel

SIGNIFICANCE = 1e-3  # reject "same distribution" only below this p-value
VOCAB = 8
SAMPLES = 500
NEW_TOKENS = 4
PROMPT = torch.tensor([[3, 1, 4, 1, 5, 2]])
MODES = {"chain": [1, 1, 1], "beam": [4, 16, 16, 16, 16], "narrow": [2, 2, 2]}


@functools.cache
def small_vocab_target(family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.3,
                        pad_token_id=0, bos_token_id=None, eos_token_id=None, **extra)
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(pad_token_id=0)
    return model


@torch.no_grad()
def exact_last_two(target, prompt, temperature, new_tokens=NEW_TOKENS):
    """P(x_{k-1}, x_k | prompt) for k = `new_tokens`, by the chain rule over all V^k continuations: `[V, V]`."""
    probs = torch.ones(1)
    prefixes = prompt
    for _ in range(new_tokens):
        step = torch.softmax(target(prefixes).logits[:, -1] / temperature, -1)  # [N, V]
        probs = (probs[:, None] * step).flatten()
        prefixes = torch.cat([prefixes.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(len(step))[:, None]],
                             dim=1)
    return probs.view(-1, VOCAB, VOCAB).sum(0)


def chi_square_p_value(samples: list[tuple[int, int]], probs: torch.Tensor) -> float:
    """Pearson goodness-of-fit over the V*V cells; cells expected below 5 are pooled into one."""
    counts = Counter(samples)
    n = len(samples)
    expected = probs.flatten().double() * n
    observed = torch.tensor([counts.get(divmod(i, VOCAB), 0) for i in range(VOCAB * VOCAB)], dtype=torch.double)
    small = expected < 5
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


def sample_last_two(target, draft, temperature, seed=2):
    torch.manual_seed(seed)
    samples, accepted = [], 0
    for _ in range(SAMPLES):
        out = target.generate(PROMPT, assistant_model=draft, do_sample=True, temperature=temperature, top_k=None,
                              max_new_tokens=NEW_TOKENS)
        samples.append(tuple(out[0, -2:].tolist()))
        accepted += draft.stats.accepted_tokens
    return samples, accepted


def fresh_draft(target, tree_shape):
    torch.manual_seed(1)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    draft.generation_config.tree_shape = tree_shape
    return draft


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sampling_matches_the_target_distribution(family, mode):
    target = small_vocab_target(family)
    samples, accepted = sample_last_two(target, fresh_draft(target, MODES[mode]), 1.0)
    assert accepted > SAMPLES // 20  # draft tokens were really accepted, not only bonus tokens
    assert chi_square_p_value(samples, exact_last_two(target, PROMPT, 1.0)) > SIGNIFICANCE


def test_sampling_with_auto_trees_matches_the_target_distribution(family, device_costs):
    device_costs(**GPU_LIKE)  # verification about as cheap as a step: "auto" drafts wide, deep trees
    target = small_vocab_target(family)
    samples, accepted = sample_last_two(target, fresh_draft(target, "auto"), 1.0)
    assert accepted > SAMPLES // 20
    assert chi_square_p_value(samples, exact_last_two(target, PROMPT, 1.0)) > SIGNIFICANCE


def test_sampling_with_temperature_and_top_p():
    target = small_vocab_target("llama")
    draft = fresh_draft(target, MODES["beam"])
    torch.manual_seed(4)
    samples = []
    for _ in range(SAMPLES):
        out = target.generate(PROMPT, assistant_model=draft, do_sample=True, temperature=0.7, top_k=None,
                              max_new_tokens=2)
        samples.append(tuple(out[0, -2:].tolist()))
    assert chi_square_p_value(samples, exact_last_two(target, PROMPT, 0.7, new_tokens=2)) > SIGNIFICANCE


def biased_ratio_test_accept(stash):
    """SpecInfer's accept/reject test applied to deterministic top-k children: not lossless."""

    def accept(children, node_tokens, logits, sequence, logits_processor, select):
        tree = stash["tree"]
        path, tokens, node = [], [], 0
        while True:
            p = torch.softmax(logits_processor(sequence, logits[node : node + 1])[0], -1)
            chosen = None
            for child in children[node]:
                token = node_tokens[child]
                q = float(tree.logprobs[0, child].exp())
                if float(torch.rand(())) < min(1.0, float(p[token]) / q):
                    chosen = child
                    break
                p[token] = max(float(p[token]) - q, 0.0)  # residual for the next candidate
                p = p / p.sum()
            if chosen is None:
                tokens.append(int(torch.multinomial(p, 1)))
                return path, tokens
            path.append(chosen)
            tokens.append(node_tokens[chosen])
            node = chosen
            sequence = torch.cat([sequence, sequence.new_tensor([[tokens[-1]]])], dim=-1)

    return accept


def test_the_check_rejects_a_biased_rule(monkeypatch):
    target = small_vocab_target("llama")
    stash = {}
    real_verify = generation.verify_tree

    def remember_tree(target, state, tree, backend):
        stash["tree"] = tree
        return real_verify(target, state, tree, backend)

    monkeypatch.setattr(generation, "verify_tree", remember_tree)
    monkeypatch.setattr(generation, "accept_path", biased_ratio_test_accept(stash))
    samples, accepted = sample_last_two(target, fresh_draft(target, MODES["beam"]), 1.0)
    assert accepted > SAMPLES // 20
    assert chi_square_p_value(samples, exact_last_two(target, PROMPT, 1.0)) < SIGNIFICANCE


def test_batched_rows_are_independent_samples():
    """Two copies of the same prompt in one batch: the joint of their 4th tokens is the product of marginals."""
    target = small_vocab_target("qwen3")
    draft = fresh_draft(target, MODES["beam"])
    marginal = exact_last_two(target, PROMPT, 1.0).sum(0)  # P(x4)
    torch.manual_seed(5)
    samples = []
    for _ in range(SAMPLES // 2):
        out = target.generate(PROMPT.expand(2, -1), assistant_model=draft, do_sample=True, top_k=None,
                              max_new_tokens=NEW_TOKENS)
        samples.append((int(out[0, -1]), int(out[1, -1])))
    assert chi_square_p_value(samples, marginal[:, None] * marginal[None, :]) > SIGNIFICANCE


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
@pytest.mark.parametrize("tree_shape", [[1, 1, 1, 1], [4, 16, 16]])
def test_seeded_sampling_reproduces_plain_sampling(family_name, tree_shape):
    """One draw from the target's processed distribution per emitted token, as in plain sampling: with the same seed
    the tokens are identical, however many of them the draft got accepted."""
    target = tiny_target(family_name)
    ids = random_prompt(40, seed=6)
    kwargs = {"do_sample": True, "max_new_tokens": 30, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
              "repetition_penalty": 1.1, "min_p": 0.02}
    torch.manual_seed(7)
    expected = target.generate(ids, **kwargs)
    oracle = OracleDrafter(target, expected, tree_shape)
    torch.manual_seed(7)
    out = target.generate(ids, assistant_model=oracle, **kwargs)
    assert torch.equal(out, expected)
    assert oracle.stats.tau > 2


def test_seeded_runs_are_reproducible():
    target = tiny_target("gemma")
    draft = fresh_draft(target, [2, 2])
    ids = random_prompt(15, seed=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(target.generate(ids, assistant_model=draft, do_sample=True, max_new_tokens=12))
    assert torch.equal(*runs)


def test_user_logits_processor_is_applied():
    from transformers import LogitsProcessor, LogitsProcessorList

    class BanToken(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, 5] = -float("inf")
            return scores

    target = small_vocab_target("mistral")
    draft = fresh_draft(target, MODES["beam"])
    torch.manual_seed(3)
    for _ in range(20):
        out = target.generate(PROMPT, assistant_model=draft, do_sample=True, max_new_tokens=6,
                              logits_processor=LogitsProcessorList([BanToken()]))
        assert 5 not in out[0, PROMPT.shape[1]:].tolist()

