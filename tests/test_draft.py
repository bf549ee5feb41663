"""The draft module: derived from the target, shares its embeddings and head, constant-size cache, save/load."""

from __future__ import annotations

import torch
from conftest import random_prompt, tiny_target
from transformers import AutoModel

from longspec_hf import LongSpecDraftConfig, LongSpecDraftModel, SinkWindowCache


def test_draft_shares_target_embeddings_and_head():
    target = tiny_target("llama")
    draft = LongSpecDraftModel.from_target(target)
    assert draft.get_input_embeddings() is target.get_input_embeddings()
    assert draft.get_output_embeddings() is target.get_output_embeddings()
    names = set(draft.state_dict())
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert {"self_attn.q_proj.weight", "cross_attn.q_proj.weight", "mlp.gate_proj.weight",
            "post_self_attention_layernorm.weight", "post_cross_attention_layernorm.weight"} <= names


def test_config_inherits_target_geometry():
    target = tiny_target("qwen3")
    config = LongSpecDraftConfig.from_target_config(target.config, sink_size=2, window_size=32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.rope_parameters == dict(target.config.rope_parameters)
    assert config.target_model_type == "qwen3" and config.window_size == 32


def test_draft_cache_is_constant_size_for_long_prompts():
    target = tiny_target("llama")
    draft = LongSpecDraftModel.from_target(target, sink_size=4, window_size=16)
    cache_1k = draft.start(random_prompt(1000), None, None).cache
    cache_8k = draft.start(random_prompt(8000), None, None).cache
    assert isinstance(cache_8k, SinkWindowCache)
    assert cache_1k.nbytes() == cache_8k.nbytes()
    assert cache_8k.get_seq_length() == 8000 and cache_8k.get_stored_length() == 20


def test_prefill_shortcut_equals_running_the_layer():
    """Computing only the kept KV (start) gives the same cache as running the prompt through the draft."""
    target = tiny_target("mistral")
    draft = LongSpecDraftModel.from_target(target, sink_size=3, window_size=10)
    ids = random_prompt(40)
    shortcut = draft.start(ids, None, None).cache
    full = SinkWindowCache(3, 10)
    kv = torch.zeros(1, 2, 1, 16)
    draft(ids, torch.arange(40)[None], kv, kv, full, torch.zeros(1, 1, 40, 40).triu(1) * -1e9)
    torch.testing.assert_close(shortcut.layers[0].keys, full.layers[0].keys)
    torch.testing.assert_close(shortcut.layers[0].values, full.layers[0].values)
    assert shortcut.get_seq_length() == full.get_seq_length() == 40


def test_save_load_round_trip_and_auto_class(tmp_path):
    target = tiny_target("gemma")
    draft = LongSpecDraftModel.from_target(target, window_size=16)
    draft.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, LongSpecDraftModel)
    loaded.bind(target)
    ids, pos = random_prompt(12), torch.arange(12)[None]
    k = v = torch.randn(1, 2, 12, 16)
    torch.testing.assert_close(draft(ids, pos, k, v), loaded(ids, pos, k, v))


def test_model_card_from_hub_cards_template():
    from longspec_hf.cards import draft_card

    target = tiny_target("llama")
    draft = LongSpecDraftModel.from_target(target, sink_size=4, window_size=16)
    draft.generation_config.tree_shape = [1, 1, 1]
    card = draft_card(draft, base_model="org/tiny-llama", repo_id="org/tiny-llama-longspec",
                      datasets=["python-stdlib"], training_recipe="longspec train ...", results_table="| x |")
    data = card.data.to_dict()
    assert data["library_name"] == "longspec-hf" and data["base_model"] == "org/tiny-llama"
    assert data["pipeline_tag"] == "text-generation" and "speculative-decoding" in data["tags"]
    text = str(card)
    assert 'LongSpecDraftModel.from_pretrained("org/tiny-llama-longspec")' in text
    assert "| window tokens | 16 |" in text and "[1, 1, 1]" in text and "longspec train ..." in text
