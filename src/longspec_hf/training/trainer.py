"""Train a LongSpec draft for any causal LM: the target is frozen, only the draft layer learns.

Runs unchanged on one CPU, one GPU, or under ``accelerate launch`` on several GPUs / nodes (DDP; FSDP and DeepSpeed
through accelerate's own configs). Every step is a pure function of ``(seed, step)``: the data order, the lag and
the anchor-offset positions are drawn from generators seeded by the step, so a run resumed from a checkpoint
(draft weights, optimizer, scheduler, RNG — safetensors and JSON) continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..modeling import TARGET_ALIASES, LongSpecDraftModel
from .checkpoint import latest_checkpoint, load_training_state, save_training_state
from .config import TrainConfig
from .data import DATA_VERSION
from .generated import training_sequences
from .objective import draft_loss, feature_loss
from .positions import anchor_offset_positions


def load_target(config: TrainConfig, dtype: str | None = None):
    from ..loading import load_causal_lm

    return load_causal_lm(config.target, config.gguf_file, dtype or config.dtype, tokenizer=config.tokenizer)


def sequence_positions(config: TrainConfig, count: int, max_positions: int) -> torch.LongTensor:
    """`[count, seq_len]` anchor-offset positions of a feature store's rows, one seeded draw per row (a store
    fixes the positions its target KV were computed at)."""
    return torch.stack([
        anchor_offset_positions(config.seq_len, max_positions, torch.Generator().manual_seed(config.seed * 7919 + i),
                                config.max_anchor, config.long_threshold)
        for i in range(count)
    ])


def prepare_features(config: TrainConfig, accelerator, progress: bool):
    """The run's feature store: captured from `config.data` with the target in `capture_dtype` (by the main process,
    resuming a partial capture), checked against the earlier stores of `config.extra_features`, then opened by every
    process (with the earlier stores, as one :class:`~.features.StoreUnion`)."""
    from .features import FeatureStore, StoreUnion, capture_features, check_compatible, store_key
    from .generated import weights_fingerprint

    extras = [Path(folder) for folder in config.extra_features]
    if len({p.resolve() for p in [Path(config.features), *extras]}) != 1 + len(extras):
        raise ValueError("--extra-features names the run's own --features folder, or one folder twice; name each "
                         "earlier store once.")
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            target, tokenizer = load_target(config, config.capture_dtype)
            target.to(accelerator.device)
            fingerprint = weights_fingerprint(target)
            for folder in extras:  # before the capture: a refusal should not cost one
                check_compatible(FeatureStore(folder), config.seq_len, config.top_k, config.capture_dtype, fingerprint)
            data, loss_mask = training_sequences(config.data, target, tokenizer, config.seq_len, config.text_column,
                                                 progress, config.max_sequences, config.seed)  # [N, L], [N, L]
            max_positions = target.config.get_text_config(decoder=True).max_position_embeddings
            settings = {"data": config.data, "seq_len": config.seq_len, "top_k": config.top_k,
                        "max_sequences": config.max_sequences,
                        "capture_dtype": config.capture_dtype, "seed": config.seed, "max_anchor": config.max_anchor,
                        "long_threshold": config.long_threshold, "text_column": config.text_column,
                        "data_version": DATA_VERSION}
            capture_features(target, data, sequence_positions(config, len(data), max_positions), loss_mask,
                             config.features, settings, store_key(fingerprint, settings), config.top_k,
                             batch_size=config.batch_size, progress=progress)
            del target
        store = FeatureStore(config.features)
        return StoreUnion([store, *map(FeatureStore, extras)]) if extras else store


def apply_draft_vocabulary(draft: LongSpecDraftModel, config: TrainConfig, store, target, data) -> None:
    """Give the draft the `draft_vocab_size` tokens the target predicts most often on the training data."""
    from ..vocabulary import count_target_outputs, ranked_vocabulary

    vocab = draft.config.vocab_size
    counts = (store.top1_counts(vocab) if store is not None
              else count_target_outputs(target, data[:64], counts=torch.zeros(vocab, dtype=torch.long)))
    eos = target.generation_config.eos_token_id
    always = eos if isinstance(eos, list) else [eos]
    draft.set_draft_vocabulary(ranked_vocabulary(counts, config.draft_vocab_size, always))


def has_accelerator() -> bool:
    """A GPU (or other accelerator) torch can use; `torch.accelerator` exists from torch 2.6 on."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def prepare_output_dir(config: TrainConfig) -> Path:
    out = Path(config.output_dir)
    if out.exists() and any(out.iterdir()) and not config.resume:
        if not config.overwrite:
            raise ValueError(f"Output directory {out} exists and is not empty; pass --overwrite to replace it or "
                             "--resume to continue its last checkpoint.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def micro_batch(data: torch.LongTensor, config: TrainConfig, index: int, rank: int, world: int) -> torch.LongTensor:
    """The `index`-th micro-batch of this process: a fresh seeded permutation per epoch, sharded by rank."""
    per_micro = config.batch_size * world
    epoch, offset = divmod(index * per_micro, len(data))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
    picks = [(offset + rank * config.batch_size + i) % len(data) for i in range(config.batch_size)]
    return data[order[picks]]


def micro_batch_tokens(lengths: torch.LongTensor, config: TrainConfig, index: int, world: int) -> int:
    """Tokens of the `index`-th global micro-batch (every process's rows) of a feature store whose rows hold
    `lengths [N]` tokens: a row padded into a run of longer rows counts its own tokens, not the pads."""
    rows = torch.arange(len(lengths))
    return sum(int(lengths[micro_batch(rows, config, index, rank, world)].sum()) for rank in range(world))


def step_generator(config: TrainConfig, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 1000003 + index)


def train(config: TrainConfig, progress: bool = True) -> LongSpecDraftModel:
    """Run (or resume) one training stage; returns the trained draft, also saved in `config.output_dir`."""
    from accelerate import Accelerator

    if not 1 <= config.lag_min <= config.lag_max:
        raise ValueError(f"Need 1 <= lag_min <= lag_max, got {config.lag_min}, {config.lag_max}.")
    if config.loss not in ("ce", "distill"):
        raise ValueError(f"Unknown loss {config.loss!r}; use 'ce' or 'distill'.")
    if config.seq_len < config.lag_max + 2:
        raise ValueError(f"--seq-len {config.seq_len} is shorter than the lag ({config.lag_max}) + 2; use longer "
                         "sequences or a smaller --lag-max.")
    if config.extra_features and not config.features:
        raise ValueError("--extra-features adds earlier feature stores to this run's own: pass --features DIR too.")
    out = prepare_output_dir(config)
    # Without an accelerator device, processes started by `accelerate launch` / torchrun train on the CPU with gloo
    # (accelerate only forms a CPU process group when told it runs on the CPU).
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=not has_accelerator(),
                              mixed_precision="bf16" if config.dtype == "bf16" else "no")
    if accelerator.num_processes > 1:
        close_process_group_at_exit()
    store = data = loss_mask = None
    if config.features:
        # The store holds what the target computes; the target itself only lends the draft its embeddings and
        # head, in fp32 (master weights; bf16 compute comes from autocast).
        store = prepare_features(config, accelerator, progress and accelerator.is_local_main_process)
        target, tokenizer = load_target(config, "fp32")
        target.to(accelerator.device)
        rows = torch.arange(len(store))
    else:
        target, tokenizer = load_target(config)
        target.to(accelerator.device)
        max_positions = target.config.get_text_config(decoder=True).max_position_embeddings
        with accelerator.main_process_first():  # one process writes the target's continuations (generated:)
            data, loss_mask = training_sequences(config.data, target, tokenizer, config.seq_len, config.text_column,
                                                 progress and accelerator.is_local_main_process,
                                                 config.max_sequences, config.seed)  # [N, L], [N, L] | None

    torch.manual_seed(config.seed)
    if config.init_draft:
        draft = LongSpecDraftModel.from_pretrained(config.init_draft).to(target.device, target.dtype)
        draft.bind(target)
    else:
        draft = LongSpecDraftModel.from_target(target, sink_size=config.sink_size, window_size=config.window_size)
    # An offline name is recorded as the model it stands for, so the draft names its target on any machine.
    draft.config.target_name_or_path = TARGET_ALIASES.get(config.target, config.target)
    draft.generation_config.tree_shape = list(config.tree_shape)
    if config.draft_vocab_size:
        apply_draft_vocabulary(draft, config, store, target, data)
    draft.to(accelerator.device).train()
    # The cross-attention reads the target's keys and values: its own k/v projections (kept for the official
    # layout) get no gradient, which distributed data parallel would otherwise wait for.
    draft.cross_attn.k_proj.requires_grad_(False)
    draft.cross_attn.v_proj.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.max_steps))
    # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would step it once per process.
    draft_model, optimizer = accelerator.prepare(draft, optimizer)

    start = 0
    checkpoint = latest_checkpoint(out) if config.resume else None
    if checkpoint is not None:
        state = LongSpecDraftModel.from_pretrained(checkpoint).state_dict()
        accelerator.unwrap_model(draft_model).load_state_dict(state)
        start = load_training_state(checkpoint, optimizer, scheduler)["step"]
    world = accelerator.num_processes
    lengths = store.row_lengths() if store is not None else None

    def tokens_of(index: int) -> int:  # the global micro-batch `index`
        if lengths is None:
            return config.batch_size * config.seq_len * world
        return micro_batch_tokens(lengths, config, index, world)

    trained = sum(map(tokens_of, range(start * config.grad_accum)))  # by the steps a resumed run has done
    earlier_seconds = 0.0  # of the interrupted run this one resumes (the log's time is the run's, not the sitting's)
    if accelerator.is_main_process:
        earlier_seconds = trim_log(out, start)
        (out / "training_args.json").write_text(json.dumps(asdict(config), indent=2))  # readable while it runs

    bar = tqdm(total=config.max_steps, initial=start, disable=not (progress and accelerator.is_local_main_process),
               desc="train draft")
    tokens, t0 = 0, time.perf_counter()
    for step in range(start, config.max_steps):
        for micro in range(config.grad_accum):
            index = step * config.grad_accum + micro
            gen = step_generator(config, index)
            lag = int(torch.randint(config.lag_min, config.lag_max + 1, (1,), generator=gen))
            if store is not None:
                picked = micro_batch(rows, config, index, accelerator.process_index, accelerator.num_processes)
                batch = {k: v.to(accelerator.device) for k, v in store.rows(picked).items()}
                with accelerator.accumulate(draft_model), accelerator.autocast():
                    loss = feature_loss(draft_model, batch, lag, config.prompt_weight)
                    optimizer_step(accelerator, draft_model, optimizer, scheduler, loss, config)
                tokens += tokens_of(index)
                continue
            ids = micro_batch(data, config, index, accelerator.process_index, accelerator.num_processes)
            # The same rows (the permutation depends on the index only): which of their tokens are scored.
            mask = None if loss_mask is None else micro_batch(loss_mask, config, index, accelerator.process_index,
                                                              accelerator.num_processes).to(accelerator.device)
            # Drawn for the whole global micro-batch, this process's rows taken: the same positions per row
            # whatever the number of processes.
            positions = torch.stack([
                anchor_offset_positions(config.seq_len, max_positions, gen, config.max_anchor, config.long_threshold)
                for _ in range(config.batch_size * accelerator.num_processes)
            ])[accelerator.process_index * config.batch_size:][: config.batch_size]
            ids, positions = ids.to(accelerator.device), positions.to(accelerator.device)
            with accelerator.accumulate(draft_model), accelerator.autocast():
                loss = draft_loss(draft_model, target, ids, positions, lag, config.loss, mask, config.prompt_weight)
                optimizer_step(accelerator, draft_model, optimizer, scheduler, loss, config)
            tokens += tokens_of(index)
        bar.update(1)
        tokens_per_s = tokens / (time.perf_counter() - t0)
        loss = accelerator.reduce(loss.detach(), "mean")  # the step's loss over every process's rows
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:.0f}")
        if accelerator.is_main_process:
            log_step(out, {"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                           "tokens_per_s": round(tokens_per_s, 1),
                           "tokens": trained + tokens,
                           "seconds": round(earlier_seconds + time.perf_counter() - t0, 1)})
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.max_steps:
            save_checkpoint(accelerator, draft_model, optimizer, scheduler, out / f"checkpoint-{step + 1}", step + 1,
                            config)
    bar.close()
    final = accelerator.unwrap_model(draft_model)
    if accelerator.is_main_process:
        final.save_pretrained(out)
        (out / "training_args.json").write_text(json.dumps(asdict(config), indent=2))
    return final


def optimizer_step(accelerator, draft_model, optimizer, scheduler, loss, config: TrainConfig) -> None:
    """Backward and, at the end of a gradient accumulation, clip, step and schedule (under `accumulate`)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(draft_model.parameters(), config.max_grad_norm)
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad()


def log_step(out: Path, record: dict) -> None:
    """Append one optimizer step to `<output_dir>/train_log.jsonl` (the loss curve; a resumed run appends)."""
    with open(out / "train_log.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def trim_log(out: Path, step: int) -> float:
    """Drop logged steps after `step` (an interrupted run logged steps that the resumed run will redo); returns the
    seconds the run had taken up to `step`."""
    log = out / "train_log.jsonl"
    if not log.exists():
        return 0.0
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
    log.write_text("".join(line + "\n" for line in kept))
    return json.loads(kept[-1]).get("seconds", 0.0) if kept else 0.0


def save_checkpoint(accelerator, draft_model, optimizer, scheduler, folder: Path, step: int, config) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(draft_model).save_pretrained(folder)
        save_training_state(folder, optimizer, scheduler, step,
                            {"consumed_micro_batches": step * config.grad_accum, "config": asdict(config)})


def close_process_group_at_exit() -> None:
    """Destroy the process group when the process exits, once. A gloo group left to the interpreter's own teardown can
    abort a rank after a finished run ("terminate called without an active exception", exit code -6), which fails the
    launch; destroying it at the end of `train` instead would break the next stage of a recipe in the same process."""
    import atexit

    global _CLOSE_REGISTERED
    if not _CLOSE_REGISTERED:
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())
        _CLOSE_REGISTERED = True


_CLOSE_REGISTERED = False


def run_recipe(base: TrainConfig, stages: list[dict], progress: bool = True) -> LongSpecDraftModel:
    """Multi-stage training (e.g. short data with anchor-offset positions, then long data) as configuration: each
    stage overrides `base`, writes to `<output_dir>/stage-<i>` and starts from the previous stage's draft."""
    draft, previous = None, base.init_draft
    for i, overrides in enumerate(stages):
        values = {**asdict(base), "init_draft": previous, **overrides}
        values["output_dir"] = str(Path(base.output_dir) / f"stage-{i}")
        config = TrainConfig.from_dict(values)
        # With --resume, a stage that already finished is not trained again (its final save exists).
        draft = finished_stage(config) if config.resume else None
        if draft is None:
            draft = train(config, progress=progress)
        previous = values["output_dir"]
    return draft


def finished_stage(config: TrainConfig) -> LongSpecDraftModel | None:
    """The draft a finished run of `config` saved, or None if it did not finish (or was run with other steps)."""
    args = Path(config.output_dir) / "training_args.json"
    finished = (Path(config.output_dir) / "model.safetensors").exists()  # the final save; checkpoints are below
    if not finished or not args.exists() or json.loads(args.read_text()).get("max_steps") != config.max_steps:
        return None
    return LongSpecDraftModel.from_pretrained(config.output_dir)
