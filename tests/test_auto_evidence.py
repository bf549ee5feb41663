"""auto's evidence: recorded from real calls, replayed exactly (the replay of the shipped constants reproduces what
the live models predicted), and scored fairly (an estimator that fits the events scores better)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from conftest import GPU_LIKE, OracleDrafter, plain_greedy, random_prompt, tiny_target

import longspec_hf_cli
from longspec_hf import auto_evidence, cli
from longspec_hf.tree import AUTO


@pytest.fixture
def recorded(device_costs):
    """Two calls of one drafter (its acceptance model carried from the first call to the second), right but for
    every 7th position."""
    device_costs(**GPU_LIKE)
    target = tiny_target("llama")
    oracle, stats = None, []
    with auto_evidence.recording() as evidence:
        for seed in (3, 4):
            ids = random_prompt(60, seed=seed)
            expected = plain_greedy(target, ids, max_new_tokens=40)
            if oracle is None:
                oracle = OracleDrafter(target, expected, AUTO, corrupt_every=7)
            oracle.references = [expected.flatten()]
            out = target.generate(ids, assistant_model=oracle, do_sample=False, max_new_tokens=40)
            assert torch.equal(out, expected)  # recording changes nothing
            stats.append(oracle.stats)
    return evidence, oracle, stats


def test_every_round_of_every_call_is_recorded(recorded):
    evidence, _, stats = recorded
    assert len(evidence.calls) == 2
    for call, call_stats in zip(evidence.calls, stats, strict=True):
        assert len(call) == call_stats.rounds
        assert sum(r["accepted"] for r in call) == call_stats.accepted_tokens
        assert sum(len(r["observations"]) for r in call) > 0


def test_the_replay_of_the_shipped_constants_reproduces_the_live_models(recorded):
    evidence, oracle, stats = recorded
    *_, replayed = auto_evidence.acceptance_loss(evidence)
    live = oracle._auto_acceptance
    for name in ("hits", "trials"):  # [rank class][bin]
        flat = [v for row in getattr(live, name) for v in row]
        assert [v for row in getattr(replayed, name) for v in row] == pytest.approx(flat)
    for name in ("rank_hits", "rank_trials"):  # [depth][rank]
        flat = [v for row in getattr(live, name) for v in row]
        assert [v for row in getattr(replayed, name) for v in row] == pytest.approx(flat)
    assert sum(live.trials[0]) > sum(replayed.__class__().trials[0])  # it did learn
    for call, call_stats in zip(evidence.calls, stats, strict=True):
        predicted = sum(p for p, _, _ in auto_evidence.scaled_rounds(call))
        assert predicted == pytest.approx(call_stats.predicted_accepted)


def test_an_estimator_that_fits_the_events_scores_better():
    def round_(h, accepted, beyond=None):
        return {"rows": 1, "context": 100, "paths": [[h], [h, h]], "accepted": accepted, "lookup_beyond": beyond,
                "observations": [([h, 0.01], [accepted > 0, False], 0)]}

    # Predicted 0.5 + 0.25 per round, always accepted 2: a scale must learn it, more the faster it may.
    evidence = auto_evidence.Evidence()
    evidence.calls = [[round_(0.5, 2, beyond=3.0) for _ in range(30)]]
    none, bias_none, count = auto_evidence.scale_error(evidence, rate=0.0)
    shipped, bias_shipped, _ = auto_evidence.scale_error(evidence)
    assert count == 30 and bias_none == pytest.approx(-1.25) and shipped < none and bias_none < bias_shipped < 0
    # A steady branch: a right prior predicts it exactly; from a wrong one, a short memory gets there sooner.
    assert auto_evidence.lookup_error(evidence, prior=3.0)[0] == 0.0
    assert auto_evidence.lookup_error(evidence, prior=0.0, memory=1)[0] < auto_evidence.lookup_error(
        evidence, prior=0.0, memory=1000)[0]
    # Always accepted at q = 0.5: the calibration learns it, the prior alone would say 0.5.
    h_loss, _, count, model = auto_evidence.acceptance_loss(evidence)
    assert count == 60 and model.h(0.5) > 0.9 and h_loss < auto_evidence.log_loss(0.5, True)


def test_cost_curves_replayed_on_a_linear_device_predict_it():
    rows = [[1000.0, float(n), 0.01 + 0.001 * n, 1.0] for n in (1, 8, 32)]
    rows += [[1000.0 + 10 * i, float(n), 0.01 + 0.001 * n, 0.0] for i, n in enumerate([2, 5, 9, 17, 30] * 6)]
    evidence = auto_evidence.Evidence()
    evidence.cost_samples = [{"verify/1": rows}]
    error, count, fit_ms = auto_evidence.cost_error(evidence, stride=1)
    assert count == 30 and error < 0.05 and fit_ms > 0


def test_eval_records_and_replays_evidence(tmp_path, capsys):
    path = tmp_path / "evidence.json"
    parser = argparse.ArgumentParser()
    longspec_hf_cli.add_eval_arguments(parser)
    args = parser.parse_args(["--target", "toy:llama", "--draft", "self", "--contexts", "24", "--max-new-tokens",
                              "6", "--prompts", "2", "--tree-shape", "auto", "--auto-evidence", str(path)])
    cli.eval_command(args)
    out = capsys.readouterr().out
    assert "| as shipped |" in out and "| rate 0.2 (as shipped) |" in out and "ms per fit" in out
    evidence = auto_evidence.load(str(path))
    assert len(evidence.calls) == 4  # 2 domains x 2 prompts
    auto_evidence.main([str(path)])
    assert auto_evidence.replay(evidence).split("| cost curves")[0] in capsys.readouterr().out  # (fit times vary)
    with pytest.raises(SystemExit, match="usage"):
        auto_evidence.main([])
    assert all(math.isfinite(v) for v in auto_evidence.acceptance_loss(evidence)[:2])


def frozen_samples(verify, draft):
    from conftest import FrozenCost

    return FrozenCost(verify, draft).samples


def test_modelled_runs_depend_on_the_constants_only():
    """On a frozen device the policy's decisions depend on the text and its constants, not on the clock: the same
    run twice is the same to the round, and output stays plain generate()'s."""
    from conftest import CPU_LIKE

    from longspec_hf import SelfDraft

    target = tiny_target("llama")
    draft = SelfDraft.from_target(target)
    draft.generation_config.tree_shape = "auto"
    prompts = [random_prompt(50, seed=s) for s in (1, 2)]
    samples = frozen_samples(**CPU_LIKE)
    def run(*caches):  # everything but the policy's own host time, which is measured
        out = auto_evidence.modelled_run(target, draft, prompts, samples, 12, *caches)
        assert out.pop("policy_ms_per_round") > 0
        return out

    first = run()
    assert first == run()
    assert first["tokens"] == 2 * 11 and first["seconds"] > 0  # the rounds' tokens (the prefill makes the first)
    caches = auto_evidence.prompt_caches(target, prompts)
    for _ in range(2):  # continued from the prompts' caches (copies): the same run
        assert run(caches) == first
    with auto_evidence.frozen_device(target, draft, samples), auto_evidence.policy_constants(HORIZON=1):
        out = target.generate(prompts[0], assistant_model=draft, do_sample=False, max_new_tokens=12)
    assert torch.equal(out, plain_greedy(target, prompts[0], max_new_tokens=12))
    assert auto_evidence.auto_tree.HORIZON == 4  # restored
    table = auto_evidence.policy_table(target, draft, prompts, samples, 12, {"as shipped": {}, "H1": {"HORIZON": 1}})
    assert "| as shipped | 1.000 |" in table and "| H1 |" in table
    with auto_evidence.policy_constants(RANK_CLASSES=1):
        assert auto_evidence.acceptance.AcceptanceModel().rank_classes == 1
    assert auto_evidence.acceptance.AcceptanceModel().rank_classes == 2
    with pytest.raises(ValueError, match="no constant"):
        with auto_evidence.policy_constants(NOPE=1):
            pass


def test_a_round_costs_its_draft_forwards_verification_and_rest_on_the_model():
    model = auto_evidence.CostModel()
    model.samples = frozen_samples(verify=lambda n: 1.0 + 0.5 * (n - 1), draft=lambda m: 0.25 * m)
    round_ = {"rows": 1, "context": 1000, "drafted": [1, 2], "nodes": 4}
    assert auto_evidence.modelled_seconds(round_, model) == pytest.approx(0.25 + 0.5 + 2.5)


def test_policy_command_runs_named_variants_on_a_recorded_device(tmp_path, capsys):
    from conftest import CPU_LIKE

    evidence = auto_evidence.Evidence()
    evidence.cost_samples = [frozen_samples(**CPU_LIKE)]
    path = tmp_path / "device.json"
    auto_evidence.save(evidence, str(path))
    auto_evidence.main(["policy", "--target", "toy:llama", "--draft", "self", "--device-samples", str(path),
                        "--contexts", "24", "--prompts", "1", "--max-new-tokens", "4",
                        "--variant", "narrow=WIDTHS:(1, 2);HORIZON:1"])
    out = capsys.readouterr().out
    assert "| as shipped | 1.000 |" in out and "| narrow |" in out
