"""Toy targets: tiny random causal LMs with a small tokenizer, built offline in a second.

`toy_target("llama")` gives a two-layer random Llama (Qwen2 and Mistral too) and a byte-level BPE tokenizer trained
on Python's own documentation, so every API that takes text works without a download. Its output is gibberish and
its tau says nothing about real models: it is for trying the API, for the examples' CPU/offline mode and for CI.
The same family and seed always give the same weights, so a draft trained on a toy target binds to it again.
"""

from __future__ import annotations

from functools import lru_cache

import torch

TOY_PREFIX = "toy:"
TOY_VOCAB = 512
TOY_SIZES = dict(vocab_size=TOY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384, rope_theta=10000.0)


def toy_families() -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


@lru_cache(maxsize=1)
def toy_tokenizer():
    """A byte-level BPE tokenizer (512 tokens, `<|endoftext|>` = 0) trained on `pydoc_data` topics."""
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator([topics[k] for k in sorted(topics)], vocab_size=TOY_VOCAB,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend._tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def toy_target(family: str = "llama", seed: int = 0):
    """`(model, tokenizer)`: a tiny random `family` causal LM in eval mode and the toy tokenizer."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    families = toy_families()
    if family not in families:
        raise ValueError(f"Unknown toy family {family!r}; use one of {sorted(families)} (e.g. 'toy:llama').")
    config = families[family](**TOY_SIZES, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config._name_or_path = f"{TOY_PREFIX}{family}"
    with torch.random.fork_rng(devices=[]):  # building a toy neither depends on nor moves the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    # No eos: a random model would stop at a random point, and examples want a fixed number of new tokens.
    model.generation_config = GenerationConfig(bos_token_id=0, pad_token_id=0, eos_token_id=None)
    return model.eval(), toy_tokenizer()
