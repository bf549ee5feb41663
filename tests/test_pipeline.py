"""A draft through transformers' own front doors: `pipeline(...)` (assistant given at construction or per call) and a
chat template with a streamer, each giving what the same call without the draft gives."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import TextStreamer, pipeline

from longspec_hf import LongSpecDraftModel, SelfDraft
from longspec_hf.toy import toy_target

CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def toy():
    target, tokenizer = toy_target("llama")
    return target, tokenizer


@pytest.fixture(scope="module")
def saved_draft(toy, tmp_path_factory):
    """A draft as users get one: saved, then loaded from its folder (not yet bound to any target)."""
    target, _ = toy
    torch.manual_seed(0)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=16)
    draft.load_state_dict(draft.state_dict())  # "given weights": no untrained-draft warning
    folder = tmp_path_factory.mktemp("draft")
    draft.save_pretrained(folder)
    return folder


def test_the_draft_config_carries_the_target_special_tokens(toy, saved_draft):
    target, _ = toy
    saved = json.loads((saved_draft / "config.json").read_text())
    assert {k: saved[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        "bos_token_id": target.config.bos_token_id, "eos_token_id": target.config.eos_token_id,
        "pad_token_id": target.config.pad_token_id}


def test_a_draft_saved_without_special_tokens_gets_them_when_bound(toy, saved_draft, tmp_path):
    target, _ = toy
    config = json.loads((saved_draft / "config.json").read_text())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(name)
    for path in saved_draft.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    draft = LongSpecDraftModel.from_pretrained(tmp_path)
    assert draft.config.eos_token_id is None
    draft.bind(target)
    assert (draft.config.bos_token_id, draft.config.eos_token_id) == (target.config.bos_token_id,
                                                                      target.config.eos_token_id)


@pytest.mark.parametrize("when", ["construction", "call"])
def test_pipeline_with_a_draft_gives_the_plain_pipeline_text(toy, saved_draft, when):
    target, tokenizer = toy
    draft = LongSpecDraftModel.from_pretrained(saved_draft)
    settings = dict(max_new_tokens=24, do_sample=False)
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)
    expected = plain("def fibonacci(n):", **settings)
    if when == "construction":
        speculative = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=draft)
        out = speculative("def fibonacci(n):", **settings)
    else:
        out = plain("def fibonacci(n):", assistant_model=draft, **settings)
    assert out == expected
    assert draft.stats.rounds > 0  # the draft ran, not plain decoding


def test_pipeline_with_a_self_draft(toy):
    target, tokenizer = toy
    draft = SelfDraft.from_target(target, sink_size=2, window_size=16)
    expected = pipeline("text-generation", model=target, tokenizer=tokenizer)("x = [", max_new_tokens=16,
                                                                              do_sample=False)
    speculative = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=draft)
    assert speculative("x = [", max_new_tokens=16, do_sample=False) == expected
    assert draft.stats.rounds > 0


def test_chat_template_with_a_streamer(toy, saved_draft, capsys):
    """The README's chat example: apply_chat_template(..., return_dict=True), then generate(**enc, ...)."""
    target, shared = toy
    tokenizer = copy.deepcopy(shared)  # the toy tokenizer is cached for everyone: template a copy
    tokenizer.chat_template = CHAT_TEMPLATE
    draft = LongSpecDraftModel.from_pretrained(saved_draft)
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert set(enc) >= {"input_ids", "attention_mask"}
    plain = target.generate(**enc, max_new_tokens=20, do_sample=False,
                            streamer=TextStreamer(tokenizer, skip_prompt=True))
    plain_text = capsys.readouterr().out
    out = target.generate(**enc, assistant_model=draft, max_new_tokens=20, do_sample=False,
                          streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert torch.equal(out, plain)
    assert capsys.readouterr().out == plain_text and plain_text.strip()
