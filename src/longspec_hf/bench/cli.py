"""`longspec bench`: model loading and output for the benchmark harness (its options: `longspec_hf_cli`)."""

from __future__ import annotations

import argparse

from longspec_hf_cli import add_bench_arguments, parse_bench_tree

__all__ = ["add_bench_arguments", "bench_cli", "parse_bench_tree"]


def bench_cli(args: argparse.Namespace) -> dict:
    from ..loading import RANDOM_PREFIX, load_causal_lm, load_draft, resolve_device
    from . import BenchSettings, default_methods, parse_workload, run_bench, write_outputs

    if args.target.startswith(RANDOM_PREFIX):
        raise SystemExit(f"longspec bench: {args.target} has no tokenizer to cut prompts with; time a random model "
                         "with `longspec cost`, or bench a real one.")
    device = resolve_device(args.device, "bench")
    target, tokenizer = load_causal_lm(args.target, args.gguf_file, args.dtype, device, args.target_attn)
    draft = None
    if args.draft:
        draft = load_draft(args.draft, target)
        draft.generation_config.tree_attn_backend = args.attn_backend
    trees = dict(args.tree) if args.tree else None
    self_tree = None if args.self_draft_tree.lower() == "none" else parse_bench_tree(f"x={args.self_draft_tree}")[1]
    # Compiling is the choice on a GPU; on a CPU it takes minutes per context length, so it is asked for there.
    compiled = args.compiled if args.compiled is not None else device.type == "cuda"
    methods = default_methods(target, draft, trees, args.early_exit_layer, args.prompt_lookup_tokens, self_tree,
                              args.self_draft_window, args.specpv_budgets, args.attn_backend, compiled,
                              args.lookup_branch, args.compile_rounds)
    if args.methods:
        unknown = set(args.methods) - {m.name for m in methods}
        if unknown:
            raise SystemExit(f"longspec bench: unknown method(s) {sorted(unknown)}; available: "
                             f"{[m.name for m in methods]}")
        methods = [m for m in methods if m.name in args.methods]
    workloads = [parse_workload(w, args.longbench) for w in args.workloads]
    settings = BenchSettings(args.contexts, args.max_new_tokens, args.prompts, warmup=not args.no_warmup)
    result = run_bench(target, tokenizer, methods, workloads, settings)
    result["environment"]["draft"] = args.draft
    result["environment"]["target"] = args.target  # as typed: an offline name rather than the folder it maps to
    paths = write_outputs(result, args.output_dir)
    print(paths["markdown"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return result
