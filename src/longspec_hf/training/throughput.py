"""`longspec throughput`: training tokens per second of each part of a step, fp32 against bf16, in one run.

A training step from a feature store is one draft forward + backward + optimizer step; capturing the store is one
frozen-target forward per sequence. Both are timed here on real sequences of the target, in fp32 and in bf16 (the
target's weights in bf16 for the forward; the draft's master weights stay fp32 under bf16 autocast), alternating the
two so that both see the same machine state, and with the whole vocabulary against draft vocabularies.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .features import capture_rows
from .objective import feature_loss

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one untimed warm-up."""
    fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def draft_step(draft, rows: dict, precision: str, lag: int = 1):
    """One optimizer step of `draft` on captured `rows` under `precision` (fp32, or bf16 autocast)."""
    optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=1e-6)

    def step():
        with torch.autocast("cpu", dtype=AUTOCAST[precision] or torch.float32, enabled=precision != "fp32"):
            loss = feature_loss(draft, rows, lag)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def measure(target_fp32, target_bf16, draft, input_ids: torch.LongTensor, vocab_sizes: list[int], top_k: int = 32,
            repeats: int = 3) -> list[dict]:
    """Rows `{part, precision, tokens_per_s}` for the target forward and the draft's step per vocabulary size
    (0 = whole vocabulary) over the sequences `input_ids [B, L]`."""
    tokens = input_ids.numel()
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    results = []
    targets = {"fp32": target_fp32, "bf16": target_bf16}
    for precision in ("fp32", "bf16", "fp32", "bf16"):  # alternated: both see the same machine state
        model = targets[precision]
        seconds = timed(lambda model=model: capture_rows(model, input_ids, positions, top_k, torch.bfloat16), repeats)
        results.append({"part": "target forward (capture)", "precision": precision, "tokens_per_s": tokens / seconds})
    rows = capture_rows(target_fp32, input_ids, positions, top_k, torch.float32)
    rows |= {"input_ids": input_ids, "position_ids": positions,
             "loss_mask": torch.ones_like(input_ids, dtype=torch.bool)}
    ranking = draft.draft_vocab
    for size in vocab_sizes:
        draft.set_draft_vocabulary(None if size == 0 else ranking[:size])
        label = "whole vocabulary" if size == 0 else f"{size}-token vocabulary"
        for precision in ("fp32", "bf16", "fp32", "bf16"):
            seconds = timed(draft_step(draft, rows, precision), repeats)
            results.append({"part": f"draft step, {label}", "precision": precision, "tokens_per_s": tokens / seconds})
    draft.set_draft_vocabulary(ranking)
    return merge(results)


def merge(results: list[dict]) -> list[dict]:
    """The best of the alternated runs per (part, precision): noise on a shared machine only slows a run down."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["part"], r["precision"])
        if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
            best[key] = r
    return list(best.values())


def markdown_table(rows: list[dict]) -> str:
    parts = list(dict.fromkeys(r["part"] for r in rows))
    rate = {(r["part"], r["precision"]): r["tokens_per_s"] for r in rows}
    lines = ["| part | fp32 tokens/s | bf16 tokens/s | bf16 / fp32 |", "|---|---|---|---|"]
    lines += [f"| {p} | {rate[p, 'fp32']:,.0f} | {rate[p, 'bf16']:,.0f} | {rate[p, 'bf16'] / rate[p, 'fp32']:.2f}x |"
              for p in parts]
    return "\n".join(lines)


def throughput_cli(args: argparse.Namespace) -> None:
    from ..loading import load_causal_lm
    from ..modeling import LongSpecDraftModel
    from ..vocabulary import count_target_outputs, ranked_vocabulary
    from .data import load_texts, pack

    target, tokenizer = load_causal_lm(args.target, args.gguf_file, "fp32")
    target_bf16, _ = load_causal_lm(args.target, args.gguf_file, "bf16")
    if tokenizer is None:
        raise SystemExit("longspec throughput: the target has no tokenizer to cut training sequences with.")
    input_ids = pack(load_texts([args.data]), tokenizer, args.seq_len)[: args.batch_size]
    draft = (LongSpecDraftModel.from_pretrained(args.draft) if args.draft
             else LongSpecDraftModel.from_target(target))
    draft.train()  # before binding: a fresh draft about to be trained is not "untrained"
    draft.bind(target)
    if draft.draft_vocab is None or len(draft.draft_vocab) < max(args.vocab_sizes):
        # Any ranking serves to time a vocabulary of a given size: the target's predictions on these sequences.
        draft.set_draft_vocabulary(ranked_vocabulary(count_target_outputs(target, input_ids), max(args.vocab_sizes)))
    rows = measure(target, target_bf16, draft, input_ids, args.vocab_sizes, repeats=args.repeats)
    print(f"{args.batch_size} x {args.seq_len} tokens per step, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} (best of 2 alternated runs)")
    print(markdown_table(rows))
