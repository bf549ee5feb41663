"""Training: anchor-offset positions, masks, the loss goes down, exact resume, the CLI, bad input."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from conftest import COMMON
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from longspec_hf import LongSpecDraftModel
from longspec_hf.cli import main as cli
from longspec_hf.training import (
    TrainConfig,
    anchor_offset_positions,
    cross_attention_allowed,
    self_attention_allowed,
    train,
)

VOCAB = COMMON["vocab_size"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny Llama target with a word-level tokenizer saved to disk, and a small structured text corpus."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(**{**COMMON, "eos_token_id": 2})).eval()
    target.save_pretrained(root / "target")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w2").save_pretrained(root / "target")
    rng = random.Random(0)
    phrases = [" ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(6)) for _ in range(12)]
    text = " ".join(rng.choice(phrases) for _ in range(700))  # predictable structure for the draft to learn
    (root / "corpus.txt").write_text(text)
    return root


def config(workspace, out, **overrides):
    values = dict(target=str(workspace / "target"), data=[str(workspace / "corpus.txt")], output_dir=str(out),
                  seq_len=64, max_steps=8, lr=3e-3, warmup_steps=2, window_size=16, sink_size=2, seed=1)
    return TrainConfig(**{**values, **overrides})


def test_anchor_offset_positions():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        pos = anchor_offset_positions(100, 4096, gen, max_anchor=4)
        assert pos.shape == (100,) and bool((pos[1:] > pos[:-1]).all()) and int(pos[-1]) < 4096
        anchor = int((pos == torch.arange(100)).long().cumprod(0).sum())  # leading positions 0..a-1 untouched
        assert torch.equal(pos[anchor:] - pos[anchor], torch.arange(100 - anchor))  # the rest is contiguous
    assert torch.equal(anchor_offset_positions(2000, 4096, gen, long_threshold=1200), torch.arange(2000))
    with pytest.raises(ValueError, match="exceeds"):
        anchor_offset_positions(5000, 4096, gen)


def test_training_masks():
    self_mask = self_attention_allowed(10, sink=2, window=3)
    assert self_mask[9].nonzero().flatten().tolist() == [0, 1, 7, 8, 9]
    cross = cross_attention_allowed(10, lag=3)
    assert cross[9].nonzero().flatten().tolist() == list(range(7))  # target KV up to i - lag
    assert cross[1].nonzero().flatten().tolist() == [0]  # nothing visible yet: a harmless dummy key, no loss there


def losses_of(workspace, out, **overrides):
    """Per-step loss of a short run, recorded through the progress-free path of `draft_loss`."""
    import longspec_hf.training.trainer as trainer

    seen = []
    real = trainer.draft_loss

    def spy(*args, **kwargs):
        loss = real(*args, **kwargs)
        seen.append(float(loss.detach()))
        return loss

    trainer.draft_loss = spy
    try:
        draft = train(config(workspace, out, **overrides), progress=False)
    finally:
        trainer.draft_loss = real
    return seen, draft


@pytest.mark.parametrize("loss", ["ce", "distill"])
def test_a_few_steps_reduce_the_loss(workspace, tmp_path, loss):
    seen, draft = losses_of(workspace, tmp_path / loss, max_steps=40, loss=loss)
    assert sum(seen[-5:]) / 5 < 0.9 * sum(seen[:5]) / 5
    assert (tmp_path / loss / "model.safetensors").exists()
    loaded = LongSpecDraftModel.from_pretrained(tmp_path / loss)
    assert loaded.config.window_size == 16 and loaded.generation_config.tree_shape == [4, 16, 16, 16, 16]


def test_resume_gives_the_same_parameters(workspace, tmp_path):
    full = train(config(workspace, tmp_path / "full", grad_accum=2), progress=False)
    # Interrupted run: stops after step 4 (checkpoint), then resumes to step 8.
    train(config(workspace, tmp_path / "cut", grad_accum=2, max_steps=8, save_every=4), progress=False)
    for name in ("model.safetensors", "config.json", "generation_config.json", "training_args.json"):
        (tmp_path / "cut" / name).unlink()
    checkpoint = tmp_path / "cut" / "checkpoint-4"
    assert (checkpoint / "optimizer.safetensors").exists() and not list(checkpoint.glob("*.bin"))
    resumed = train(config(workspace, tmp_path / "cut", grad_accum=2, resume=True), progress=False)
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The loss log: the interrupted run's steps 5-8 are replaced by the resumed run's, which match the full run's.
    log = {run: [json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
           for run in ("full", "cut")}
    assert [r["step"] for r in log["cut"]] == list(range(1, 9))
    assert [r["loss"] for r in log["cut"]] == [r["loss"] for r in log["full"]]


def test_cli_end_to_end(workspace, tmp_path):
    out = tmp_path / "cli"
    cli(["train", "--target", str(workspace / "target"), "--data", str(workspace / "corpus.txt"), "--output-dir",
         str(out), "--seq-len", "48", "--max-steps", "3", "--window-size", "16", "--tree-shape", "1", "1"])
    args = json.loads((out / "training_args.json").read_text())
    assert args["max_steps"] == 3 and args["tree_shape"] == [1, 1]
    draft = LongSpecDraftModel.from_pretrained(out)
    assert draft.generation_config.tree_shape == [1, 1]


def test_recipe_runs_stages(workspace, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"base": {"seq_len": 32, "window_size": 16},
                                  "stages": [{"max_steps": 2}, {"max_steps": 2, "seq_len": 64}]}))
    out = tmp_path / "staged"
    cli(["train", "--target", str(workspace / "target"), "--data", str(workspace / "corpus.txt"), "--output-dir",
         str(out), "--recipe", str(recipe)])
    first = json.loads((out / "stage-0" / "training_args.json").read_text())
    second = json.loads((out / "stage-1" / "training_args.json").read_text())
    # The recipe's base wins over the CLI's defaults; flags the user typed win over the base.
    assert first["seq_len"] == 32 and first["window_size"] == 16 and first["max_steps"] == 2
    assert second["seq_len"] == 64 and second["init_draft"] == str(out / "stage-0")


def test_existing_output_dir_is_refused(workspace, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ValueError, match="--overwrite"):
        train(config(workspace, tmp_path / "taken"), progress=False)


def test_dataset_without_text_column_is_refused(workspace, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"body": "w3 w4 w5"}) for _ in range(5)))
    with pytest.raises(ValueError, match="--text-column"):
        train(config(workspace, tmp_path / "out", data=[str(data)]), progress=False)


def test_sequences_shorter_than_the_lag_are_refused(workspace, tmp_path):
    with pytest.raises(ValueError, match="lag"):
        train(config(workspace, tmp_path / "out", seq_len=4, lag_max=4), progress=False)


def test_target_without_causal_lm_head_is_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                        d_kv=8)).save_pretrained(tmp_path / "t5")
    cfg = TrainConfig(target=str(tmp_path / "t5"), data=["x"], output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="causal LM"):
        train(cfg, progress=False)


def test_resumed_recipe_skips_finished_stages(workspace, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"base": {"seq_len": 32, "window_size": 16},
                                  "stages": [{"max_steps": 2}, {"max_steps": 2, "seed": 1}]}))
    out = tmp_path / "staged"
    args = ["train", "--target", str(workspace / "target"), "--data", str(workspace / "corpus.txt"), "--output-dir",
            str(out), "--recipe", str(recipe)]
    cli(args)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("stage-*/model.safetensors")}
    shutil.rmtree(out / "stage-1")
    cli(args + ["--resume"])
    assert (out / "stage-0" / "model.safetensors").stat().st_mtime_ns == finished[out / "stage-0" / "model.safetensors"]
    assert (out / "stage-1" / "model.safetensors").exists()


def launch(workspace, out, processes: int, **flags) -> None:
    """`longspec train` on `processes` CPU processes under `accelerate launch` (gloo), or plainly for 1."""
    import subprocess
    import sys

    values = dict(target=workspace / "target", data=workspace / "corpus.txt", output_dir=out, seq_len=64,
                  window_size=16, sink_size=2, lr=3e-3, warmup_steps=2, seed=1, **flags)
    args = [item for k, v in values.items() for item in (f"--{k.replace('_', '-')}", str(v)) if v is not True]
    args += [f"--{k.replace('_', '-')}" for k, v in values.items() if v is True]
    launcher = [sys.executable, "-m", "longspec_hf_cli"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "longspec_hf_cli"]
    run = subprocess.run([*launcher, "train", *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{processes} process(es) failed:\n{run.stderr[-4000:]}"


def free_port() -> int:
    """A port nothing listens on now (the default one may still be held by an earlier group's sockets)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_what_one_does_and_resume_across_process_counts(workspace, tmp_path):
    """2 processes x 1 row = 1 process x 2 rows: the same rows, lags and positions, gradients averaged by DDP; a
    checkpoint written by 2 processes resumes on 1."""
    from safetensors.torch import load_file

    launch(workspace, tmp_path / "one", 1, batch_size=2, max_steps=6)
    launch(workspace, tmp_path / "two", 2, batch_size=1, max_steps=6, save_every=3)
    one, two = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)
    losses = {run: [json.loads(line)["loss"] for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
              for run in ("one", "two")}
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-4)
    # Resume the 2-process run's step-3 checkpoint on one process.
    shutil.copytree(tmp_path / "two" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    launch(workspace, tmp_path / "resumed", 1, batch_size=2, max_steps=6, resume=True)
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(resumed[name], one[name], rtol=0, atol=1e-5)
