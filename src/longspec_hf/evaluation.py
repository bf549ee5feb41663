"""`longspec eval`: tau (tokens per target forward) of a draft on held-out text, per domain and context length.

For each domain and context length, prompts are windows of exactly that many tokens cut from the domain's documents;
each is continued greedily with the draft, and tau is pooled over the prompts: (accepted draft tokens + rounds) /
rounds. The default domains come from outside everything training reads (the CPython sources and docs):
``code`` = ``installed-code`` (Python sources of the installed third-party packages) and ``prose`` =
``installed-prose`` (their READMEs and license texts); see `longspec_hf.training.data`. The in-domain held-out
splits stay available as ``--domain stdlib=python-stdlib:heldout --domain docs=python-docs:heldout``.

Per domain the text is tokenized once, as one stream long enough for the longest context, and every context's
prompts are spread evenly over that same stream, so the cells of a domain differ in context length only. A cell
whose text is shorter than its context is skipped with a message (and a ``skipped`` row).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DEFAULT_DOMAINS = {"code": "installed-code", "prose": "installed-prose"}
DEFAULT_PROMPTS = 8


def token_stream(tokenizer, texts: list[str], limit: int, tokenized: list[list[int]] | None = None) -> list[int]:
    """The documents' tokens, concatenated, up to the first document that reaches `limit` tokens. `tokenized`: a
    list the documents' tokens are kept in, so later calls with a higher limit tokenize only what they add."""
    tokenized = [] if tokenized is None else tokenized
    stream: list[int] = []
    for index, text in enumerate(texts):
        if index == len(tokenized):
            tokenized.append(tokenizer(text, add_special_tokens=False).input_ids)
        stream.extend(tokenized[index])
        if len(stream) >= limit:
            break
    return stream


def windows(stream: list[int], context: int, count: int) -> list[torch.LongTensor]:
    """`count` windows `[1, context]` spread evenly over `stream` (overlapping when it is shorter than all of them)."""
    if len(stream) < context:
        raise ValueError(f"The held-out text has {len(stream)} tokens, fewer than a {context}-token context.")
    starts = torch.linspace(0, len(stream) - context, count).long().tolist()
    return [torch.tensor(stream[s : s + context])[None] for s in starts]


def prompt_text(tokenizer, texts: list[str], context: int, count: int,
                tokenized: list[list[int]] | None = None) -> list[int]:
    """The stretch of text `count` prompts of `context` tokens are cut from: sized by that context alone, so a
    cell's prompts do not depend on which other contexts the same call asks for."""
    return token_stream(tokenizer, texts, context * count * 2, tokenized)


def prompt_windows(tokenizer, texts: list[str], context: int, count: int) -> list[torch.LongTensor]:
    """`count` windows `[1, context]` spread evenly over the concatenated documents."""
    return windows(prompt_text(tokenizer, texts, context, count), context, count)


def measure_tau(target, draft, prompts: list[torch.LongTensor], max_new_tokens: int) -> dict:
    """tau pooled over `prompts`, and the draft's milliseconds per round (its part of the rounds, profiled)."""
    rounds = accepted = lookup = 0
    seconds = draft_seconds = 0.0
    profile = getattr(draft.generation_config, "profile_rounds", False)
    draft.generation_config.profile_rounds = True
    try:
        for ids in prompts:
            start = time.perf_counter()
            # A window of real text has no padding, whatever ids it holds (a pad id may be a real token there).
            target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft, do_sample=False,
                            max_new_tokens=max_new_tokens)
            seconds += time.perf_counter() - start
            rounds += draft.stats.rounds
            accepted += draft.stats.accepted_tokens
            lookup += draft.stats.lookup_accepted_tokens
            draft_seconds += draft.stats.timings.get("draft", 0.0)
    finally:
        draft.generation_config.profile_rounds = profile
    return {"tau": (accepted + rounds) / max(rounds, 1), "rounds": rounds, "accepted_tokens": accepted,
            "lookup_accepted_tokens": lookup, "prompts": len(prompts), "seconds": round(seconds, 2),
            "draft_ms_per_round": round(1000 * draft_seconds / max(rounds, 1), 2)}


def draft_vocabularies(draft, sizes: list[int] | None) -> list[tuple[str, torch.Tensor | None]]:
    """`(label, token ids or None)` per requested draft-vocabulary size: a prefix of the draft's own ranked
    vocabulary, 0 for the whole vocabulary; None (no sizes asked): the draft as it is."""
    own = getattr(draft, "draft_vocab", None)
    if not sizes:
        return [(str(len(own)) if own is not None else "all", own)]
    if not hasattr(draft, "set_draft_vocabulary"):
        raise ValueError(f"--draft-vocab-sizes: a {type(draft).__name__} has no draft vocabulary (LongSpec drafts do).")
    chosen = []
    for size in sizes:
        if size == 0:
            chosen.append(("all", None))
        elif own is None or size > len(own):
            have = "none" if own is None else f"{len(own)} tokens"
            raise ValueError(f"--draft-vocab-sizes {size}: the draft's ranked vocabulary has {have}; sizes are "
                             "prefixes of it (0 = the whole vocabulary). Train with --draft-vocab-size, or rank one "
                             "with draft.set_draft_vocabulary(ranked_vocabulary(...)).")
        else:
            chosen.append((str(size), own[:size]))
    return chosen


def evaluate(target, draft, tokenizer, domains: dict[str, str], contexts: list[int], max_new_tokens: int,
             prompts_per_context: int = DEFAULT_PROMPTS, vocab_sizes: list[int] | None = None,
             agreement_lags: list[int] | None = None, teacher_forced: bool = False) -> list[dict]:
    """One row per (domain, context, draft vocabulary): tau pooled over `prompts_per_context` prompts, or
    ``skipped`` with the reason when the domain's text is shorter than the context. `vocab_sizes`: compare draft
    vocabularies (prefixes of the draft's ranked one, 0 = all) on the same prompts; the draft is left as it was.
    `agreement_lags`: instead of tau, the teacher-forced top-1 agreement with the target at each of these lags
    (:mod:`~longspec_hf.agreement`; no generation), one row per lag. `teacher_forced`: a chain tree's tau (the
    draft alone) computed on the target's plain greedy continuations instead of decoded: the same rounds, cheaper."""
    from .agreement import chain_depth, chain_tau, greedy_continuations, is_teacher_forceable, measure_agreement

    flag = "--agreement" if agreement_lags else "--teacher-forced" if teacher_forced else None
    if flag and not is_teacher_forceable(draft):
        raise ValueError(f"{flag} needs a LongSpec draft (its forward reads the target's KV); a "
                         f"{type(draft).__name__} has none: measure its tau by decoding instead (drop {flag}).")
    generation_config = getattr(draft, "generation_config", None)
    depth = chain_depth(getattr(generation_config, "tree_shape", None))
    if teacher_forced and (not depth or getattr(generation_config, "prompt_lookup_num_tokens", None)):
        raise ValueError("--teacher-forced computes a chain's tau with the draft alone: pass --tree-shape 1 1 1 (any "
                         "depth, width 1) and --prompt-lookup 0; other trees are measured by decoding.")

    own = getattr(draft, "draft_vocab", None)
    vocabularies = draft_vocabularies(draft, vocab_sizes)
    rows = []
    for cell, prompts in held_out_cells(tokenizer, domains, contexts, prompts_per_context):
        if prompts is None:
            rows.append(cell)
            continue
        continuations = greedy_continuations(target, prompts, max_new_tokens) if teacher_forced else None
        for label, vocab in vocabularies:
            if vocab_sizes:
                draft.set_draft_vocabulary(vocab)
            if continuations is not None:
                rows.append({**cell, "vocab": label, **chain_tau(draft, continuations, depth)})
            elif agreement_lags:
                rows += [{**cell, "vocab": label, **row}
                         for row in measure_agreement(target, draft, prompts, agreement_lags)]
            else:
                rows.append({**cell, "vocab": label, **measure_tau(target, draft, prompts, max_new_tokens)})
        if vocab_sizes:
            draft.set_draft_vocabulary(own)
    return rows


def held_out_cells(tokenizer, domains: dict[str, str], contexts: list[int], prompts_per_context: int):
    """Yield `(cell, prompts)` per (domain, context): `cell` names it, `prompts` are its windows `[1, context]`; a
    domain whose text is shorter than the context yields `cell` with the ``skipped`` reason and `prompts` None."""
    from .training.data import load_texts

    for domain, source in domains.items():
        texts, tokenized = load_texts([source]), []
        for context in contexts:
            stream = prompt_text(tokenizer, texts, context, prompts_per_context, tokenized)
            cell = {"domain": domain, "source": source, "context": context}
            if len(stream) < context:
                reason = f"{source} has {len(stream)} tokens, fewer than one {context}-token prompt"
                print(f"longspec eval: skipping {domain} at context {context}: {reason}; add text to the domain "
                      "(--domain NAME=SOURCE) or use shorter --contexts.", file=sys.stderr)
                yield {**cell, "skipped": reason}, None
                continue
            if len(stream) < context * prompts_per_context:
                print(f"longspec eval: {domain} at context {context}: {len(stream)} tokens of text, so its "
                      f"{prompts_per_context} prompts overlap.", file=sys.stderr)
            yield cell, windows(stream, context, prompts_per_context)


TAU_COLUMNS = ("tau", "draft ms/round", "rounds"), lambda r: (f"{r['tau']:.2f}", draft_ms(r), r["rounds"])
AGREEMENT_COLUMNS = (("lag", "top-1 agreement", "positions"),
                     lambda r: (r["lag"], f"{r['agreement']:.3f}", r["positions"]))


def markdown_table(rows: list[dict]) -> str:
    """Tau rows, or agreement rows (`--agreement`), one line each; a skipped cell says why."""
    names, values = AGREEMENT_COLUMNS if any("agreement" in r for r in rows) else TAU_COLUMNS
    lines = [f"| domain | context | draft vocabulary | {' | '.join(names)} | prompts |",
             "|---" * (len(names) + 4) + "|"]
    lines += [f"| {r['domain']} | {r['context']} | | skipped: {r['skipped']} | | | |" if "skipped" in r else
              f"| {r['domain']} | {r['context']} | {r['vocab']} | {' | '.join(map(str, values(r)))} | {r['prompts']} |"
              for r in rows]
    return "\n".join(lines)


def draft_ms(row: dict) -> str:
    """The draft's ms per round, or "-" for a tau computed without decoding (teacher-forced)."""
    return f"{row['draft_ms_per_round']:.1f}" if "draft_ms_per_round" in row else "-"


def evaluate_cli(args: argparse.Namespace) -> None:
    from .loading import load_causal_lm, load_draft
    from .tree import tree_setting, tree_setting_text

    target, tokenizer = load_causal_lm(args.target, args.gguf_file)
    draft = load_draft(args.draft, target)
    if args.tree_shape:
        draft.generation_config.tree_shape = tree_setting(",".join(args.tree_shape))
    if getattr(args, "prompt_lookup", None) is not None:
        draft.generation_config.prompt_lookup_num_tokens = args.prompt_lookup
    domains = dict(d.split("=", 1) for d in args.domain) if args.domain else DEFAULT_DOMAINS
    lags = getattr(args, "agreement", None)
    rows = evaluate(target, draft, tokenizer, domains, args.contexts, args.max_new_tokens, args.prompts,
                    getattr(args, "draft_vocab_sizes", None), lags, getattr(args, "teacher_forced", False))
    lookup = getattr(draft.generation_config, "prompt_lookup_num_tokens", None)
    if lags:
        print("teacher-forced top-1 agreement with the target's greedy token, on the prompts' own text")
    else:
        print(f"tree shape {tree_setting_text(draft.generation_config.tree_shape)}"
              f"{f' + a {lookup}-token prompt-lookup branch' if lookup else ''}, greedy, {args.max_new_tokens} new "
              f"tokens per prompt{', teacher-forced' if getattr(args, 'teacher_forced', False) else ''}")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
