"""Sampling with a draft draws from exactly the target's distribution (goodness-of-fit test on a tiny vocabulary)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from longspec_hf import LongSpecDraftModel

SIGNIFICANCE = 1e-3  # reject "same distribution" only below this p-value
VOCAB = 8
SAMPLES = 1200


@pytest.fixture(scope="module")
def small_vocab_target():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(pad_token_id=0)
    return model


@torch.no_grad()
def exact_distribution_of_tokens_2_and_3(target, prompt, temperature):
    """P(x2, x3 | prompt) = sum over x1 of P(x1) P(x2 | x1) P(x3 | x1, x2), from the target's logits: `[V, V]`.

    Tokens 2 and 3 are the ones a draft can influence: token 1 always comes from the prefill.
    """
    def next_probs(prefixes):  # [N, L] -> [N, V]
        return torch.softmax(target(prefixes).logits[:, -1] / temperature, -1)

    vocab = torch.arange(VOCAB)
    p1 = next_probs(prompt)[0]  # [V]
    with_x1 = torch.cat([prompt.expand(VOCAB, -1), vocab[:, None]], dim=1)  # [V, L+1]
    p2 = next_probs(with_x1)  # [V(x1), V(x2)]
    with_x2 = torch.cat([with_x1.repeat_interleave(VOCAB, 0), vocab.repeat(VOCAB)[:, None]], dim=1)
    p3 = next_probs(with_x2).view(VOCAB, VOCAB, VOCAB)  # [x1, x2, x3]
    return (p1[:, None, None] * p2[:, :, None] * p3).sum(0)  # [x2, x3]


def chi_square_p_value(samples: list[tuple[int, int]], probs: torch.Tensor) -> float:
    """Pearson goodness-of-fit over the V*V cells; cells expected below 5 are pooled into one."""
    counts = Counter(samples)
    n = len(samples)
    expected = probs.flatten().double() * n
    observed = torch.tensor([counts.get((i // VOCAB, i % VOCAB), 0) for i in range(VOCAB * VOCAB)], dtype=torch.double)
    small = expected < 5
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


@pytest.mark.parametrize("tree_shape", [[1, 1], [4, 8]])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_follow_the_target_distribution(small_vocab_target, tree_shape, temperature):
    target = small_vocab_target
    prompt = torch.tensor([[3, 1, 4, 1, 5, 2]])
    probs = exact_distribution_of_tokens_2_and_3(target, prompt, temperature)
    torch.manual_seed(1)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    draft.generation_config.tree_shape = tree_shape
    torch.manual_seed(2)
    samples, accepted = [], 0
    for _ in range(SAMPLES):
        out = target.generate(prompt, assistant_model=draft, do_sample=True, temperature=temperature, top_k=None,
                              max_new_tokens=3)
        samples.append(tuple(out[0, -2:].tolist()))
        accepted += draft.stats.accepted_tokens
    assert accepted > SAMPLES // 20  # the draft's proposals were really accepted, not just bonus tokens
    assert chi_square_p_value(samples, probs) > SIGNIFICANCE


def test_the_check_has_teeth(small_vocab_target):
    """Samples from a biased rule (always the most likely token) are rejected by the same test."""
    prompt = torch.tensor([[3, 1, 4, 1, 5, 2]])
    probs = exact_distribution_of_tokens_2_and_3(small_vocab_target, prompt, 1.0)
    torch.manual_seed(3)
    flat = probs.flatten()
    # Bias: sample, but replace 20% of the draws by the single most likely pair.
    draws = torch.multinomial(flat, SAMPLES, replacement=True)
    draws[torch.rand(SAMPLES) < 0.2] = int(flat.argmax())
    samples = [(int(i) // VOCAB, int(i) % VOCAB) for i in draws]
    assert chi_square_p_value(samples, probs) < SIGNIFICANCE


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
@pytest.mark.parametrize("tree_shape", [[1, 1, 1, 1], [4, 16, 16]])
def test_seeded_sampling_reproduces_plain_sampling(family_name, tree_shape):
    """One draw from the target's processed distribution per emitted token, as in plain sampling: with the same seed
    the tokens are identical, however many of them the draft got accepted."""
    from conftest import OracleDrafter, random_prompt, tiny_target

    target = tiny_target(family_name)
    ids = random_prompt(40, seed=6)
    kwargs = {"do_sample": True, "max_new_tokens": 30, "temperature": 0.8, "top_p": 0.9, "top_k": 20}
    torch.manual_seed(7)
    expected = target.generate(ids, **kwargs)
    oracle = OracleDrafter(target, expected, tree_shape)
    torch.manual_seed(7)
    out = target.generate(ids, assistant_model=oracle, **kwargs)
    assert torch.equal(out, expected)
    assert oracle.stats.tau > 2
