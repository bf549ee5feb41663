"""Tiny random targets of several families, built from configs (nothing is downloaded), and an oracle drafter."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GenerationConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from longspec_hf import Drafter, DraftState, build_beam_tree
from longspec_hf.cost_model import CostModel


@pytest.fixture(autouse=True, scope="session")
def private_cost_cache(tmp_path_factory):
    """tree_shape="auto" keeps its device measurements under the user's cache folder: the tests use their own."""
    folder = tmp_path_factory.mktemp("longspec_hf_cache")
    saved = os.environ.get("LONGSPEC_HF_CACHE")
    os.environ["LONGSPEC_HF_CACHE"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("LONGSPEC_HF_CACHE", None)
    else:
        os.environ["LONGSPEC_HF_CACHE"] = saved

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    # A wide init spreads the logits, so fp32 reorderings of the same sums never flip a greedy argmax.
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=0,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    # A window smaller than the long prompts, so the sliding-window path of verification is exercised.
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 48}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"hidden_activation": "gelu_pytorch_tanh"}),
}


# Families with the attention inputs a Llama does not pass, for the fuzz (the fixture-wide FAMILIES stay the five above,
# which keeps every parametrised test's count): Gemma 2's logit soft-capping (a cap that changes the greedy tokens; an
# untied head, since Gemma's scaled embeddings through a tied head make a tiny model repeat one token) and gpt-oss's
# attention sinks, each with sliding and global layers mixed.
MIXED_LAYERS = {"sliding_window": 48, "layer_types": ["sliding_attention", "full_attention"]}
FUZZ_FAMILIES = {
    **FAMILIES,
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {**MIXED_LAYERS, "attn_logit_softcapping": 1.0,
                                                 "query_pre_attn_scalar": 1, "tie_word_embeddings": False,
                                                 "hidden_activation": "gelu_pytorch_tanh"}),
    "gpt_oss": (GptOssConfig, GptOssForCausalLM, {**MIXED_LAYERS, "num_local_experts": 4, "num_experts_per_tok": 2}),
}


@functools.cache
def tiny_target(family: str, seed: int = 0):
    config_cls, model_cls, extra = FUZZ_FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra})
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, pad_token_id=0, eos_token_id=None)
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary ("w0" ... "w94"), built offline.

    Id 95 is "abcdef": transformers' stop-string matcher tokenizes that string to learn how tokens are joined.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"abcdef": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")


def random_prompt(length: int, seed: int = 0) -> torch.LongTensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (1, length), generator=g)


def plain_greedy(target, input_ids, **kwargs) -> torch.LongTensor:
    return target.generate(input_ids, do_sample=False, **kwargs)


class OracleDrafter(Drafter):
    """Drafts the target's own continuation (known in advance), corrupted at chosen positions.

    Every node at position p of row b proposes ``references[b][p + 1]`` as its best child, so the beam tree always
    contains the reference path up to the first corrupted position: long accepted runs, then a forced rejection.
    ``references`` are per-row token sequences in position space (prompt without padding + continuation).
    """

    def __init__(self, target, references, tree_shape, corrupt_every: int = 0, seed: int = 0):
        self.config = target.config
        self.generation_config = GenerationConfig(tree_shape=tree_shape if isinstance(tree_shape, str)
                                                  else list(tree_shape))
        if isinstance(references, torch.Tensor):
            references = list(references)
        self.references = [r.flatten() for r in references]
        self.corrupt_every = corrupt_every
        self.g = torch.Generator().manual_seed(seed)
        self.stats = None

    def bind(self, target) -> None:
        pass

    def start(self, input_ids, attention_mask, target_state) -> DraftState:
        return DraftState(cache=None, extra={"rows": list(range(input_ids.shape[0]))})

    def _next(self, row: int, position: int) -> int:
        reference = self.references[row]
        if position + 1 >= reference.numel():
            return int(torch.randint(VOCAB, (1,), generator=self.g))
        token = int(reference[position + 1])
        if self.corrupt_every and (position + 1) % self.corrupt_every == 0:
            token = (token + 1) % VOCAB
        return token

    def draft(self, state, root_tokens, root_positions, target_state, tree_shape):
        rows = state.extra["rows"]

        def step(tokens, positions, tree_bias):
            logits = torch.randn(*tokens.shape, VOCAB, generator=self.g)
            for i, row_positions in enumerate(positions.tolist()):
                for j, p in enumerate(row_positions):
                    logits[i, j, self._next(rows[i], p)] = 20.0
            return logits

        return build_beam_tree(step, root_tokens, root_positions, tree_shape)

    def commit(self, state, tokens, valid, start_positions) -> None:
        pass

    def select_rows(self, state, rows) -> None:
        state.extra["rows"] = [state.extra["rows"][i] for i in rows.tolist()]


# ---------------------------------------------------------------------------------------------------------------------
# tree_shape="auto" on a device of known costs

SIZES = (1, 2, 4, 8, 16, 32, 64, 129)


class FrozenCost(CostModel):
    """A device whose costs are given (no measurement, no learning): the planner's decisions are deterministic."""

    def __init__(self, verify, draft, rest=lambda n: 0.0):
        super().__init__()
        for size in SIZES:
            self.samples.setdefault("verify/1", []).append([1000.0, size, verify(size), 1.0])
            self.samples.setdefault("draft/1", []).append([1000.0, min(size, 16), draft(min(size, 16)), 1.0])
            self.samples.setdefault("rest/1", []).append([1000.0, size, rest(size), 1.0])

    def add(self, *args, **kwargs):
        pass


@pytest.fixture
def device_costs(monkeypatch):
    """Install a FrozenCost for every generate() call of the test."""
    import longspec_hf.auto_tree as auto_tree
    import longspec_hf.generation as generation

    def install(verify, draft):
        model = FrozenCost(verify, draft)
        monkeypatch.setattr(generation, "cost_model_for", lambda target, drafter, *compiled: model)
        monkeypatch.setattr(auto_tree.AutoTree, "measure", lambda self, *args, **kwargs: 0.0)
        return model

    return install


GPU_LIKE = dict(verify=lambda n: 1.0 + 0.001 * n, draft=lambda m: 0.05)  # 129 nodes cost ~ one step
CPU_LIKE = dict(verify=lambda n: 1.0 + 0.5 * (n - 1), draft=lambda m: 0.3 * m)  # every node costs half a step
