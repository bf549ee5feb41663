"""`longspec eval`: tau (tokens per target forward) of a draft on held-out text, per domain and context length.

For each domain and context length, prompts are windows of exactly that many tokens cut from the domain's held-out
documents (the python-stdlib / python-docs held-out splits by default, never trained on); each is continued greedily
with the draft, and tau is pooled over the prompts: (accepted draft tokens + rounds) / rounds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

DEFAULT_DOMAINS = {"code": "python-stdlib:heldout", "docs": "python-docs:heldout"}


def prompt_windows(tokenizer, texts: list[str], context: int, count: int) -> list[torch.LongTensor]:
    """`count` windows `[1, context]` spread evenly over the concatenated documents."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids)
        if len(stream) >= context * count * 2:
            break
    if len(stream) < context:
        raise ValueError(f"The held-out text has {len(stream)} tokens, fewer than a {context}-token context.")
    starts = torch.linspace(0, len(stream) - context, count).long().tolist()
    return [torch.tensor(stream[s : s + context])[None] for s in starts]


def measure_tau(target, draft, prompts: list[torch.LongTensor], max_new_tokens: int) -> dict:
    rounds = accepted = 0
    seconds = 0.0
    for ids in prompts:
        start = time.perf_counter()
        target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=max_new_tokens)
        seconds += time.perf_counter() - start
        rounds += draft.stats.rounds
        accepted += draft.stats.accepted_tokens
    return {"tau": (accepted + rounds) / max(rounds, 1), "rounds": rounds, "accepted_tokens": accepted,
            "prompts": len(prompts), "seconds": round(seconds, 2)}


def evaluate(target, draft, tokenizer, domains: dict[str, str], contexts: list[int], max_new_tokens: int,
             prompts_per_context: int) -> list[dict]:
    from .training.data import load_texts

    rows = []
    for domain, source in domains.items():
        texts = load_texts([source])
        for context in contexts:
            prompts = prompt_windows(tokenizer, texts, context, prompts_per_context)
            rows.append({"domain": domain, "context": context, **measure_tau(target, draft, prompts, max_new_tokens)})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| domain | context | tau | rounds | prompts |", "|---|---|---|---|---|"]
    lines += [f"| {r['domain']} | {r['context']} | {r['tau']:.2f} | {r['rounds']} | {r['prompts']} |" for r in rows]
    return "\n".join(lines)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target model id or folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --target, if the target is a GGUF")
    parser.add_argument("--draft", required=True,
                        help="draft folder or id, or 'self' for the training-free self-speculative draft")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--domain", action="append", default=None, metavar="NAME=SOURCE",
                        help="held-out text per domain, e.g. code=python-stdlib:heldout (repeatable)")
    parser.add_argument("--tree-shape", type=int, nargs="+", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per domain and context")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")


def evaluate_cli(args: argparse.Namespace) -> None:
    from .loading import load_causal_lm, load_draft

    target, tokenizer = load_causal_lm(args.target, args.gguf_file)
    draft = load_draft(args.draft, target)
    if args.tree_shape:
        draft.generation_config.tree_shape = args.tree_shape
    domains = dict(d.split("=", 1) for d in args.domain) if args.domain else DEFAULT_DOMAINS
    rows = evaluate(target, draft, tokenizer, domains, args.contexts, args.max_new_tokens, args.prompts)
    print(f"tree shape {draft.generation_config.tree_shape}, greedy, {args.max_new_tokens} new tokens per prompt")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
