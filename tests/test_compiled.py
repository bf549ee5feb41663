"""Compiled rounds (``compile_config``): the same outputs as plain ``generate()``, through torch.compile'd forwards.

The graphs are compiled by inductor (what users get) behind a backend that counts their runs, so each test also
checks that the rounds really ran compiled code rather than falling back to eager.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch._dynamo
from conftest import GPU_LIKE, OracleDrafter, plain_greedy, random_prompt, tiny_target
from test_batch import left_padded
from test_sampling import PROMPT, SAMPLES, chi_square_p_value, exact_last_two, small_vocab_target
from transformers import CompileConfig, GenerationConfig

from longspec_hf import LongSpecDraftModel, SelfDraft
from longspec_hf.compiled import CompiledFallbackWarning, compile_options, fallback_count, round_compile_config

RUNS: Counter = Counter()


def counting_inductor(graph, example_inputs):
    """inductor, counting how often its compiled graphs run."""
    from torch._inductor.compile_fx import compile_fx

    compiled = compile_fx(graph, example_inputs)

    def run(*args):
        RUNS["graphs"] += 1
        return compiled(*args)

    return run


COMPILED = CompileConfig(backend=counting_inductor)


def graph_runs(generate) -> int:
    before = RUNS["graphs"]
    out = generate()
    return out, RUNS["graphs"] - before


def random_draft(target, tree_shape, seed=1):
    torch.manual_seed(seed)
    draft = LongSpecDraftModel.from_target(target, sink_size=4, window_size=16)
    draft.generation_config.tree_shape = tree_shape
    return draft


@pytest.mark.parametrize("kind", ["longspec", "self_draft"])
def test_compiled_rounds_are_lossless(family, kind, device_costs):
    device_costs(**GPU_LIKE)  # "auto" drafts deep and wide: many tree sizes through one dynamic graph
    target = tiny_target(family)
    ids = random_prompt(70, seed=4)  # longer than Mistral's window: its sliding-window mask is compiled too
    expected = plain_greedy(target, ids, max_new_tokens=24)
    if kind == "longspec":
        draft = random_draft(target, [2, 3, 2])
    else:
        draft = SelfDraft.from_target(target, sink_size=2, window_size=16, tree_shape="auto")
    out, runs = graph_runs(lambda: target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=24,
                                                   compile_config=COMPILED))
    assert torch.equal(out, expected)
    # Every round ran a compiled verification and at least one compiled draft forward.
    assert runs >= 2 * draft.stats.rounds


def test_long_accepted_runs_through_compiled_verification():
    target = tiny_target("qwen3")
    ids = random_prompt(50, seed=3)
    expected = plain_greedy(target, ids, max_new_tokens=40)
    oracle = OracleDrafter(target, expected, [4, 16, 16, 16], corrupt_every=6)
    out, runs = graph_runs(lambda: target.generate(ids, assistant_model=oracle, do_sample=False, max_new_tokens=40,
                                                   compile_config=COMPILED))
    assert torch.equal(out, expected)
    assert oracle.stats.tau > 3 and runs >= oracle.stats.rounds


def test_padded_batch_with_a_lookup_branch_matches_each_row_alone():
    target = tiny_target("llama")
    prompts = [random_prompt(n, seed=n) for n in (9, 60, 31)]
    alone = [plain_greedy(target, p, max_new_tokens=20) for p in prompts]
    ids, mask = left_padded(prompts)
    draft = random_draft(target, [2, 2])
    out, runs = graph_runs(lambda: target.generate(ids, attention_mask=mask, assistant_model=draft, do_sample=False,
                                                   max_new_tokens=20, prompt_lookup_num_tokens=3,
                                                   compile_config=COMPILED))
    for row, (p, expected) in enumerate(zip(prompts, alone, strict=True)):
        assert torch.equal(out[row, ids.shape[1] - p.shape[1]:], expected[0])
    assert runs >= 2 * draft.stats.rounds


def test_specpv_rounds_compile_and_stay_exact_with_a_covering_budget():
    target = tiny_target("qwen2")
    draft = random_draft(target, [2, 2, 2])
    draft.generation_config.specpv = {"block_size": 4, "sink_blocks": 1, "retrieval_blocks": 1000,
                                      "window_blocks": 2, "refresh_interval": 5}
    ids = random_prompt(200, seed=2)
    out, runs = graph_runs(lambda: target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=30,
                                                   compile_config=COMPILED))
    assert torch.equal(out, plain_greedy(target, ids, max_new_tokens=30))
    assert draft.stats.partial_verifications > 0 and runs >= draft.stats.rounds


def test_compiled_sampling_matches_the_target_distribution():
    target = small_vocab_target("llama")
    torch.manual_seed(1)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    draft.generation_config.tree_shape = [2, 2, 2]
    draft.generation_config.compile_config = COMPILED  # set on the draft: every call compiles its rounds
    torch.manual_seed(2)
    samples, accepted, before = [], 0, RUNS["graphs"]
    for _ in range(SAMPLES):
        out = target.generate(PROMPT, assistant_model=draft, do_sample=True, top_k=None, max_new_tokens=4)
        samples.append(tuple(out[0, -2:].tolist()))
        accepted += draft.stats.accepted_tokens
    assert RUNS["graphs"] - before >= SAMPLES
    assert accepted > SAMPLES // 20
    assert chi_square_p_value(samples, exact_last_two(target, PROMPT, 1.0)) > 1e-3


def test_compiled_calls_are_kept_and_reused_across_calls():
    target = tiny_target("gemma")
    draft = random_draft(target, [1, 1, 1])
    ids = random_prompt(30, seed=8)
    for _ in range(2):
        target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=8, compile_config=COMPILED)
    assert len(target.__dict__["_longspec_compiled_calls"]) == 1
    assert len(draft.__dict__["_longspec_compiled_calls"]) == 1


def test_eager_unless_asked_and_disable_compile_wins():
    target = tiny_target("llama")
    draft = random_draft(target, [1, 1])
    assert round_compile_config(GenerationConfig(), draft) is None
    assert round_compile_config(GenerationConfig(compile_config=COMPILED), draft) is COMPILED
    assert round_compile_config(GenerationConfig(compile_config=COMPILED, disable_compile=True), draft) is None
    draft.generation_config.compile_config = {"backend": "eager"}  # as read back from a saved generation_config
    assert round_compile_config(GenerationConfig(), draft).backend == "eager"
    draft.generation_config.disable_compile = True
    assert round_compile_config(GenerationConfig(compile_config=COMPILED), draft) is None
    ids = random_prompt(20, seed=1)
    before = RUNS["graphs"]
    target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=6, compile_config=COMPILED)
    assert RUNS["graphs"] == before


def test_config_is_adapted_to_rounds_and_bad_values_are_refused():
    # A growing prefix changes shapes every round: dynamic graphs, and no per-shape CUDA graph capture.
    assert compile_options(CompileConfig()) | {"backend": None} == {
        "fullgraph": False, "dynamic": True, "backend": None, "mode": "default", "options": None,
        "isolate_recompiles": True}
    assert compile_options(CompileConfig(mode="max-autotune"))["mode"] == "max-autotune-no-cudagraphs"
    target = tiny_target("llama")
    draft = random_draft(target, [1])
    with pytest.raises(ValueError, match="CompileConfig"):
        round_compile_config(GenerationConfig(compile_config="yes"), draft)


def test_cost_times_compiled_rounds_next_to_eager_ones(tmp_path):
    import json

    from test_cost import tiny_config

    from longspec_hf.cli import main as cli

    cli(["cost", "--target", f"random:{tiny_config(tmp_path)}", "--device", "cpu", "--contexts", "24",
         "--trees", "c=1,1", "--rounds", "2", "--repeats", "1", "--kernel-queries", "--compile-rounds",
         "--output-dir", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["drafter"] for r in result["rounds"]] == ["longspec", "longspec_compiled"]
    assert all(r["round_ms"] > 0 for r in result["rounds"])


def test_bench_runs_each_tree_compiled_next_to_eager():
    from longspec_hf.bench import default_methods

    target = tiny_target("llama")
    methods = default_methods(target, random_draft(target, [1]), {"chain": [1, 1]}, self_draft_tree=None,
                              compile_rounds=True)
    twin = next(m for m in methods if m.name == "chain_compiled")
    assert twin.settings["compile_rounds"] and twin.warmup == "per_context"
    assert "chain" in {m.name for m in methods}
    ids = random_prompt(20, seed=2)
    before = RUNS["graphs"]
    out = twin.generate(target, ids, None, 6).sequences
    assert torch.equal(out, plain_greedy(target, ids, max_new_tokens=6))
    assert RUNS["graphs"] == before  # the bench asks for CompileConfig(): plain inductor, not this file's backend
    assert any("'inductor'" in key for key in target.__dict__["_longspec_compiled_calls"])


@pytest.mark.parametrize("kind", ["longspec", "self_draft"])
def test_rounds_compile_without_graph_breaks(family, kind):
    """The hybrid attention, the caches and both drafters trace into whole graphs (tracing only: eager backend)."""
    from torch._dynamo.utils import counters

    target = tiny_target(family)
    draft = random_draft(target, [2, 2]) if kind == "longspec" else SelfDraft.from_target(
        target, sink_size=2, window_size=16, tree_shape=[2, 2])
    counters.clear()
    out = target.generate(random_prompt(70, seed=5), assistant_model=draft, do_sample=False, max_new_tokens=8,
                          compile_config=CompileConfig(backend="eager"))
    assert torch.equal(out, plain_greedy(target, random_prompt(70, seed=5), max_new_tokens=8))
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]


def test_compile_options_never_pass_both_a_mode_and_options():
    options = compile_options(CompileConfig(options={"trace.enabled": False}))
    assert options["mode"] is None and options["options"] == {"trace.enabled": False}


def test_the_draft_state_resolves_each_compiled_call_once():
    from longspec_hf.drafting import DraftState

    target = tiny_target("llama")
    state = DraftState(cache=None, compile_config=COMPILED)
    assert state.forward_of(target) is state.forward_of(target)
    assert DraftState(cache=None).forward_of(target) is target


def test_a_fallback_to_eager_is_a_warning_naming_the_cause():
    """torch runs a forward eagerly once its recompile limit is hit and only logs it; the loop warns (and the test
    configuration turns that warning into an error everywhere else, so no test passes on a silent fallback)."""
    target = tiny_target("llama")
    draft = random_draft(target, [1, 1])
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.warns(CompiledFallbackWarning, match="recompile_limit = 1"):
            for n in (20, 1, 33):  # a one-token prompt and a batch of two: new static cases, beyond one graph
                ids = random_prompt(n, seed=n).expand(1 + (n == 33), -1)
                target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=6,
                                compile_config=CompileConfig(backend="eager"))


def test_each_models_compiled_calls_have_their_own_recompile_budget():
    """Every family's forward runs through the same transformers code: with torch's default shared budget, the
    graphs of several models in one process would exhaust its recompile limit together."""
    before = fallback_count()
    assert compile_options(CompileConfig())["isolate_recompiles"] is True
    for family in ("llama", "qwen3", "gemma", "mistral", "qwen2"):
        target = tiny_target(family)
        for shape in ([1, 1], [2, 2]):
            target.generate(random_prompt(25, seed=1), assistant_model=random_draft(target, shape), do_sample=False,
                            max_new_tokens=6, compile_config=CompileConfig(backend="eager"))
    assert fallback_count() == before
