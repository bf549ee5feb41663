"""Training from a feature store: captured once, the same loss as a live target pass, resumable, draft vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_prompt, tiny_target
from test_training import config, workspace  # noqa: F401 - the module's fixture, shared

from longspec_hf import LongSpecDraftModel
from longspec_hf.training import train
from longspec_hf.training.features import FeatureStore, StoreUnion, capture_features, pad_rows
from longspec_hf.training.history import run_summary
from longspec_hf.training.objective import draft_loss, feature_loss, token_weights
from longspec_hf.training.trainer import micro_batch
from longspec_hf.vocabulary import ranked_vocabulary


def test_token_weights_score_the_continuation_weigh_the_prompt_and_skip_padding():
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert token_weights(mask, 0.25).tolist() == [[0.25, 0.25, 1, 1, 0], [0.25, 1, 1, 1, 1]]


@pytest.mark.parametrize("vocab_size", [None, 40])
def test_the_feature_loss_is_the_live_distillation_loss(tmp_path, vocab_size):
    """With every token kept (top-k = vocabulary) and fp32 features, reading the store gives the live loss."""
    target = tiny_target("llama")
    torch.manual_seed(3)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    if vocab_size:
        draft.set_draft_vocabulary(ranked_vocabulary(torch.arange(96.0), vocab_size))
    ids = torch.cat([random_prompt(24, seed=1), random_prompt(24, seed=2)])
    positions = torch.arange(24).repeat(2, 1) + torch.tensor([[0], [100]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 12:] = True
    store = capture_features(target, ids, positions, mask, tmp_path, {"test": 1}, "k", top_k=96, dtype="fp32",
                             rows_per_shard=1, progress=False)
    rows = store.rows([0, 1])
    assert torch.equal(rows["input_ids"].long(), ids) and torch.equal(rows["position_ids"].long(), positions)
    for lag in (1, 3):
        live = draft_loss(draft, target, ids, positions, lag, "distill", mask, prompt_weight=0.5)
        stored = feature_loss(draft, rows, lag, prompt_weight=0.5)
        torch.testing.assert_close(stored, live, rtol=1e-4, atol=1e-5)


def test_a_store_made_with_other_settings_is_refused(tmp_path):
    target = tiny_target("llama")
    ids = random_prompt(16)
    capture_features(target, ids, torch.arange(16)[None], None, tmp_path, {"a": 1}, "key-1", top_k=4,
                     progress=False)
    with pytest.raises(ValueError, match="other settings"):
        capture_features(target, ids, torch.arange(16)[None], None, tmp_path, {"a": 2}, "key-2", top_k=4,
                         progress=False)
    (tmp_path / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        FeatureStore(tmp_path)


def test_training_from_features_learns_and_reuses_the_store(workspace, tmp_path):  # noqa: F811
    features = tmp_path / "features"
    first = train(config(workspace, tmp_path / "a", features=str(features), max_steps=80, draft_vocab_size=48),
                  progress=False)
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    assert first.config.draft_vocab_size == 48
    loaded = LongSpecDraftModel.from_pretrained(tmp_path / "a")
    assert torch.equal(loaded.draft_vocab, first.draft_vocab)
    assert len(FeatureStore(features)) == 71  # every packed row of the corpus (4,200 words, 64 per row, with EOS)
    stamps = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    train(config(workspace, tmp_path / "b", features=str(features), max_steps=2), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in features.iterdir()} == stamps  # read, not captured again


def test_throughput_command_times_every_part_in_both_precisions(capsys):
    import longspec_hf_cli

    longspec_hf_cli.main(["throughput", "--target", "toy:llama", "--seq-len", "32", "--vocab-sizes", "0", "16",
                          "--repeats", "1"])
    out = capsys.readouterr().out
    for part in ("target forward (capture)", "draft step, whole vocabulary", "draft step, 16-token vocabulary"):
        assert f"| {part} |" in out


def test_promote_keeps_only_a_better_draft_and_records_every_run(workspace, tmp_path):  # noqa: F811
    """A trained candidate replaces an untrained draft; a worse one (untrained) is recorded but not kept."""
    from longspec_hf.loading import load_causal_lm
    from longspec_hf.training.history import HISTORY, PLOT, promote, read_history

    target, tokenizer = load_causal_lm(str(workspace / "target"))
    kept_folder = tmp_path / "kept"
    untrained = tmp_path / "untrained"
    train(config(workspace, untrained, max_steps=1, lr=1e-9), progress=False)
    train(config(workspace, tmp_path / "good", max_steps=60), progress=False)
    domains = {"held": str(workspace / "corpus.txt")}
    args = dict(domains=domains, contexts=[32], tree_shape=[1, 1, 1], max_new_tokens=12, prompts=4)
    kept, _, _ = promote(target, tokenizer, untrained, kept_folder, **args)  # nothing kept yet: kept
    assert kept
    kept, new, old = promote(target, tokenizer, tmp_path / "good", kept_folder, **args)
    assert kept and sum(r["tau"] for r in new) > sum(r["tau"] for r in old)
    kept, _, _ = promote(target, tokenizer, untrained, kept_folder, **args)
    assert not kept
    history = read_history(kept_folder)
    assert [h["kept"] for h in history] == [True, True, False]
    assert history[1]["cumulative_tokens"] == history[0]["run"]["tokens"] + history[1]["run"]["tokens"]
    assert (kept_folder / HISTORY).exists() and (kept_folder / PLOT).stat().st_size > 0
    card = (kept_folder / "README.md").read_text()
    assert "## Training history" in card and card.count("| yes |") == 2
    weights = LongSpecDraftModel.from_pretrained(kept_folder).state_dict()
    good = LongSpecDraftModel.from_pretrained(tmp_path / "good").state_dict()
    assert all(torch.equal(weights[k], good[k]) for k in good)


def test_max_sequences_samples_the_plain_text(workspace, tmp_path):  # noqa: F811
    train(config(workspace, tmp_path / "run", features=str(tmp_path / "f"), max_steps=1, max_sequences=5),
          progress=False)
    store = FeatureStore(tmp_path / "f")
    assert len(store) == 5 and store.manifest["settings"]["max_sequences"] == 5


def test_a_checkpoint_of_a_run_is_summarised_up_to_its_step(tmp_path):
    from longspec_hf.training.history import run_summary

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "training_args.json").write_text(json.dumps({"seq_len": 8, "lr": 0.1}))
    (tmp_path / "train_log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0, "tokens": 32 * s, "seconds": 1.5 * s, "tokens_per_s": 20}) + "\n"
        for s in (1, 2, 3)))
    assert run_summary(tmp_path / "checkpoint-2")["tokens"] == 64
    assert run_summary(tmp_path)["tokens"] == 96 and run_summary(tmp_path)["settings"]["lr"] == 0.1


def test_positions_whose_top_k_lies_outside_the_vocabulary_are_skipped_without_nan(tmp_path):
    target = tiny_target("llama")
    torch.manual_seed(3)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    ids = random_prompt(24, seed=1)
    store = capture_features(target, ids, torch.arange(24)[None], None, tmp_path, {"t": 1}, "k", top_k=2,
                             progress=False)
    rows = store.rows([0])
    draft.set_draft_vocabulary(rows["top_ids"][0, :12, 0].long().unique())  # positions 12+ may have none inside
    loss = feature_loss(draft, rows, 1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in draft.parameters() if p.grad is not None)


def test_card_says_how_each_run_was_measured_when_the_protocol_changed(tmp_path):
    from longspec_hf.training.history import record, update_card

    run = {"tokens": 10, "seconds": 60, "steps": 1, "settings": {}}
    rows = [{"domain": "d", "context": 8, "tau": 1.5}]
    history = record(record([], run, rows, True, "decoded, 4 prompts"), run, rows, False, "teacher-forced, 16 prompts",
                     baseline_rows=[{"domain": "d", "context": 8, "tau": 1.75}])
    assert [h["measured"] for h in history] == ["decoded, 4 prompts", "teacher-forced, 16 prompts"]
    update_card(tmp_path, history, "teacher-forced, 16 prompts")
    card = (tmp_path / "README.md").read_text()
    assert "protocol 1, run 0: decoded, 4 prompts; protocol 2, run 0 (again): teacher-forced, 16 prompts" in card
    three = record(history, {**run, "tokens": 20}, rows, True, "teacher-forced, 16 prompts")  # another run
    update_card(tmp_path, three, "teacher-forced, 16 prompts")
    assert "protocol 2, runs 0 (again), 1: teacher-forced" in (tmp_path / "README.md").read_text()
    assert "| 0 (again) |" in card and card.rstrip().splitlines()[-3].endswith("| 1.50 | 1.75 |")
    update_card(tmp_path, history[:1], "decoded, 4 prompts")
    assert "tau is higher (decoded, 4 prompts)" in (tmp_path / "README.md").read_text()


def test_run_labels_number_runs_and_name_a_run_promoted_again_by_its_first_number():
    from longspec_hf.training.history import run_labels

    def entry(tokens, steps):
        return {"run": {"tokens": tokens, "steps": steps}}

    history = [entry(0, 0), entry(10, 5), entry(20, 5), entry(20, 5), entry(30, 5)]
    assert run_labels(history) == ["0", "1", "2", "2 (again)", "3"]


def test_a_union_of_stores_reads_each_row_from_its_own_store(tmp_path):
    target = tiny_target("llama")
    ids = torch.cat([random_prompt(16, seed=s) for s in range(5)])  # [5, 16]
    positions = torch.arange(16).repeat(5, 1)
    first = capture_features(target, ids[:2], positions[:2], None, tmp_path / "a", {"a": 1}, "a", top_k=4,
                             rows_per_shard=1, progress=False)
    second = capture_features(target, ids[2:], positions[2:], None, tmp_path / "b", {"b": 1}, "b", top_k=4,
                              rows_per_shard=2, progress=False)
    union = StoreUnion([first, second])
    assert len(union) == 5
    rows = union.rows([4, 0, 2, 1])
    assert torch.equal(rows["input_ids"].long(), ids[[4, 0, 2, 1]])
    for name, tensor in second.rows([2, 0]).items():
        assert torch.equal(union.rows([4, 2])[name], tensor)
    assert torch.equal(union.top1_counts(96), first.top1_counts(96) + second.top1_counts(96))
    with pytest.raises(IndexError):
        union.rows([5])


@pytest.mark.parametrize("lag", [1, 3])
def test_padded_rows_give_the_loss_of_the_rows_themselves(tmp_path, lag):
    """Rows of an earlier, shorter store, right-padded into a run of longer rows: the same loss, alone and beside a
    row of full length (pads weigh nothing and no real token attends to one)."""
    target = tiny_target("llama")
    torch.manual_seed(5)
    draft = LongSpecDraftModel.from_target(target, sink_size=2, window_size=8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 6:] = True  # a generated row: prompt, then continuation
    mask[1] = True  # a plain row: every token scored
    short = capture_features(target, torch.cat([random_prompt(16, seed=s) for s in (1, 2)]),
                             torch.arange(16).repeat(2, 1) + torch.tensor([[0], [300]]), mask, tmp_path / "short",
                             {"s": 1}, "s", top_k=96, dtype="fp32", progress=False)
    full = capture_features(target, random_prompt(24, seed=3), torch.arange(24)[None], None, tmp_path / "full",
                            {"f": 1}, "f", top_k=96, dtype="fp32", progress=False)
    rows = short.rows([0, 1])
    padded = pad_rows(rows, 24)
    assert padded["key"].shape[2] == padded["input_ids"].shape[1] == 24
    assert torch.equal(padded["position_ids"][1, 16:], torch.full((8,), 315, dtype=torch.int32))
    assert not padded["loss_mask"][:, 16:].any()
    for weight in (0.0, 0.3):
        torch.testing.assert_close(feature_loss(draft, padded, lag, weight), feature_loss(draft, rows, lag, weight))
    union = StoreUnion([full, short])
    assert union.seq_len == 24 and union.rows([1, 0])["input_ids"].shape == (2, 24)
    # Beside a full row, the padded one counts as itself: the weighted mean over both rows' real tokens.
    alone = [feature_loss(draft, union.rows([i]), lag, 0.3) for i in (0, 1)]
    weights = [token_weights(union.rows([i])["loss_mask"], 0.3)[:, lag + 1:].sum() for i in (0, 1)]
    expected = (alone[0] * weights[0] + alone[1] * weights[1]) / (weights[0] + weights[1])
    torch.testing.assert_close(feature_loss(draft, union.rows([0, 1]), lag, 0.3), expected)


def test_a_run_of_longer_rows_rehearses_an_earlier_store_of_shorter_ones(workspace, tmp_path):  # noqa: F811
    earlier = tmp_path / "earlier"
    train(config(workspace, tmp_path / "a", features=str(earlier), seq_len=32, max_steps=1), progress=False)
    longer = config(workspace, tmp_path / "b", features=str(tmp_path / "own"), extra_features=[str(earlier)],
                    max_steps=4)
    draft = train(longer, progress=False)
    assert all(torch.isfinite(p).all() for p in draft.parameters())
    steps = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(0 < s["loss"] < 50 for s in steps)
    # Tokens trained count a padded row at its own length: the rows the four steps read, own rows first.
    lengths = torch.tensor([64] * len(FeatureStore(tmp_path / "own")) + [32] * len(FeatureStore(earlier)))
    read = torch.cat([micro_batch(torch.arange(len(lengths)), longer, i, 0, 1) for i in range(4)])
    assert (lengths[read] == 32).any()  # an earlier, padded row was read
    assert [s["tokens"] for s in steps] == lengths[read].cumsum(0).tolist()


def test_training_alongside_an_earlier_store_reads_both(workspace, tmp_path):  # noqa: F811
    earlier, own = tmp_path / "earlier", tmp_path / "own"
    train(config(workspace, tmp_path / "a", features=str(earlier), max_steps=1), progress=False)
    words = (workspace / "corpus.txt").read_text().split()
    (tmp_path / "other.txt").write_text(" ".join(reversed(words[:1500])))
    other = config(workspace, tmp_path / "b", data=[str(tmp_path / "other.txt")], features=str(own),
                   extra_features=[str(earlier)], max_steps=6, draft_vocab_size=48)
    stamps = {p.name: p.stat().st_mtime_ns for p in earlier.iterdir()}
    draft = train(other, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in earlier.iterdir()} == stamps  # read, not captured again
    counts = FeatureStore(own).top1_counts(96) + FeatureStore(earlier).top1_counts(96)
    assert len(FeatureStore(own)) < len(FeatureStore(earlier))  # the union's ranking is not the own store's alone
    assert torch.equal(draft.draft_vocab, ranked_vocabulary(counts, 48, [2]))
    assert json.loads((tmp_path / "b" / "training_args.json").read_text())["extra_features"] == [str(earlier)]
    assert run_summary(tmp_path / "b")["settings"]["extra_features"] == ["earlier"]


def test_an_earlier_store_that_cannot_train_alongside_is_refused(workspace, tmp_path):  # noqa: F811
    earlier = tmp_path / "earlier"
    train(config(workspace, tmp_path / "a", features=str(earlier), max_steps=1), progress=False)
    with pytest.raises(ValueError, match="--seq-len 64 .this run: 32."):
        train(config(workspace, tmp_path / "b", features=str(tmp_path / "short"), seq_len=32,
                      extra_features=[str(earlier)], max_steps=1), progress=False)
    assert not (tmp_path / "short").exists()  # refused before its own capture
    with pytest.raises(ValueError, match="--capture-dtype bf16 .this run: fp32."):
        train(config(workspace, tmp_path / "c", features=str(tmp_path / "fp32"), capture_dtype="fp32",
                      extra_features=[str(earlier)], max_steps=1), progress=False)
    manifest = json.loads((earlier / "manifest.json").read_text())
    old_rule = {**manifest, "settings": {k: v for k, v in manifest["settings"].items() if k != "data_version"}}
    (earlier / "manifest.json").write_text(json.dumps(old_rule))
    with pytest.raises(ValueError, match="older rule .* capture it again"):
        train(config(workspace, tmp_path / "g", features=str(tmp_path / "own"), extra_features=[str(earlier)],
                      max_steps=1), progress=False)
    (earlier / "manifest.json").write_text(json.dumps({**manifest, "key": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="another target"):
        train(config(workspace, tmp_path / "d", features=str(tmp_path / "own"), extra_features=[str(earlier)],
                      max_steps=1), progress=False)
    with pytest.raises(ValueError, match="once"):
        train(config(workspace, tmp_path / "e", features=str(earlier), extra_features=[str(earlier)]), progress=False)
    with pytest.raises(ValueError, match="pass --features"):
        train(config(workspace, tmp_path / "f", extra_features=[str(earlier)]), progress=False)


def test_keep_on_lets_only_the_named_domains_decide():
    from longspec_hf.training.history import history_table, is_better, record

    def rows(code, stdlib):
        return [{"domain": "code", "context": 2048, "tau": code}, {"domain": "stdlib", "context": 2048, "tau": stdlib}]

    old, new = rows(1.87, 1.92), rows(1.85, 2.12)  # higher mean, but only on the cell nobody set a goal on
    assert is_better(new, old)
    assert not is_better(new, old, ["code"])
    assert is_better(old, new, ["code"]) and is_better(new, [], ["code"])
    entry = record([], {"tokens": 8, "seconds": 1, "steps": 1, "settings": {}}, new, False, keep_on=["code"])[-1]
    assert entry["decided_on"] == ["code"] and entry["tau"] == {"code@2048": 1.85, "stdlib@2048": 2.12}
    assert "| no (on code) |" in history_table([entry])


def test_promote_refuses_a_keep_on_domain_it_does_not_measure_before_loading_anything(tmp_path):
    import longspec_hf_cli

    with pytest.raises(SystemExit, match=r"--keep-on names \['prose'\], which no --domain defines"):
        longspec_hf_cli.main(["promote", "--target", str(tmp_path / "no-such-target"), "--candidate", str(tmp_path),
                              "--draft", str(tmp_path), "--domain", "code=installed-code", "--keep-on", "prose"])


def test_the_history_table_rounds_tau_once():
    from longspec_hf.training.history import history_table, record

    rows = [{"domain": "code", "context": 2048, "tau": 760 / 399}]  # 1.90476: 1.905 if rounded to 3 places first
    entry = record([], {"tokens": 8, "seconds": 1, "steps": 1, "settings": {}}, rows, True, baseline_rows=rows)[-1]
    assert "| 1.90 | 1.90 |" in history_table([entry])
