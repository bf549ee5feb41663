"""`longspec cost`: model and drafter loading and output (its options: `longspec_hf_cli`)."""

from __future__ import annotations

import argparse


def resolve_dtype(dtype: str, device) -> str:
    """"auto": bf16 on CUDA (what an 8B model is served in), fp32 on CPU (where bf16 matmuls are often slow)."""
    if dtype != "auto":
        return dtype
    return "bf16" if device.type == "cuda" else "fp32"


def check_positions(target, needed: int) -> None:
    """Refuse contexts beyond the target's positions up front, before minutes of prefill."""
    limit = getattr(target.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit is not None and needed > limit:
        raise SystemExit(f"longspec cost: the longest context needs {needed} positions but the target has "
                         f"{limit}; use shorter --contexts (random:<name> targets lift the limit themselves).")


def drafters(target, args: argparse.Namespace) -> dict:
    """name -> drafter: a random LongSpec draft (its cost is a trained one's), and SelfDraft if asked for; with
    `--compile-rounds`, a second instance of each (`<name>_compiled`) whose rounds run compiled."""
    from ..loading import load_draft

    def make(kind: str):
        if kind == "longspec":
            return load_draft(None, target, seed=args.seed)
        from ..self_draft import SelfDraft

        return SelfDraft.from_target(target, window_size=args.self_draft_window)

    kinds = ["longspec"] + (["self_draft"] if args.self_draft else [])
    found = {kind: make(kind) for kind in kinds}
    if args.compile_rounds:
        from transformers import CompileConfig

        for kind in kinds:
            found[f"{kind}_compiled"] = make(kind)
            found[f"{kind}_compiled"].generation_config.compile_config = CompileConfig()
    for drafter in found.values():
        drafter.generation_config.tree_attn_backend = args.attn_backend
    return found


def cost_cli(args: argparse.Namespace) -> dict:
    from ..loading import load_causal_lm, resolve_device
    from . import CostSettings, markdown_table, run_cost, write_outputs
    from .runner import short_call_tokens

    device = resolve_device(args.device, "cost")
    trees = dict(args.trees)
    # Room for the longest context, the long call's tokens and one tree on top.
    needed = max(args.contexts) + short_call_tokens(trees) + args.rounds + max(sum(s) for s in trees.values()) + 1
    target, _ = load_causal_lm(args.target, args.gguf_file, resolve_dtype(args.dtype, device), device,
                               args.target_attn, min_positions=needed)
    check_positions(target, needed)
    settings = CostSettings(contexts=args.contexts, trees=trees, rounds=args.rounds, repeats=args.repeats,
                            kernel_queries=args.kernel_queries, kernel_repeats=args.kernel_repeats, seed=args.seed)
    result = run_cost(target, drafters(target, args), settings)
    result["environment"]["target"] = args.target  # as typed: an offline name rather than the folder it maps to
    paths = write_outputs(result, args.output_dir)
    print(markdown_table(result))
    print("written:", ", ".join(str(p) for p in paths.values()))
    return result
