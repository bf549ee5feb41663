"""Self-distillation data: the target's own continuations, cached, masked, and trained on (toy target, tiny sizes)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from longspec_hf.loading import load_causal_lm
from longspec_hf.training import TrainConfig, draft_loss, train
from longspec_hf.training import generated as gen
from longspec_hf.training.data import load_texts

SOURCE = "python-docs:train"


@pytest.fixture(scope="module")
def toy():
    return load_causal_lm("toy:llama")


def generate(toy, path, **overrides):
    target, tokenizer = toy
    values = dict(prompt_len=24, new_tokens=6, count=5, temperatures=[0.0], batch_size=2, progress=False)
    return gen.generate_data(target, tokenizer, SOURCE, path, **{**values, **overrides})


def test_spec_options_and_errors():
    spec = gen.parse_generated_spec("generated:python-stdlib:train?temperature=0,0.7&count=3&new_tokens=16&loss=all")
    assert (spec.source, spec.temperature, spec.count, spec.new_tokens, spec.loss) == (
        "python-stdlib:train", (0.0, 0.7), 3, 16, "all")
    assert gen.parse_generated_spec("generated:org/data:cfg@train").source == "org/data:cfg@train"
    with pytest.raises(ValueError, match="Unknown option 'temp'.*known"):
        gen.parse_generated_spec("generated:x?temp=1")
    with pytest.raises(ValueError, match="Bad value 'many' for count"):
        gen.parse_generated_spec("generated:x?count=many")
    with pytest.raises(ValueError, match="loss one of continuation, all"):
        gen.parse_generated_spec("generated:x?loss=prompt")
    with pytest.raises(ValueError, match="names no source"):
        gen.parse_generated_spec("generated:?count=1")


def test_text_loading_refuses_generated_sources_with_the_fix():
    with pytest.raises(ValueError, match="needs the target.*longspec train --data generated"):
        load_texts(["generated:python-docs:train"])


@pytest.mark.parametrize("temperatures", [[0.0], [0.0, 0.8]])
def test_greedy_continuations_are_plain_generate(toy, tmp_path, temperatures):
    target, tokenizer = toy
    rows = gen.read_rows(generate(toy, tmp_path / "gen.jsonl", temperatures=temperatures))
    assert len(rows) == 5 * len(temperatures)
    assert {row["source"] for row in rows} == {SOURCE} and {row["temperature"] for row in rows} == set(temperatures)
    prompts = gen.source_prompts(tokenizer, SOURCE, 24, 5, seed=0)  # [5, 24]
    assert torch.equal(torch.tensor([row["prompt_ids"] for row in rows if row["temperature"] == 0]), prompts)
    plain = target.generate(prompts, do_sample=False, max_new_tokens=6)[:, 24:]  # one batch, no prompt cache copies
    greedy = torch.tensor([row["continuation_ids"] for row in rows if row["temperature"] == 0])
    assert torch.equal(greedy, plain)
    assert rows[0]["continuation"] == tokenizer.decode(rows[0]["continuation_ids"])


def test_sampled_rows_are_seeded_and_differ_from_greedy(toy, tmp_path):
    first = gen.read_rows(generate(toy, tmp_path / "a.jsonl", temperatures=[0.0, 1.0]))
    again = gen.read_rows(generate(toy, tmp_path / "b.jsonl", temperatures=[0.0, 1.0]))
    assert first == again
    greedy = [r["continuation_ids"] for r in first if r["temperature"] == 0]
    sampled = [r["continuation_ids"] for r in first if r["temperature"] == 1]
    assert greedy != sampled


def test_the_file_is_reused_and_a_foreign_one_refused(toy, tmp_path, monkeypatch):
    path = generate(toy, tmp_path / "gen.jsonl")
    before = path.read_bytes()

    def no_generation(*args, **kwargs):
        raise AssertionError("the target was asked to generate again")

    monkeypatch.setattr(gen, "continue_prompts", no_generation)
    assert generate(toy, path) == path and path.read_bytes() == before
    with pytest.raises(ValueError, match="another target or other settings; delete it"):
        generate(toy, path, new_tokens=7)


def test_an_interrupted_run_continues_where_it_stopped(toy, tmp_path, monkeypatch):
    clean = gen.read_rows(generate(toy, tmp_path / "clean.jsonl", temperatures=[0.0, 1.0]))
    real, calls = gen.continue_prompts, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "continue_prompts", dies_on_second_batch)
    path = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate(toy, path, temperatures=[0.0, 1.0])
    partial = path.with_name(path.name + ".partial.jsonl")
    assert not path.exists() and len(partial.read_text().splitlines()) == 2 * 2  # batch 1: 2 prompts x 2 temps
    monkeypatch.setattr(gen, "continue_prompts", real)
    assert gen.read_rows(generate(toy, path, temperatures=[0.0, 1.0])) == clean
    assert not partial.exists()


def test_training_rows_mask_the_prompt_and_padding():
    rows = [dict(prompt_ids=[5, 6, 7, 8], continuation_ids=[9, 10]),  # fits with room: padded
            dict(prompt_ids=[1, 2, 3, 4, 5, 6], continuation_ids=[11, 12, 13])]  # too long: the prompt's start goes
    ids, mask = gen.training_rows(rows, seq_len=7, pad_id=0, loss="continuation")
    assert ids.tolist() == [[5, 6, 7, 8, 9, 10, 0], [3, 4, 5, 6, 11, 12, 13]]
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]]
    _, everything = gen.training_rows(rows, seq_len=7, pad_id=0, loss="all")
    assert everything.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    with pytest.raises(ValueError, match="generate fewer new_tokens"):
        gen.training_rows(rows, seq_len=3, pad_id=0, loss="all")
    assert gen.cut_after_eos([4, 0, 0, 0], eos=[0]) == [4, 0] and gen.cut_after_eos([4, 5], eos=[]) == [4, 5]


def test_masked_loss_is_the_mean_over_the_masked_positions(toy):
    from longspec_hf import LongSpecDraftModel

    target, _ = toy
    torch.manual_seed(0)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    ids = torch.randint(1, 500, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    for loss_type in ("ce", "distill"):
        full = draft_loss(draft, target, ids, positions, 2, loss_type)
        ones = draft_loss(draft, target, ids, positions, 2, loss_type, torch.ones(2, 16, dtype=torch.bool))
        torch.testing.assert_close(ones, full)
        # Only the last token of each row: the mean of those two predictions alone.
        last = torch.zeros(2, 16, dtype=torch.bool)
        last[:, -1] = True
        per_row = [draft_loss(draft, target, ids[b : b + 1], positions[b : b + 1], 2, loss_type,
                              last[b : b + 1]) for b in range(2)]
        torch.testing.assert_close(draft_loss(draft, target, ids, positions, 2, loss_type, last),
                                   (per_row[0] + per_row[1]) / 2)


def test_one_training_step_on_generated_data_caches_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSPEC_HF_CACHE", str(tmp_path / "cache"))
    spec = f"generated:{SOURCE}?count=2&new_tokens=6&batch_size=2"
    config = TrainConfig(target="toy:llama", data=[spec], output_dir=str(tmp_path / "draft"), seq_len=24,
                         max_steps=1, warmup_steps=1, window_size=8, sink_size=2)
    train(config, progress=False)
    files = list((tmp_path / "cache" / "generated").glob("*.jsonl"))
    assert len(files) == 1 and len(gen.read_rows(files[0])) == 2
    assert json.loads((tmp_path / "draft" / "train_log.jsonl").read_text().splitlines()[0])["step"] == 1

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached continuations were generated again")

    monkeypatch.setattr(gen, "continue_prompts", no_generation)
    # Mixed with plain text: both kinds of sequences in one run, the generated file reused.
    config.data = [spec, SOURCE]
    config.output_dir, config.max_steps = str(tmp_path / "draft2"), 2
    train(config, progress=False)
    ids, mask = gen.training_sequences(config.data, *load_causal_lm("toy:llama"), seq_len=24)
    assert ids.shape[1] == 24 and mask.shape == ids.shape
    assert mask[-2:].sum() == 12 and bool(mask[:-2].all())  # the 2 generated rows score their 6 new tokens only


def test_generate_data_cli_writes_the_file(tmp_path, capsys):
    out = tmp_path / "gen.parquet"
    args = argparse.Namespace(target="toy:llama", gguf_file=None, dtype="fp32", device=None, source=SOURCE,
                              output=str(out), prompt_len=16, new_tokens=4, count=2, temperatures=[0.0],
                              batch_size=2, seed=0, text_column="text")
    gen.generate_data_cli(args)
    assert "--data generated:" in capsys.readouterr().out
    rows = gen.read_rows(out)
    assert len(rows) == 2 and len(rows[0]["prompt_ids"]) == 16
    assert gen.is_generated_file(str(out))
    target, tokenizer = load_causal_lm("toy:llama")
    ids, mask = gen.generated_sequences(f"generated:{out}", target, tokenizer, seq_len=20)  # the file as it is
    assert ids.shape == (2, 20) and mask.sum() == 8
