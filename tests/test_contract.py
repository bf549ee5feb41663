"""The rest of generate()'s contract with a draft: streamers, stopping criteria, stop strings, configs."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import VOCAB, OracleDrafter, plain_greedy, random_prompt, tiny_target, word_tokenizer
from transformers import (
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def setup(family="llama", prompt_len=30, new=30, seed=4, tree=(4, 16, 16, 16)):
    target = tiny_target(family)
    ids = random_prompt(prompt_len, seed=seed)
    reference = plain_greedy(target, ids, max_new_tokens=new)
    return target, ids, reference, OracleDrafter(target, reference, list(tree))


class Recorder(BaseStreamer):
    def __init__(self):
        self.chunks = []
        self.ended = 0

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended += 1


def test_streamer_gets_every_token_once_in_order():
    target, ids, reference, oracle = setup()
    recorder = Recorder()
    out = target.generate(ids, assistant_model=oracle, max_new_tokens=30, streamer=recorder)
    assert torch.equal(out, reference)
    assert recorder.chunks[0] == ids[0].tolist()  # the prompt first, as plain generate does
    streamed = [t for chunk in recorder.chunks[1:] for t in chunk]
    assert streamed == reference[0, ids.shape[1]:].tolist()
    assert recorder.ended == 1
    assert any(len(chunk) > 1 for chunk in recorder.chunks[1:])  # accepted runs arrive together


def test_text_streamer_prints_what_plain_generate_prints(tokenizer, capsys):
    target, ids, _, oracle = setup()
    target.generate(ids, max_new_tokens=30, streamer=TextStreamer(tokenizer, skip_prompt=True))
    plain = capsys.readouterr().out
    target.generate(ids, assistant_model=oracle, max_new_tokens=30, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out == plain and plain.strip()


def test_text_iterator_streamer(tokenizer):
    target, ids, reference, oracle = setup()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(
        target=target.generate, kwargs={"inputs": ids, "assistant_model": oracle, "max_new_tokens": 30,
                                        "streamer": streamer})
    thread.start()
    text = "".join(streamer)
    thread.join()
    assert text.split() == tokenizer.decode(reference[0, ids.shape[1]:]).split()


def first_mid_run_token(reference, prompt_len, after=6):
    generated = reference[0, prompt_len:].tolist()
    return next(t for i, t in enumerate(generated) if i >= after and t not in generated[:i])


def test_several_eos_ids_stop_inside_a_run():
    target, ids, reference, oracle = setup()
    eos = [first_mid_run_token(reference, ids.shape[1]), VOCAB - 1]
    expected = plain_greedy(target, ids, max_new_tokens=30, eos_token_id=eos)
    out = target.generate(ids, assistant_model=oracle, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(out, expected) and out.shape[1] < reference.shape[1]


def test_max_length():
    target, ids, reference, oracle = setup()
    out = target.generate(ids, assistant_model=oracle, max_length=ids.shape[1] + 11)
    assert torch.equal(out, reference[:, : ids.shape[1] + 11])


def test_custom_stopping_criteria_inside_a_run():
    target, ids, reference, oracle = setup()
    stop_token = first_mid_run_token(reference, ids.shape[1], after=9)

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    criteria = StoppingCriteriaList([StopOn()])
    expected = target.generate(ids, max_new_tokens=30, stopping_criteria=criteria)
    out = target.generate(ids, assistant_model=oracle, max_new_tokens=30, stopping_criteria=criteria)
    assert torch.equal(out, expected)
    assert out[0, -1] == stop_token and oracle.stats.tau > 2


def test_stop_strings_with_a_tokenizer(tokenizer):
    target, ids, reference, oracle = setup()
    stop = tokenizer.convert_ids_to_tokens(first_mid_run_token(reference, ids.shape[1], after=7))
    expected = target.generate(ids, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer)
    out = target.generate(ids, assistant_model=oracle, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer)
    assert torch.equal(out, expected) and out.shape[1] < reference.shape[1]


def test_generation_config_object_and_kwargs_agree():
    target, ids, reference, oracle = setup()
    by_kwargs = target.generate(ids, assistant_model=oracle, max_new_tokens=12, do_sample=False)
    config = GenerationConfig(max_new_tokens=12, do_sample=False)
    by_config = target.generate(ids, assistant_model=oracle, generation_config=config)
    assert torch.equal(by_kwargs, by_config) and torch.equal(by_kwargs, reference[:, : ids.shape[1] + 12])


def test_return_dict_in_generate_for_a_batch():
    target = tiny_target("qwen3")
    ids = torch.cat([random_prompt(10, 1), random_prompt(10, 2)])
    oracle = OracleDrafter(target, [plain_greedy(target, ids[i : i + 1], max_new_tokens=8) for i in range(2)], [2, 2])
    out = target.generate(ids, assistant_model=oracle, max_new_tokens=8, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 18)
    assert out.past_key_values is None  # padded-batch caches hold placeholder slots; documented
