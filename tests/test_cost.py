"""`longspec cost` on tiny models (what is measured and how it is reported, never how fast), `random:` targets, and
the command line: instant help that imports nothing heavy, one-line refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import COMMON, tiny_target

from longspec_hf import LongSpecDraftModel, SelfDraft
from longspec_hf.cli import main as cli
from longspec_hf.cost import SCHEMA, CostSettings, markdown_table, per_unit, run_cost, write_outputs
from longspec_hf.cost.runner import drafting_with, random_prompt, short_call_tokens, time_call
from longspec_hf.loading import load_causal_lm, random_causal_lm, shipped_configs

TREES = {"chain": [1, 1], "tree": [2, 2]}
PARTS = {"draft", "verify", "accept", "commit", "other"}


def loop_reports_parts() -> bool:
    from longspec_hf.generation import SpeculativeStats

    return hasattr(SpeculativeStats(), "timings")


@pytest.fixture(scope="module")
def drafters():
    target = tiny_target("llama")
    torch.manual_seed(0)
    return {"longspec": LongSpecDraftModel.from_target(target, sink_size=4, window_size=16),
            "self_draft": SelfDraft.from_target(target, window_size=16)}


@pytest.fixture(scope="module")
def result(drafters):
    settings = CostSettings(contexts=[32, 64], trees=TREES, rounds=3, repeats=1, kernel_queries=[1, 4],
                            kernel_repeats=1)
    return run_cost(tiny_target("llama"), drafters, settings, progress=False)


def test_per_unit_cancels_what_every_call_pays_once():
    # 1.0 s per call, 0.5 s per round of which 0.1 drafting and 0.3 verifying (0.1 left for the rest of the loop).
    short = {"seconds": 1.0 + 3 * 0.5, "units": 3, "timings": {"draft": 0.3, "verify": 0.9}, "tau": 1.0}
    long = {"seconds": 1.0 + 10 * 0.5, "units": 10, "timings": {"draft": 1.0, "verify": 3.0}, "tau": 1.1}
    got = per_unit(short, long)
    assert got["seconds"] == pytest.approx(0.5)
    assert got["parts"] == pytest.approx({"draft": 0.1, "verify": 0.3, "other": 0.1})
    assert got["units"] == 7 and got["tau"] == 1.1
    # A loop that reports no parts; a long call with no more rounds than the short one (falls back to one call).
    assert per_unit({**short, "timings": {}}, {**long, "timings": {}})["parts"] is None
    assert per_unit(long, {**long, "seconds": 5.0})["seconds"] == pytest.approx(0.5)
    # Noise above the rounds' time (the short call took longer): the long call alone, never a negative round.
    assert per_unit({**short, "seconds": 7.0}, long)["seconds"] == pytest.approx(0.6)


def test_short_call_outlasts_the_deepest_tree():
    assert short_call_tokens({"a": [1, 1, 1], "b": [4, 16, 16, 16, 16]}) == 7
    assert short_call_tokens({}) == 2


def test_time_call_leaves_the_prompt_cache_and_the_drafter_as_they_were(drafters):
    from longspec_hf.bench.runner import prefill

    target, draft = tiny_target("llama"), drafters["longspec"]
    ids = random_prompt(COMMON["vocab_size"], 40, 0, target.device)
    cache, _ = prefill(target, ids)
    keys = [layer.keys.clone() for layer in cache.layers]
    saved = list(draft.generation_config.tree_shape), getattr(draft.generation_config, "profile_rounds", False)
    plain = time_call(target, ids, cache, 5)
    with drafting_with(draft, [2, 2]):
        speculative = time_call(target, ids, cache, 5, draft)
    assert (list(draft.generation_config.tree_shape), getattr(draft.generation_config, "profile_rounds", False)) \
        == saved
    assert cache.get_seq_length() == 39 and all(torch.equal(a.keys, b) for a, b in zip(cache.layers, keys,
                                                                                        strict=True))
    assert plain["units"] == 5 and 1 <= speculative["units"] <= 4  # the first token comes from the prefill
    if loop_reports_parts():
        assert set(speculative["timings"]) == PARTS - {"other"}


def test_cost_result_schema_and_break_even(result):
    assert result["schema"] == SCHEMA
    env = result["environment"]
    assert {"torch", "transformers", "device", "dtype", "threads", "layers", "heads", "kv_heads"} <= set(env)
    assert (env["heads"], env["kv_heads"], env["head_dim"], env["layers"]) == (4, 2, 16, 2)
    assert env["drafters"] == {"longspec": "LongSpecDraftModel", "self_draft": "SelfDraft"}
    assert result["settings"]["short_call_tokens"] == 4 and result["settings"]["long_call_tokens"] == 7
    assert [p["context"] for p in result["plain"]] == [32, 64]
    assert len(result["rounds"]) == 2 * 2 * 2  # contexts x drafters x trees
    steps = {p["context"]: p["step_ms"] for p in result["plain"]}
    for row in result["rounds"]:
        assert row["break_even_tau"] == pytest.approx(row["round_ms"] / steps[row["context"]])
        assert row["nodes"] == 1 + sum(row["tree_shape"]) and row["rounds"] >= 1
        if loop_reports_parts():
            assert set(row["parts_ms"]) == PARTS
            assert sum(row["parts_ms"].values()) == pytest.approx(row["round_ms"])
        else:
            assert row["parts_ms"] is None
    json.dumps(result)


def test_kernel_table_covers_every_backend_and_the_decode_reference(result):
    from longspec_hf.attention import available_backends

    kernels = {(k["context"], k["kernel"], k["queries"]) for k in result["kernels"]}
    expected = {(c, "sdpa_decode", 1) for c in (32, 64)}
    expected |= {(c, b, q) for c in (32, 64) for b in available_backends("cpu") for q in (1, 4)}
    assert kernels == expected
    assert all(k["ms"] > 0 for k in result["kernels"])


def test_outputs_json_markdown_and_plot_without_switching_the_backend(result, tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    paths = write_outputs(result, tmp_path / "out")
    assert matplotlib.get_backend() == backend
    assert json.loads(paths["json"].read_text())["schema"] == SCHEMA
    text = paths["markdown"].read_text()
    assert "| context | plain ms/token | longspec chain [1,1] | longspec tree [2,2] | self_draft chain [1,1] |" in text
    assert "| 64 | self_draft | tree | 5 |" in text and "SDPA decode attention, q=1 (reference)" in text
    assert paths["cost"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown_table({**result, "kernels": []}).count("| context |") == 2  # no kernel table without kernels
    noisy = {**result, "rounds": [{**result["rounds"][0], "round_ms": -1.0}, *result["rounds"][1:]]}
    assert "timing noise" in markdown_table(noisy) and "timing noise" not in markdown_table(
        {**result, "rounds": [{**r, "round_ms": 1.0} for r in result["rounds"]],
         "plain": [{**p, "step_ms": 1.0} for p in result["plain"]]})


def tiny_config(tmp_path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**COMMON, "model_type": "llama", "max_position_embeddings": 64}))
    return str(path)


def test_random_targets_from_a_config_file(tmp_path):
    name = f"random:{tiny_config(tmp_path)}"
    target, tokenizer = load_causal_lm(name, dtype="bf16", device="cpu", min_positions=100)
    assert tokenizer is None and target.dtype == torch.bfloat16 and not target.training
    assert target.config.max_position_embeddings == 100  # random weights: the limit follows the longest context
    assert target.config._name_or_path == name and target.generation_config.eos_token_id is None
    same, _ = load_causal_lm(name, device="cpu")
    assert torch.equal(target.lm_head.weight.float(), same.lm_head.weight.to(torch.bfloat16).float())  # seeded
    with pytest.raises(ValueError, match="random:llama-3-8b"):
        load_causal_lm("random:no-such-model")


@pytest.mark.parametrize("name, billions", [("llama-3-8b", 8.03), ("qwen2.5-7b", 7.62), ("qwen3-8b", 8.19)])
def test_shipped_configs_have_the_real_models_shapes(name, billions):
    assert name in shipped_configs()
    model = random_causal_lm(name, torch.bfloat16, "meta")  # shapes only, nothing allocated
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.005)
    assert model.dtype == torch.bfloat16


def test_cost_command_end_to_end_on_a_random_target(tmp_path):
    cli(["cost", "--target", f"random:{tiny_config(tmp_path)}", "--device", "cpu", "--contexts", "24", "80",
         "--trees", "c=1,1", "--rounds", "2", "--repeats", "1", "--kernel-queries", "4", "--kernel-repeats", "1",
         "--attn-backend", "torch", "--output-dir", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["environment"]["dtype"] == "float32"  # auto: fp32 on CPU
    assert result["environment"]["tree_attn_backend"] == "torch"
    assert [(r["context"], r["tree"]) for r in result["rounds"]] == [(24, "c"), (80, "c")]  # 80 > the config's 64
    assert (tmp_path / "out" / "cost.png").exists()


def test_a_round_without_a_tree_is_timed_next_to_the_plain_step(tmp_path):
    """`--trees none=none`: rounds that draft nothing, the plain decode steps "auto" takes where drafting does not
    pay; their break-even tau is their cost over a plain generate() step."""
    from longspec_hf_cli import parse_tree

    assert parse_tree("none=none") == ("none", []) and parse_tree("x=None") == ("x", [])
    cli(["cost", "--target", f"random:{tiny_config(tmp_path)}", "--device", "cpu", "--contexts", "24",
         "--trees", "none=none", "c=1", "--rounds", "2", "--repeats", "1", "--kernel-queries", "--output-dir",
         str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["tree"]: row for row in result["rounds"] if row["drafter"] == "longspec"}
    assert rows["none"]["tree_shape"] == [] and rows["none"]["nodes"] == 1
    assert rows["none"]["tau"] == 1.0  # nothing drafted, nothing accepted: one token per round
    assert "none" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("command", ["cost", "bench"])
def test_cuda_without_cuda_is_one_line_naming_the_fix(monkeypatch, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        cli([command, "--target", "toy:llama", "--device", "cuda"])
    message = str(exit_info.value)
    assert message.startswith(f"longspec {command}: --device cuda") and "--device cpu" in message
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------- the command line


def test_help_imports_neither_torch_nor_transformers():
    script = (
        "import sys, longspec_hf_cli\n"
        "for argv in ([], ['bench'], ['cost'], ['convert'], ['push']):\n"
        "    try:\n"
        "        longspec_hf_cli.main(argv + ['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'longspec_hf') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", ["bench", "cost"])
def test_every_option_has_help_and_a_shown_default(command):
    import longspec_hf_cli

    parser = longspec_hf_cli.build_parser(command)
    sub = parser._subparsers._group_actions[0].choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.dest in ("help", "run") or action.required:
            continue
        assert action.help, action.dest
        assert "default" in formatter._get_help_string(action), action.dest


def test_target_help_lists_the_offline_names():
    import longspec_hf_cli
    from longspec_hf.cost import DEFAULT_TREES
    from longspec_hf.toy import toy_families

    # The command line keeps its own copies (it imports nothing heavy): they must not drift.
    assert longspec_hf_cli.TOY_FAMILIES == tuple(toy_families()) and longspec_hf_cli.DEFAULT_TREES == DEFAULT_TREES
    text = longspec_hf_cli.target_help(random_targets=True)
    names = ["offline:smollm2", *(f"toy:{f}" for f in toy_families()), *(f"random:{n}" for n in shipped_configs())]
    assert all(name in text for name in names) and "random:<path/to/config.json>" in text
    assert "random:" not in longspec_hf_cli.target_help(random_targets=False)


def test_auto_reads_a_cost_report_instead_of_measuring(result, drafters, tmp_path, monkeypatch):
    """`generation_config.cost_report`: the JSON `longspec cost` wrote feeds tree_shape="auto"'s cost model."""
    from longspec_hf.cost_model import CostModel

    model = CostModel()
    added = model.add_cost_report(result, "longspec")
    assert added == len(result["plain"]) + 3 * sum(r["drafter"] == "longspec" for r in result["rounds"])
    assert model.has_near("verify", 1, 32) and model.has_near("draft", 1, 64) and model.curve("rest", 1, 64).sizes

    monkeypatch.setenv("LONGSPEC_HF_CACHE", str(tmp_path))  # nothing measured before
    report = tmp_path / "results.json"
    report.write_text(json.dumps(result))
    target, draft = tiny_target("llama"), drafters["longspec"]
    saved = draft.generation_config.tree_shape
    draft.generation_config.tree_shape, draft.generation_config.cost_report = "auto", str(report)
    try:
        ids = torch.randint(2, 90, (1, 40), generator=torch.Generator().manual_seed(3))
        out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=8)
    finally:
        draft.generation_config.tree_shape, draft.generation_config.cost_report = saved, None
    assert torch.equal(out, target.generate(ids, do_sample=False, max_new_tokens=8))
    assert draft.stats.measure_seconds == 0  # the report covers this context
