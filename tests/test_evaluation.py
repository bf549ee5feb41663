"""`longspec eval`: held-out domains outside the training corpora (installed packages' code and prose), at least 8
prompts per cell by default, cells too long for their text skipped with a message (toy target, tiny contexts)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import longspec_hf_cli
from longspec_hf import evaluation
from longspec_hf.loading import load_causal_lm, load_draft
from longspec_hf.training import data


@pytest.fixture(scope="module")
def toy():
    target, tokenizer = load_causal_lm("toy:llama")
    return target, load_draft(None, target), tokenizer


@pytest.mark.parametrize("corpus", data.INSTALLED_CORPORA)
def test_installed_corpora_are_deterministic_and_outside_training(corpus):
    texts = data.load_texts([corpus])
    assert len(texts) >= 8 and sum(map(len, texts)) > 100_000
    assert texts == data.load_texts([corpus])  # same packages installed, same text in the same order
    reseeded = data.installed_code(seed=1) if corpus == "installed-code" else data.installed_prose(seed=1)
    assert reseeded != texts  # the seed picks the order of the packages
    training = set(data.load_texts(["python-stdlib:train", "python-docs:train"]))
    assert not training.intersection(texts)
    assert len(set(texts)) == len(texts)  # a license shipped by many packages appears once


def test_installed_code_leaves_out_this_project_and_stdlib_copies():
    names = {data.distribution_key(d.metadata["Name"]) for d in data.installed_distributions()}
    assert data.OWN_DISTRIBUTION not in names and len(names) >= 8
    stdlib_file = next(t for t in data.offline_corpus("python-stdlib", "train") if len(data.long_lines(t)) > 50)
    assert data.repeats_stdlib(stdlib_file)  # a vendored copy of a stdlib module would be dropped
    assert not any(data.repeats_stdlib(text) for text in data.installed_code()[:20])


def test_installed_corpora_have_no_splits():
    with pytest.raises(ValueError, match="write installed-code, not installed-code:heldout"):
        data.load_texts(["installed-code:heldout"])


def test_default_domains_and_prompts():
    assert set(evaluation.DEFAULT_DOMAINS.values()) == set(data.INSTALLED_CORPORA)
    parser = argparse.ArgumentParser()
    longspec_hf_cli.add_eval_arguments(parser)
    args = parser.parse_args(["--target", "t", "--draft", "d"])
    assert args.prompts >= 8 and max(args.contexts) == 8192


def test_evaluate_held_out_domains_on_the_toy(toy, tmp_path, capsys):
    target, draft, tokenizer = toy
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n" * 4)
    assert 16 <= len(tokenizer(short.read_text()).input_ids) < 48  # room for a 16-token prompt, not a 48-token one
    domains = {**evaluation.DEFAULT_DOMAINS, "short": str(short)}
    rows = evaluation.evaluate(target, draft, tokenizer, domains, contexts=[16, 48], max_new_tokens=3)
    cells = {(r["domain"], r["context"]): r for r in rows}
    assert len(cells) == 6
    for domain in evaluation.DEFAULT_DOMAINS:
        for context in (16, 48):
            row = cells[domain, context]
            assert row["prompts"] == evaluation.DEFAULT_PROMPTS >= 8 and row["tau"] >= 1 and row["rounds"] > 0
    assert "skipped" not in cells["short", 16] and "fewer than one 48-token prompt" in cells["short", 48]["skipped"]
    assert "skipping short at context 48" in capsys.readouterr().err
    assert "| short | 48 | | skipped:" in evaluation.markdown_table(rows)


def test_windows_are_distinct_and_need_one_context_of_text(toy):
    _, _, tokenizer = toy
    stream = evaluation.prompt_text(tokenizer, data.load_texts(["installed-prose"]), 64, 8)
    for context in (16, 64):
        prompts = evaluation.windows(stream, context, 8)
        assert len(prompts) == 8 and all(p.shape == (1, context) for p in prompts)
        assert len({tuple(p[0].tolist()) for p in prompts}) == 8
    with pytest.raises(ValueError, match="fewer than a"):
        evaluation.windows(stream[:10], 16, 8)


def test_a_cells_prompts_do_not_depend_on_the_other_contexts_of_the_call(toy):
    _, _, tokenizer = toy
    domains = {"prose": "installed-prose"}

    def prompts(contexts):
        return {cell["context"]: [p[0].tolist() for p in windows]
                for cell, windows in evaluation.held_out_cells(tokenizer, domains, contexts, 8)}

    alone, together = prompts([16]), prompts([16, 256])
    assert alone[16] == together[16]
    # The same windows a benchmark cuts from the same text (one definition of "the prompts of a cell").
    texts = data.load_texts(["installed-prose"])
    assert alone[16] == [p[0].tolist() for p in evaluation.prompt_windows(tokenizer, texts, 16, 8)]
    assert together[256] == [p[0].tolist() for p in evaluation.prompt_windows(tokenizer, texts, 256, 8)]


def test_eval_cli_writes_every_cell(tmp_path, capsys):
    out = tmp_path / "rows.json"
    parser = argparse.ArgumentParser()
    longspec_hf_cli.add_eval_arguments(parser)
    args = parser.parse_args(["--target", "toy:llama", "--draft", "self", "--contexts", "24", "--max-new-tokens",
                              "2", "--prompts", "8", "--json", str(out)])
    evaluation.evaluate_cli(args)
    rows = json.loads(out.read_text())
    assert [(r["domain"], r["context"], r["prompts"]) for r in rows] == [("code", 24, 8), ("prose", 24, 8)]
    assert "| code | 24 |" in capsys.readouterr().out


def test_draft_vocabularies_are_compared_on_the_same_prompts(toy):
    from longspec_hf.vocabulary import ranked_vocabulary

    target, draft, tokenizer = toy
    draft.set_draft_vocabulary(ranked_vocabulary(torch.arange(draft.config.vocab_size).flip(0), 64))
    rows = evaluation.evaluate(target, draft, tokenizer, {"code": "installed-code"}, contexts=[16],
                               max_new_tokens=3, vocab_sizes=[0, 32, 64])
    assert [r["vocab"] for r in rows] == ["all", "32", "64"]
    assert all(r["draft_ms_per_round"] > 0 for r in rows)
    assert len(draft.draft_vocab) == 64  # left as it was
    assert "| code | 16 | 32 |" in evaluation.markdown_table(rows)
    with pytest.raises(ValueError, match="has 64 tokens"):
        evaluation.draft_vocabularies(draft, [128])
    draft.set_draft_vocabulary(None)
