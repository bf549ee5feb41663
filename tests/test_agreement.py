"""Teacher-forced agreement (`longspec eval --agreement`): on the target's own greedy continuation it predicts every
round of a chain decode exactly, which pins down what each lag means; on text it ranks drafts without generating."""

from __future__ import annotations

import argparse

import pytest
import torch

import longspec_hf_cli
from longspec_hf import evaluation
from longspec_hf.agreement import (
    agreement_hits,
    chain_tau,
    chain_walk,
    greedy_continuations,
    measure_agreement,
    target_view,
)
from longspec_hf.loading import load_causal_lm, load_draft

PROMPT, NEW, DEPTH = 40, 40, 3


def echoing_draft(target):
    """A draft whose blocks add nothing: it scores the head's reading of the input token's embedding, which agrees
    with a tiny random target's greedy token often enough (its continuations loop) to make acceptances happen."""
    draft = load_draft(None, target)
    with torch.no_grad():
        for proj in (draft.self_attn.o_proj, draft.cross_attn.o_proj, draft.mlp.down_proj):
            proj.weight.zero_()
    draft.generation_config.tree_shape = [1] * DEPTH
    draft.generation_config.prompt_lookup_num_tokens = 0
    return draft


@pytest.mark.filterwarnings("ignore:This LongSpec draft is untrained")
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_agreement_predicts_every_chain_round(family):
    target, _ = load_causal_lm(f"toy:{family}")
    draft = echoing_draft(target)
    accepted = 0
    for seed in range(3):
        ids = torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        full = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW)  # [1, PROMPT + NEW]
        view = target_view(target, full)
        hits = {lag: agreement_hits(draft, full, view, lag)[0] for lag in range(1, DEPTH + 1)}
        predicted = chain_walk(hits, PROMPT, full.shape[1], DEPTH)
        out = target.generate(ids, attention_mask=mask, assistant_model=draft, do_sample=False, max_new_tokens=NEW)
        assert torch.equal(out, full)
        measured = draft.stats.acceptance_lengths
        # Every round, the last one (cut to the tokens still wanted) included.
        assert measured == predicted
        accepted += sum(measured[:-1])
    assert accepted >= 5  # the comparison saw acceptances, not only rejections


@pytest.mark.filterwarnings("ignore:This LongSpec draft is untrained")
def test_measure_agreement_rows_and_errors():
    target, _ = load_causal_lm("toy:llama")
    draft = echoing_draft(target)
    prompts = [torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    rows = measure_agreement(target, draft, prompts, [1, 2])
    assert [r["lag"] for r in rows] == [1, 2] and [r["positions"] for r in rows] == [2 * 22, 2 * 21]
    assert all(0.0 < r["agreement"] < 1.0 for r in rows)
    with pytest.raises(ValueError, match="Lags start at 1"):
        measure_agreement(target, draft, prompts, [0])
    with pytest.raises(ValueError, match="at least 7 tokens"):
        agreement_hits(draft, prompts[0][:, :6], target_view(target, prompts[0][:, :6]), 5)
    with pytest.raises(ValueError, match="needs a LongSpec draft"):
        measure_agreement(target, load_draft("self", target), prompts, [1])


def test_eval_cli_agreement_table(capsys):
    parser = argparse.ArgumentParser()
    longspec_hf_cli.add_eval_arguments(parser)
    args = parser.parse_args(["--target", "toy:llama", "--draft", "self", "--contexts", "24", "--agreement", "1"])
    with pytest.raises(ValueError, match="drop --agreement"):
        evaluation.evaluate_cli(args)
    target, tokenizer = load_causal_lm("toy:llama")
    rows = evaluation.evaluate(target, load_draft(None, target), tokenizer, evaluation.DEFAULT_DOMAINS, [24], 0,
                               prompts_per_context=8, agreement_lags=[1, 3])
    assert [(r["domain"], r["lag"], r["positions"]) for r in rows] == [
        ("code", 1, 8 * 22), ("code", 3, 8 * 20), ("prose", 1, 8 * 22), ("prose", 3, 8 * 20)]
    table = evaluation.markdown_table(rows)
    assert "| top-1 agreement |" in table and "| code | 24 | all | 3 |" in table


@pytest.mark.filterwarnings("ignore:This LongSpec draft is untrained")
def test_chain_tau_is_the_decoded_tau():
    target, _ = load_causal_lm("toy:qwen2")
    draft = echoing_draft(target)
    prompts = [torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    decoded = evaluation.measure_tau(target, draft, prompts, NEW)
    forced = chain_tau(draft, greedy_continuations(target, prompts, NEW), DEPTH)
    assert forced["rounds"] == decoded["rounds"] and forced["accepted_tokens"] == decoded["accepted_tokens"] > 0
    assert forced["tau"] == decoded["tau"]


def test_promote_measures_only_chains_teacher_forced():
    from longspec_hf.agreement import chain_depth

    assert chain_depth([1, 1, 1]) == 3 and chain_depth((1,)) == 1
    assert chain_depth([4, 16, 16]) is None and chain_depth("auto") is None and chain_depth([]) is None


@pytest.mark.filterwarnings("ignore:This LongSpec draft is untrained")
def test_eval_teacher_forced_gives_the_decoded_tau_per_cell():
    target, tokenizer = load_causal_lm("toy:llama")
    draft = echoing_draft(target)
    domains = {"code": "installed-code"}
    decoded = evaluation.evaluate(target, draft, tokenizer, domains, [24, 40], 12, prompts_per_context=8)
    forced = evaluation.evaluate(target, draft, tokenizer, domains, [24, 40], 12, prompts_per_context=8,
                                 teacher_forced=True)
    assert [(r["context"], r["rounds"], r["accepted_tokens"]) for r in forced] == [
        (r["context"], r["rounds"], r["accepted_tokens"]) for r in decoded]
    assert "| code | 24 | all |" in evaluation.markdown_table(forced)
    draft.generation_config.tree_shape = [2, 2]
    with pytest.raises(ValueError, match="--tree-shape 1 1 1"):
        evaluation.evaluate(target, draft, tokenizer, domains, [24], 12, teacher_forced=True)
    draft.generation_config.tree_shape = [1, 1]
    draft.generation_config.prompt_lookup_num_tokens = 4
    with pytest.raises(ValueError, match="--prompt-lookup 0"):
        evaluation.evaluate(target, draft, tokenizer, domains, [24], 12, teacher_forced=True)
    with pytest.raises(ValueError, match="drop --teacher-forced"):
        evaluation.evaluate(target, load_draft("self", target), tokenizer, domains, [24], 12, teacher_forced=True)


def test_greedy_continuations_are_generated_once_and_read_back(monkeypatch, tmp_path):
    """The held-out continuations a promotion scores on are kept on disk: the second measurement of the same prompts
    runs no generate(), other settings or another target generate again, and a cut file is generated again."""
    from longspec_hf import continuations

    monkeypatch.setenv("LONGSPEC_HF_CACHE", str(tmp_path))
    target, _ = load_causal_lm("toy:llama")
    prompts = [torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    first = greedy_continuations(target, prompts, NEW)
    files = [continuations.continuation_path(continuations.continuation_key(target, p, NEW)) for p in prompts]
    assert sorted((tmp_path / "continuations").glob("*.safetensors")) == sorted(files)

    calls = []
    generate = target.generate
    monkeypatch.setattr(target, "generate", lambda *a, **k: calls.append(1) or generate(*a, **k))
    again = greedy_continuations(target, prompts, NEW)
    assert calls == []
    for (full, view, length), (full2, view2, length2) in zip(first, again, strict=True):
        assert torch.equal(full, full2) and length == length2 == PROMPT and full.shape[1] == PROMPT + NEW
        assert all(torch.equal(a, b) for a, b in zip(view, view2, strict=True))
    assert continuations.read_continuation(files[0], prompts[1]) is None  # checked against its prompt

    greedy_continuations(target, prompts[:1], NEW - 1)  # other settings: another file
    assert len(calls) == 1
    other, _ = load_causal_lm("toy:qwen2")
    assert continuations.continuation_key(other, prompts[0], NEW) != continuations.continuation_key(
        target, prompts[0], NEW)
    files[0].write_bytes(files[0].read_bytes()[:20])  # a cut file is generated again, and rewritten whole
    assert continuations.read_continuation(files[0], prompts[0]) is None
    assert torch.equal(greedy_continuations(target, prompts[:1], NEW)[0][0], first[0][0])
    assert len(calls) == 2 and torch.equal(continuations.read_continuation(files[0], prompts[0]), first[0][0])
