"""Losslessness fuzz against plain generate(): seeded random cases (built in fuzz_cases.py) and a hypothesis search.

Cases span family x dtype x drafter (random LongSpec draft, oracle with corrupted positions, SelfDraft) x tree shape
x sink/window x batch size and left padding x EOS placement x logits processors x prompt cache x greedy/sampling.

* Default profile (every run): the first ``DEFAULT_CASES`` indices, a bf16 agreement check, a hypothesis search.
* Large profile (``slow``): ``LONGSPEC_FUZZ_CASES`` cases (10000) run from index ``LONGSPEC_FUZZ_START`` (0) on,
  stopping early after ``LONGSPEC_FUZZ_SECONDS`` if set; it prints its figures (cases, index range, time, failures,
  bf16 agreement). Run it after every change of the decode loop:

      nice -n 19 python -m pytest -q -m slow tests/test_fuzz.py

* A failing index reproduces alone, and shrinks: ``python tests/fuzz_cases.py INDEX --minimise``. A failure becomes a
  regular test below (``xfail(strict=True)`` while the engine bug is open, with its cases listed in ``KNOWN_BUGS``).
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
import torch
from conftest import VOCAB, OracleDrafter, random_prompt, tiny_target
from fuzz_cases import (
    DRAFTERS,
    EOS_MODES,
    FAMILY_NAMES,
    PROCESSORS,
    TIE_GAP,
    Case,
    check_case,
    draw_case,
    draw_processor_arg,
    known_bug,
    processed_gap,
    run_profile,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_batch import left_padded

from longspec_hf import SelfDraft

DEFAULT_CASES = 80
BF16_CASES = range(1_000_000, 1_000_020)  # indices far from the large profile's, drawn again in bf16
# bf16 rounds the tree forward differently from a decode step, so near-ties flip and runs part: the mean agreement is
# ~0.92; a tree mask that lets every node see the whole tree brought it down to 0.60 (and failed most fp32 cases).
BF16_MIN_AGREEMENT = 0.75


@pytest.fixture(autouse=True)
def one_thread():
    # Handing the tiny models' matmuls to a second thread costs more than the matmuls, badly so when other processes
    # share the cores (10x slower measured); one thread lets the large profile fit in half an hour.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def skip_known(case: Case) -> None:
    bug = known_bug(case)
    if bug:
        pytest.skip(f"case {case.index} hits a known engine bug, pinned by {bug}")


@pytest.mark.parametrize("index", range(DEFAULT_CASES))
def test_default_profile(index):
    case = draw_case(index)
    skip_known(case)
    _, problem = check_case(case)
    assert problem is None, problem


def test_bf16_runs_and_mostly_agrees():
    agreements = []
    for index in BF16_CASES:
        case = dataclasses.replace(draw_case(index), dtype="bf16", sampling=False)
        if known_bug(case):
            continue
        outcome, problem = check_case(case)
        assert problem is None, problem  # no crash, well-formed rows
        agreements.append(outcome.agreement)
    mean = sum(agreements) / len(agreements)
    assert mean >= BF16_MIN_AGREEMENT, f"bf16 agreement {mean:.3f} over {len(agreements)} cases: {agreements}"


@st.composite
def cases(draw) -> Case:
    """Cases for hypothesis, which shrinks a failure field by field (the seeded profiles cover more, faster)."""
    batch = draw(st.integers(1, 3))
    prompt_lens = tuple(draw(st.lists(st.integers(1, 160), min_size=batch, max_size=batch)))
    padded = len(set(prompt_lens)) > 1
    max_new_tokens = draw(st.integers(1, 24))
    cached = 0 if padded or prompt_lens[0] == 1 else draw(st.integers(0, prompt_lens[0] - 1))
    processor = draw(st.sampled_from(PROCESSORS))
    return Case(
        index=-1, family=draw(st.sampled_from(FAMILY_NAMES)), dtype="fp32", drafter=draw(st.sampled_from(DRAFTERS)),
        tree_shape=tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))),
        sink=draw(st.integers(0, 8)), window=draw(st.integers(1, 64)), corrupt_every=draw(st.integers(0, 7)),
        prompt_lens=prompt_lens, extra_pad=0, explicit_mask=not padded and draw(st.booleans()), cached=cached,
        old_cache_name=draw(st.booleans()), max_new_tokens=max_new_tokens, use_max_length=False,
        eos=draw(st.sampled_from(EOS_MODES)), eos_offset=draw(st.integers(0, max_new_tokens - 1)),
        eos_row=draw(st.integers(0, batch - 1)), processor=processor,
        processor_arg=draw_processor_arg(random.Random(draw(st.integers(0, 2**16))), processor, max_new_tokens),
        sampling=False, seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=cases())
def test_hypothesis_search(case):
    assume(known_bug(case) is None)
    _, problem = check_case(case)
    assert problem is None, problem


@pytest.mark.slow
def test_large_profile(capsys):
    start = int(os.environ.get("LONGSPEC_FUZZ_START", "0"))
    count = int(os.environ.get("LONGSPEC_FUZZ_CASES", "10000"))
    seconds = float(os.environ.get("LONGSPEC_FUZZ_SECONDS", "inf"))

    def report(summary):
        with capsys.disabled():
            print(f"\nfuzz: {summary.line()}", flush=True)

    summary = run_profile(start, count, seconds, progress=report)
    report(summary)
    assert not summary.failures, summary.line() + "\n" + "\n".join(summary.failures[:20])
    if len(summary.bf16) >= 20:  # a mean over fewer cases says little
        assert summary.bf16_agreement >= BF16_MIN_AGREEMENT, summary.line()


# ---------------------------------------------------------------------------------------------------------------------
# failures found by the fuzz, minimised (an open engine bug would be a strict xfail, its cases in KNOWN_BUGS)


def test_a_rounding_tie_of_plain_decoding_is_not_a_mismatch():
    # Fuzz case 3650, minimised. Token 92 is suppressed, and plain decoding's next two scores at the 29th new token
    # are 7e-7 apart (44 by incremental decoding, 94 in one forward over the prefix: an exact tie there); the tree
    # forward takes 94. Not a bug of the engine, so the fuzz tells such a tie apart and reports it.
    case = Case(index=3650, family="llama", dtype="fp32", drafter="self", tree_shape=(1,), sink=0, window=1,
                corrupt_every=0, prompt_lens=(86,), extra_pad=0, explicit_mask=False, cached=0, old_cache_name=False,
                max_new_tokens=29, use_max_length=False, eos="none", eos_offset=28, eos_row=0,
                processor="suppress_tokens", processor_arg=5927, sampling=False, seed=47775)
    _, problem = check_case(case)
    assert problem is None
    assert processed_gap(case, 0, case.width + 28) < TIE_GAP


def test_sampling_with_every_token_banned_fails_as_plain_sampling_does():
    # Fuzz case 3653 (bf16, SelfDraft): no_repeat_ngram_size=1 bans every token the sequence holds, so plain sampling
    # raises once none is left; with a draft it must raise too, not emit something plain decoding never would.
    target = tiny_target("llama")
    ids = torch.arange(2, VOCAB)[None]  # bans all but tokens 0 and 1 from the start
    kwargs = {"do_sample": True, "no_repeat_ngram_size": 1, "max_new_tokens": 8}
    with pytest.raises(RuntimeError, match="probability tensor"):
        target.generate(ids, **kwargs)
    draft = SelfDraft.from_target(target, sink_size=2, window_size=16, tree_shape=(2, 2))
    with pytest.raises(RuntimeError, match="probability tensor"):
        target.generate(ids, assistant_model=draft, **kwargs)


def test_batched_repetition_penalty_with_an_attention_mask():
    # Fuzz case 13 (and 9% of all cases: batch > 1, an attention mask, repetition_penalty != 1), minimised to two
    # left-padded prompts of 1 and 2 tokens and one speculative round.
    target = tiny_target("qwen3")
    ids, mask = left_padded([random_prompt(1, seed=1), random_prompt(2, seed=2)])
    kwargs = {"attention_mask": mask, "max_new_tokens": 2, "do_sample": False, "repetition_penalty": 1.5}
    expected = target.generate(ids, **kwargs)
    oracle = OracleDrafter(target, [expected[0, 1:], expected[1]], [1])
    assert torch.equal(target.generate(ids, assistant_model=oracle, **kwargs), expected)


def row_parity(batch_id: int, ids: torch.LongTensor) -> list[int]:
    """Row `batch_id` may only emit tokens of its own parity."""
    return list(range(batch_id % 2, VOCAB, 2))


def test_prefix_allowed_tokens_fn_gets_each_rows_batch_id():
    # Fuzz case 6 (and 5% of all cases: batch > 1 with a row-dependent prefix_allowed_tokens_fn), minimised to two
    # unpadded prompts and one speculative round.
    target = tiny_target("llama")
    ids = torch.cat([random_prompt(1, seed=1), random_prompt(1, seed=2)])
    kwargs = {"max_new_tokens": 2, "do_sample": False, "prefix_allowed_tokens_fn": row_parity}
    expected = target.generate(ids, **kwargs)
    assert all(t % 2 == 1 for t in expected[1, 1:].tolist())
    oracle = OracleDrafter(target, expected, [1])
    assert torch.equal(target.generate(ids, assistant_model=oracle, **kwargs), expected)
