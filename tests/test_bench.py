"""`longspec bench` end to end on a tiny model: schema, same-run baseline, the correctness column, outputs."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_target, word_tokenizer

from longspec_hf import LongSpecDraftModel
from longspec_hf.bench import (
    SCHEMA,
    BenchSettings,
    Method,
    MethodOutput,
    Workload,
    autoregressive,
    compiled_static,
    default_methods,
    markdown_table,
    parse_workload,
    run_bench,
    write_outputs,
)
from longspec_hf.bench.runner import warm_up
from longspec_hf.bench.workloads import middle_truncate
from longspec_hf.cli import main as cli

TREES = {"longspec_chain": [1, 1], "longspec_tree": [2, 2]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("bench") / "corpus.txt"
    # Repeated phrases, so prompt lookup finds matches and drafts more than one token sometimes.
    phrases = [" ".join(f"w{rng.randrange(2, 95)}" for _ in range(6)) for _ in range(12)]
    path.write_text("\n".join(" ".join(rng.choice(phrases) for _ in range(20)) for _ in range(10)))
    return path


@pytest.fixture(scope="module")
def draft():
    torch.manual_seed(0)
    draft = LongSpecDraftModel.from_target(tiny_target("llama"), sink_size=4, window_size=16)
    draft.generation_config.prompt_lookup_num_tokens = 3  # a default of its own, as the shipped draft has
    return draft


@pytest.fixture(scope="module")
def result(corpus, draft):
    target = tiny_target("llama")
    workloads = [Workload("code", str(corpus), "completion"), Workload("docs", str(corpus), "summarization")]
    settings = BenchSettings(contexts=[32, 96], max_new_tokens=8, prompts_per_context=2)
    methods = default_methods(target, draft, TREES, self_draft_tree=[1, 1], self_draft_window=16, specpv_budgets=[16])
    return run_bench(target, word_tokenizer(), methods, workloads, settings, progress=False)


def test_schema_and_environment(result):
    assert result["schema"] == SCHEMA
    assert {"torch", "transformers", "device", "dtype", "threads", "longspec_hf"} <= set(result["environment"])
    assert [m["name"] for m in result["methods"]] == ["autoregressive", "prompt_lookup", "early_exit", "longspec",
                                                     "longspec_chain", "longspec_tree", "self_draft",
                                                     "longspec_pv16"]
    assert result["skipped"] == []
    assert len(result["runs"]) == 2 * 2 * 2 * 8  # workloads x contexts x prompts x methods
    row_keys = {"workload", "context", "method", "tau", "tokens_per_second", "speedup_decode", "speedup_end_to_end",
                "peak_memory_bytes", "draft_cache_bytes", "target_kv_bytes", "identical", "agreement", "prompts"}
    for row in result["summary"]:
        assert row_keys <= set(row)
        assert row["prompts"] == 2
        assert set(row["speedup_decode"]) == {"median", "min", "max"}
    json.dumps(result)  # JSON-ready


def test_auto_reports_its_trees_and_its_calibration(result):
    rows = [row for row in result["summary"] if row["method"] == "longspec"]
    assert len(rows) == 4 and all(row["identical"] for row in rows)
    for row in rows:
        assert sum(row["tree_shapes"].values()) > 0
        assert row["predicted_accepted"] >= 0 and row["accepted_tokens"] >= 0
    assert [m for m in result["methods"] if m["name"] == "longspec"][0]["tree_shape"] == "auto"
    assert "Trees chosen by" in markdown_table(result)


def test_baseline_is_exactly_one_and_every_method_is_lossless(result):
    for row in result["summary"]:
        if row["method"] == "autoregressive":
            assert row["speedup_decode"] == {"median": 1.0, "min": 1.0, "max": 1.0}
            assert row["speedup_end_to_end"]["median"] == 1.0
            assert row["tau"] == 1.0  # one token per target forward
        assert row["identical"] and row["agreement"] == 1.0, row["method"]
    for run in result["runs"]:
        assert run["new_tokens"] == 8 and run["prompt_tokens"] == run["context"]
        # A draft can only add tokens per target forward (the self-draft's own passes through the target's layers
        # are not target forwards), and decode time is never a sliver of the call (no absurd speed-ups).
        assert run["target_forwards"] <= run["new_tokens"], run["method"]
        assert run["decode_seconds"] >= 0.1 * run["end_to_end_seconds"] - run["prefill_seconds"], run["method"]


def test_draft_cache_is_constant_while_the_target_cache_grows(result):
    rows = {(r["workload"], r["context"], r["method"]): r for r in result["summary"]}
    short, long = rows["code", 32, "longspec_tree"], rows["code", 96, "longspec_tree"]
    assert short["draft_cache_bytes"] == long["draft_cache_bytes"] > 0
    assert long["target_kv_bytes"] * 31 == short["target_kv_bytes"] * 95  # KV of the prompt but its last token
    assert rows["code", 96, "early_exit"]["draft_cache_bytes"] > rows["code", 32, "early_exit"]["draft_cache_bytes"]
    assert rows["code", 96, "prompt_lookup"]["draft_cache_bytes"] == 0


def test_the_default_method_is_the_draft_as_it_comes_and_variants_say_what_they_change(result):
    methods = {m["name"]: m for m in result["methods"]}
    assert methods["longspec"]["changed"] == [] and methods["longspec"]["prompt_lookup_num_tokens"] == 3
    assert methods["longspec_chain"]["changed"] == ["tree_shape"]
    assert methods["longspec_chain"]["prompt_lookup_num_tokens"] == 3  # the draft's other settings are kept
    assert methods["longspec_pv16"]["changed"] == ["specpv"]
    table = markdown_table(result)
    assert "- longspec: tree auto, 3-token lookup branch: the draft's own defaults" in table
    assert "- longspec_chain: tree [1, 1] (changed), 3-token lookup branch" in table


def test_lookup_variants_change_only_the_branch(corpus, draft):
    from longspec_hf.bench.methods import longspec

    target = tiny_target("llama")
    tokens = word_tokenizer()(corpus.read_text(), return_tensors="pt").input_ids[:, :80]
    names = [m.name for m in default_methods(target, draft, TREES, lookup_branches=[0, 5], self_draft_tree=None)]
    assert {"longspec_nolookup", "longspec_pl5", "longspec_chain_nolookup", "longspec_chain_pl5"} <= set(names)
    defaults, off = longspec(draft), longspec(draft, name="longspec_nolookup", lookup=0)
    defaults.generate(target, tokens, None, 12)
    assert draft.stats.lookup_rounds > 0  # the draft's own 3-token branch ran
    off.generate(target, tokens, None, 12)
    assert draft.stats.lookup_rounds == 0
    assert draft.generation_config.prompt_lookup_num_tokens == 3  # restored after the variant's call


def test_a_broken_method_is_caught(corpus):
    target = tiny_target("llama")

    def broken(target, input_ids, cache, max_new_tokens):
        out = autoregressive().generate(target, input_ids, cache, max_new_tokens)
        wrong = out.sequences.clone()
        wrong[0, -1] = (wrong[0, -1] + 1) % 95
        return MethodOutput(wrong)

    methods = [autoregressive(), Method("broken", broken)]
    result = run_bench(target, word_tokenizer(), methods, [Workload("code", str(corpus), "completion")],
                       BenchSettings([32], 6, 2, warmup=False), progress=False)
    rows = {r["method"]: r for r in result["summary"]}
    assert rows["autoregressive"]["identical"] and not rows["broken"]["identical"]
    assert rows["broken"]["agreement"] == 5 / 6  # the last of 6 tokens is wrong in every prompt
    assert "| broken |" in markdown_table(result) and "| NO |" in markdown_table(result)


def test_unavailable_methods_are_skipped_with_a_reason(corpus):
    target = tiny_target("llama")
    methods = default_methods(target, draft=None, early_exit_layer=5)
    result = run_bench(target, word_tokenizer(), methods, [Workload("code", str(corpus), "completion")],
                       BenchSettings([32], 4, 1, warmup=False), progress=False)
    reasons = {s["method"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"early_exit", "longspec", "longspec_chain", "longspec_tree"}
    assert "--draft" in reasons["longspec_tree"] and "2-layer" in reasons["early_exit"]
    assert "Skipped longspec_chain" in markdown_table(result)


def test_outputs_json_markdown_and_plots(result, tmp_path):
    paths = write_outputs(result, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["schema"] == SCHEMA
    assert "| code | 96 | longspec_tree |" in paths["markdown"].read_text()
    for name in ("speedup", "draft_cache"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_draft_cache_curves_are_drawn_once(result):
    from longspec_hf.bench.report import draft_cache_curves

    methods = list(dict.fromkeys(r["method"] for r in result["summary"]))
    labels = [label for label, _ in draft_cache_curves(result["summary"], methods)]
    assert "longspec, longspec_chain, longspec_tree and 1 more (same)" in labels  # the pv16 variant too
    assert len(labels) == len(set(labels)) and not any(label == "longspec_chain" for label in labels)


def test_cli_end_to_end(corpus, draft, tmp_path):
    target = tiny_target("llama")
    target.save_pretrained(tmp_path / "target")
    word_tokenizer().save_pretrained(tmp_path / "target")
    draft.save_pretrained(tmp_path / "draft")
    cli(["bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--workloads",
         f"text={corpus}", "--contexts", "40", "--prompts", "1", "--max-new-tokens", "5", "--tree", "chain=1,1",
         "--methods", "autoregressive", "chain", "--output-dir", str(tmp_path / "out"), "--attn-backend", "torch"])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["method"] for r in result["summary"]] == ["autoregressive", "chain"]
    assert all(r["identical"] for r in result["summary"])


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records))


def test_longbench_loader_reads_the_archive_layout(tmp_path):
    words = [f"w{i % 90 + 2}" for i in range(400)]
    record = {"input": "w7 w8", "context": " ".join(words), "answers": ["w9"], "length": 400, "dataset": "qmsum",
              "language": "en", "all_classes": None, "_id": "x"}
    write_jsonl(tmp_path / "qmsum.jsonl", [{**record, "context": "w5 w6"}, record, record])
    tokenizer = word_tokenizer()
    workload = parse_workload("qmsum", longbench=str(tmp_path))
    prompts = workload.prompts(tokenizer, 128, 5)
    assert len(prompts) == 2  # the short record cannot fill a 128-token context and is left out
    assert all(p.shape == (1, 128) for p in prompts)
    full = tokenizer(qmsum_text(record), add_special_tokens=False).input_ids
    assert prompts[0][0].tolist() == full[:64] + full[-64:]  # cut in the middle, both ends kept
    with pytest.raises(FileNotFoundError, match="<task>.jsonl"):
        parse_workload("gov_report", longbench=str(tmp_path)).prompts(tokenizer, 128, 1)
    with pytest.raises(ValueError, match="shorter context"):
        workload.prompts(tokenizer, 4096, 1)


def qmsum_text(record):
    from longspec_hf.bench import LONGBENCH_TEMPLATES

    return LONGBENCH_TEMPLATES["qmsum"].format(context=record["context"], input=record["input"])


def test_middle_truncate_and_bad_workload():
    assert middle_truncate(list(range(10)), 4) == [0, 1, 8, 9]
    assert middle_truncate([1, 2], 4) == [1, 2]
    with pytest.raises(ValueError, match="NAME=SOURCE"):
        parse_workload("nonsense")
    assert parse_workload("mine=/data/x.txt@summarization").kind == "summarization"


# ------------------------------------------------------------------------------------ devices and the compiled baseline


class ElsewhereTarget(torch.nn.Module):
    """A target that says it lives on another device ("meta": not the CPU, and no accelerator needed) and records
    the device of every input it is given."""

    base_model_prefix = "model"

    def __init__(self):
        super().__init__()
        self.devices = []

    @property
    def device(self):
        return torch.device("meta")

    def forward(self, input_ids, **kwargs):
        self.devices.append(input_ids.device)


def test_warm_up_moves_its_prompt_to_the_targets_device():
    target, seen = ElsewhereTarget(), []

    def generate(target, input_ids, cache, max_new_tokens):
        seen.append(input_ids.device)
        return MethodOutput(torch.zeros(1, input_ids.shape[1] + max_new_tokens, dtype=torch.long))

    warm_up(target, [Method("m", generate)], torch.arange(100)[None])  # a prompt on the CPU, as workloads make them
    assert target.devices == [torch.device("meta")] and seen == [torch.device("meta")]


def test_bench_refuses_random_targets():
    with pytest.raises(SystemExit, match="longspec cost"):
        cli(["bench", "--target", "random:llama-3-8b"])


def test_static_cache_baseline_and_per_context_warm_up(corpus):
    target, calls = tiny_target("llama"), []

    def recorded(target, input_ids, cache, max_new_tokens):
        calls.append((input_ids.shape[1], max_new_tokens))
        return autoregressive().generate(target, input_ids, cache, max_new_tokens)

    # The static cache without compiling (compiling is the slow test below): same tokens, one forward per token.
    methods = [autoregressive(), compiled_static(target, compile=False), Method("w", recorded, warmup="per_context")]
    result = run_bench(target, word_tokenizer(), methods, [Workload("code", str(corpus), "completion")],
                       BenchSettings([32, 48], 6, 2), progress=False)
    rows = {(r["context"], r["method"]): r for r in result["summary"]}
    assert all(r["identical"] for r in result["summary"])
    assert rows[32, "autoregressive_compiled"]["tau"] == 1.0
    # One full untimed call per context length (none in the short warm-up), then one per prompt.
    assert calls == [(32, 6)] * 3 + [(48, 6)] * 3


@pytest.mark.slow
def test_compiled_baseline_gives_the_same_tokens(corpus):
    """transformers' compiled decoding on CPU (a minute or more of compiling)."""
    from torch._dynamo.utils import counters

    target = tiny_target("llama")
    methods = [autoregressive(), compiled_static(target)]
    counters.clear()
    result = run_bench(target, word_tokenizer(), methods, [Workload("code", str(corpus), "completion")],
                       BenchSettings([32], 6, 2), progress=False)
    compiled = next(r for r in result["summary"] if r["method"] == "autoregressive_compiled")
    assert compiled["identical"] and compiled["tau"] == 1.0
    assert counters["stats"]["unique_graphs"] > 0  # generate() did compile the decode step
    assert next(m for m in result["methods"] if m["name"] == "autoregressive_compiled")["cache_implementation"] \
        == "static"
