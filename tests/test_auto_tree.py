"""tree_shape="auto": lossless whatever it decides, and it decides from the cost and acceptance models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CPU_LIKE, FAMILIES, GPU_LIKE, FrozenCost, OracleDrafter, plain_greedy, random_prompt, tiny_target

import longspec_hf.acceptance as acceptance
import longspec_hf.auto_tree as auto_tree
import longspec_hf.cost_model as cost_model
from longspec_hf import LongSpecDraftModel, SelfDraft
from longspec_hf.acceptance import AcceptanceModel, monotone
from longspec_hf.cost_model import CostModel, Curve, plot_curves
from longspec_hf.tree import AUTO, AUTO_ENVELOPE, tree_setting


def test_setting_parses_auto_and_defaults_to_it():
    assert tree_setting(None) == AUTO and tree_setting("Auto") == AUTO
    assert tree_setting("1,1") == (1, 1)
    with pytest.raises(ValueError, match="'auto'"):
        tree_setting("x")


def test_new_drafts_and_self_drafts_default_to_auto():
    target = tiny_target("llama")
    assert LongSpecDraftModel.from_target(target).generation_config.tree_shape == AUTO
    assert SelfDraft.from_target(target).generation_config.tree_shape == AUTO


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("costs", ["gpu_like", "cpu_like", "measured"])
def test_auto_is_lossless_on_every_family(family, costs, device_costs):
    if costs != "measured":
        device_costs(**(GPU_LIKE if costs == "gpu_like" else CPU_LIKE))
    target = tiny_target(family)
    ids = random_prompt(60, seed=3)
    expected = plain_greedy(target, ids, max_new_tokens=24)
    for draft in (LongSpecDraftModel.from_target(target, sink_size=2, window_size=16), SelfDraft.from_target(target)):
        draft.generation_config.tree_shape = "auto"
        out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=24)
        assert torch.equal(out, expected)
        assert sum(draft.stats.tree_shapes.values()) == draft.stats.rounds


def test_a_confident_draft_gets_deep_trees_where_verification_is_cheap(device_costs):
    device_costs(**GPU_LIKE)
    target = tiny_target("llama")
    ids = random_prompt(40, seed=5)
    expected = plain_greedy(target, ids, max_new_tokens=40)
    oracle = OracleDrafter(target, expected, AUTO)
    out = target.generate(ids, assistant_model=oracle, do_sample=False, max_new_tokens=40)
    assert torch.equal(out, expected)
    assert oracle.stats.tau > 4  # the oracle is right every time: auto drafts deep
    depths = {len(name.split(",")) for name in oracle.stats.tree_shapes if name != "none"}
    assert max(depths) >= 5


def test_a_confidently_wrong_draft_is_learnt_and_not_paid_for_where_every_node_costs(device_costs):
    device_costs(**CPU_LIKE)
    target = tiny_target("llama")
    ids = random_prompt(40, seed=5)
    expected = plain_greedy(target, ids, max_new_tokens=60)
    corrupt = OracleDrafter(target, expected, AUTO, corrupt_every=1)  # sure of itself, and always wrong
    out = target.generate(ids, assistant_model=corrupt, do_sample=False, max_new_tokens=60)
    assert torch.equal(out, expected)
    shapes = corrupt.stats.tree_shapes
    assert shapes.get("none", 0) < corrupt.stats.rounds  # it trusted the draft's confidence at first ...
    assert shapes.get("none", 0) >= 0.75 * corrupt.stats.rounds  # ... then took plain steps, bar explorations
    assert corrupt.stats.predicted_accepted < 10


NEVER_PAYS = dict(verify=lambda n: 1.0 + 5.0 * (n - 1), draft=lambda m: 2.0)  # a node or a draft forward: dear


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_round_without_a_tree_is_a_plain_decode_step(family, device_costs, monkeypatch):
    """Where drafting does not pay, "auto" takes plain steps: the target's own attention over one token, as plain
    generate() runs it (never the tree attention), and ever fewer draft forwards to keep learning."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from longspec_hf import HYBRID_ATTENTION_NAME

    device_costs(**NEVER_PAYS)
    target = tiny_target(family)
    ids = random_prompt(60, seed=3)  # longer than Mistral's window: its own sliding-window mask in every step
    expected = plain_greedy(target, ids, max_new_tokens=60)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=16)
    draft.load_state_dict(draft.state_dict())  # "given weights": no untrained-draft warning
    queries = {"sdpa": [], HYBRID_ATTENTION_NAME: []}
    for name in queries:
        original = ALL_ATTENTION_FUNCTIONS[name]

        def spy(module, query, *args, _name=name, _original=original, **kwargs):
            queries[_name].append(query.shape[2])
            return _original(module, query, *args, **kwargs)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, name, spy)
    draft_forwards = []
    hook = draft.register_forward_hook(lambda *args: draft_forwards.append(1))
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=60)
    hook.remove()
    assert torch.equal(out, expected)
    rounds, layers = draft.stats.rounds, target.config.num_hidden_layers
    assert draft.stats.tree_shapes == {"none": rounds} and rounds == 59
    assert queries[HYBRID_ATTENTION_NAME] == []
    assert queries["sdpa"] == [60] * layers + [1] * (rounds * layers)  # the prefill, then one token per round
    # One level drafted after 4, 8, 16 rounds without a tree (rounds 4, 12 and 28), not every 4th round.
    assert len(draft_forwards) == 3


def test_auto_with_batches_left_padding_and_a_finished_row(device_costs):
    device_costs(**GPU_LIKE)
    target = tiny_target("qwen2")
    ids = torch.cat([random_prompt(30, seed=1), random_prompt(30, seed=2)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    expected = plain_greedy(target, ids, attention_mask=mask, max_new_tokens=20)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=16)
    out = target.generate(ids, attention_mask=mask, assistant_model=draft, do_sample=False, max_new_tokens=20)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("drafter", ["longspec", "self"])
def test_auto_with_specpv_partial_verification(drafter, device_costs):
    device_costs(**GPU_LIKE)
    target = tiny_target("llama")
    ids = random_prompt(200, seed=2)
    expected = plain_greedy(target, ids, max_new_tokens=30)
    draft = (SelfDraft.from_target(target, sink_size=2, window_size=24) if drafter == "self"
             else LongSpecDraftModel.from_target(target, sink_size=2, window_size=24))
    draft.generation_config.tree_shape = AUTO
    # A retrieval budget covering the whole context: partial verification reads everything, so it is exact.
    draft.generation_config.specpv = {"block_size": 4, "sink_blocks": 1, "retrieval_blocks": 1000,
                                      "window_blocks": 2, "refresh_interval": 5}
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=30)
    assert torch.equal(out, expected)
    assert draft.stats.partial_verifications > 0


def test_first_use_measures_once_and_leaves_the_state_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSPEC_HF_CACHE", str(tmp_path))
    target = tiny_target("mistral")
    ids = random_prompt(80, seed=8)
    expected = plain_greedy(target, ids, max_new_tokens=12)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=16)
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=12)
    assert torch.equal(out, expected)  # the timed forwards left no trace in the target's or the draft's cache
    assert draft.stats.measure_seconds > 0
    files = list((tmp_path / "cost").glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["key"]["versions"]["torch"] == torch.__version__
    assert {name.split("/")[0] for name in stored["samples"]} == {"verify", "draft", "rest"}
    # Same context again, in this process and in a new one (the file): nothing is measured.
    target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=12)
    assert draft.stats.measure_seconds == 0
    cost_model._MODELS.clear()
    target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=12)
    assert draft.stats.measure_seconds == 0
    # A context far from the measured one is measured again.
    target.generate(random_prompt(400, seed=8), assistant_model=draft, do_sample=False, max_new_tokens=4)
    assert draft.stats.measure_seconds > 0


@pytest.mark.parametrize("factor", [1e-4, 1e4])
def test_the_timing_cache_on_disk_never_changes_the_output(tmp_path, monkeypatch, factor):
    """Whatever the stored timings say (here: verification made 10^4 times cheaper or dearer than measured, so other
    trees win), the output is plain generate()'s; only the trees verified change."""
    monkeypatch.setenv("LONGSPEC_HF_CACHE", str(tmp_path))
    target = tiny_target("qwen3")
    ids = random_prompt(60, seed=3)
    expected = plain_greedy(target, ids, max_new_tokens=20)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=16)
    target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=4)  # measures, writes the file
    (path,) = (tmp_path / "cost").glob("*.json")
    stored = json.loads(path.read_text())
    for name, samples in stored["samples"].items():
        if name.startswith("verify"):
            stored["samples"][name] = [[context, size, seconds * factor, anchor]
                                       for context, size, seconds, anchor in samples]
    path.write_text(json.dumps(stored))
    cost_model._MODELS.clear()
    out = target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=20)
    assert draft.stats.measure_seconds == 0  # the edited file was used
    assert torch.equal(out, expected)


def test_a_cost_file_from_other_versions_is_ignored(tmp_path):
    key = {"versions": {"torch": "1"}}
    model = CostModel.load(key, tmp_path)
    model.add("verify", 1, 100, 1, 0.5, anchor=True)
    model.save()
    assert CostModel.load(key, tmp_path).has_near("verify", 1, 110)
    assert not CostModel.load({"versions": {"torch": "2"}}, tmp_path).has_near("verify", 1, 110)
    model.path.write_text("{not json")
    assert not CostModel.load(key, tmp_path).samples  # a corrupt file is a missing one


def test_cost_curve_interpolates_resists_outliers_and_ignores_far_contexts():
    model = CostModel()
    for seconds in (0.10, 0.11, 0.10, 5.0):  # one round paused by something else
        model.add("verify", 1, 4000, 1, seconds)
    model.add("verify", 1, 4000, 9, 0.30, anchor=True)
    model.add("verify", 1, 1000, 5, 0.01)  # another context: not this curve's business
    curve = model.curve("verify", 1, 4100)
    assert curve.sizes == [1, 9]
    assert curve(1) == pytest.approx(0.10) and curve(5) == pytest.approx(0.20) and curve(17) == pytest.approx(0.50)
    assert model.curve("verify", 3, 4100)(1) == pytest.approx(0.10)  # nearest batch size measured
    assert Curve([], [])(3) == 0.0


def test_acceptance_model_calibrates_and_stays_monotone():
    model = AcceptanceModel()
    for i in range(400):  # the draft says 0.5 but is right one time in five
        model.observe([0.5, 0.2], [i % 5 == 0, False])
    assert model.h(0.5) == pytest.approx(0.2, abs=0.03)
    assert model.rank_rate(0) == pytest.approx(0.2, abs=0.03) and model.rank_rate(1) < 0.02
    assert all(a <= b for a, b in zip(model.table(), model.table()[1:], strict=False))
    assert monotone([0.5, 0.1, 0.3], [1, 1, 2]) == pytest.approx([0.3, 0.3, 0.3])
    model.forget(0.0)
    assert model.h(0.5) == pytest.approx(AcceptanceModel().h(0.5))


def test_planner_prefers_a_plain_step_or_a_deep_chain_by_the_numbers():
    """Unit test of the decision rule with a confident and an unsure draft under both kinds of device."""
    def decide(costs, probability):
        acceptance = AcceptanceModel()
        for i in range(200):  # a calibrated draft: right as often as it says
            acceptance.observe([probability], [i < 200 * probability])
        planner = auto_tree.AutoTree(FrozenCost(**costs), acceptance, torch.device("cpu"))
        planner.begin_round(1000, 1, 8)
        depth = 0
        while planner.expand(depth, 1):
            logprobs = torch.full((1, 1, 16), -30.0)
            logprobs[0, 0, 0] = float(torch.tensor(probability).log())
            top = logprobs[0, 0].topk(16)
            k = planner.choose(depth, torch.zeros(1, 16, dtype=torch.long), top.values[None], logprobs)
            if k == 0:
                break
            depth += 1
        return planner.shape

    assert len(decide(GPU_LIKE, 0.99)) == len(AUTO_ENVELOPE)
    assert decide(CPU_LIKE, 0.02) == []
    assert 1 <= len(decide(CPU_LIKE, 0.95)) < len(AUTO_ENVELOPE)


def test_cost_curves_plot(tmp_path):
    model = FrozenCost(**CPU_LIKE)
    path = plot_curves(model, [1000, 4000], tmp_path / "cost_model.png")
    assert path.stat().st_size > 1000


def test_rank_rates_are_kept_per_depth():
    model = AcceptanceModel()
    assert model.rank_rate(0) == pytest.approx(acceptance.RANK_PRIOR[0])
    for i in range(300):
        model.observe([0.6, 0.2], [i % 4 == 0, i % 4 == 1], depth=0)  # the first token is often missed ...
        model.observe([0.6], [i % 10 != 0], depth=2)  # ... a draft on track stays on it
    assert model.rank_rate(0, 0) == pytest.approx(0.25, abs=0.03)
    assert model.rank_rate(1, 0) == pytest.approx(0.25, abs=0.03)
    assert model.rank_rate(0, 2) == pytest.approx(0.9, abs=0.03)
    assert model.rank_rate(0, 7) == model.rank_rate(0, 3)  # depths past the last bucket share it
    assert model.rank_rate(40, 0) == model.rank_rate(15, 0)  # ranks past the table too


def test_top_children_and_their_siblings_are_calibrated_apart():
    """The same draft probability means more for a parent's top child than for a sibling trailing a likelier one."""
    model = AcceptanceModel()
    for i in range(300):
        top, second = i % 5 < 3, i % 20 == 3  # an under-confident top choice, a rarely right second one
        model.observe([0.2, 0.2], [top, second])
    assert model.h(0.2, rank=0) == pytest.approx(0.6, abs=0.04)
    assert model.h(0.2, rank=1) == pytest.approx(0.05, abs=0.04)
    assert model.h(0.2, rank=5) == model.h(0.2, rank=1)
    planner = auto_tree.AutoTree(FrozenCost(**CPU_LIKE), model, torch.device("cpu"))
    # Candidates in beam order: parent 0's top two children, then parent 1's top child.
    assert planner.calibrated([0, 0, 1], [0.2, 0.2, 0.2]) == [model.h(0.2, 0), model.h(0.2, 1), model.h(0.2, 0)]


def test_predictions_are_scaled_towards_what_the_call_accepts():
    """Acceptance along a path is correlated, so per-node products can be biased either way for a given text: the
    planner scales its predictions by what the call's rounds actually accepted (bounded)."""
    def planner_after(accepted_path, predicted, rounds=40):
        planner = auto_tree.AutoTree(FrozenCost(**CPU_LIKE), AcceptanceModel(), torch.device("cpu"))
        for _ in range(rounds):
            planner.begin_round(1000, 1, 3)
            planner.expected, planner.tree_nodes = 1.0 + predicted, 4
            planner.levels = [(0, torch.tensor([[[5]]]), torch.tensor([[[0.0]]]))]  # the root's level was drafted
            planner.verified()
            planner.end_round([0] * 4, [accepted_path], [[5] + [6] * len(accepted_path)])
        return planner

    under = planner_after([1, 2, 3], predicted=0.5)  # accepts three where one half was predicted
    assert under.scale == auto_tree.SCALE_RANGE[1]
    over = planner_after([], predicted=2.0)
    assert over.scale == auto_tree.SCALE_RANGE[0]
    assert planner_after([1], predicted=1.0).scale == pytest.approx(1.0)
    for planner in (under, over):  # the scaled prediction of a child, a probability (one at most)
        planner.begin_round(1000, 1, 3)
        probabilities = torch.tensor([[0.92, 0.05]])
        planner.levels, planner._step_start = [], 0.0
        planner.choose(0, torch.zeros(1, 2, dtype=torch.long), probabilities.log(), probabilities.log()[:, None])
        h = planner.acceptance.h(0.92)
        assert planner.level_acceptance[0][0] == pytest.approx(min(planner.scale * h, 1.0))
