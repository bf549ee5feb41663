"""Verification switches the target's attention for one forward, on the config its layers share: threads that use
the same model at that moment must stay exact, whatever implementation the user chose."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import random_prompt, tiny_target

from longspec_hf import SelfDraft

ROUNDS = 3


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_plain_and_two_speculative_threads_on_one_model_stay_exact(implementation):
    target = copy.deepcopy(tiny_target("mistral"))  # sliding layers: plain masks differ most between implementations
    target.set_attn_implementation(implementation)
    ids = random_prompt(60, seed=5)
    plain = target.generate(ids, do_sample=False, max_new_tokens=24)
    drafts = [SelfDraft.from_target(target, sink_size=2, window_size=8, tree_shape=shape)
              for shape in ([2, 2, 1], [1, 1, 1, 1])]
    for draft in drafts:
        assert torch.equal(target.generate(ids, do_sample=False, max_new_tokens=24, assistant_model=draft), plain)
    results: dict[str, list] = {"plain": [], "spec0": [], "spec1": []}
    start = threading.Barrier(3)

    def run(name, draft=None):
        start.wait()
        for _ in range(ROUNDS):
            options = {} if draft is None else {"assistant_model": draft}
            results[name].append(target.generate(ids, do_sample=False, max_new_tokens=24, **options))

    threads = [threading.Thread(target=run, args=("plain",))]
    threads += [threading.Thread(target=run, args=(f"spec{i}", d)) for i, d in enumerate(drafts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, outputs in results.items():
        assert len(outputs) == ROUNDS and all(torch.equal(out, plain) for out in outputs), name
    assert target.config._attn_implementation == implementation  # the user's choice is back
