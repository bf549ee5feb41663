"""`longspec bench`: flags, model loading and output for the benchmark harness."""

from __future__ import annotations

import argparse


def parse_tree(spec: str) -> tuple[str, list[int]]:
    """`NAME=4,16,16` -> ("NAME", [4, 16, 16])."""
    name, _, shape = spec.partition("=")
    if not shape:
        raise argparse.ArgumentTypeError(f"--tree takes NAME=W1,W2,... (e.g. longspec_chain=1,1,1), got {spec!r}")
    return name, [int(w) for w in shape.split(",")]


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target model id or folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --target, if the target is a GGUF")
    parser.add_argument("--draft", default=None, help="LongSpec draft (folder or id); LongSpec methods skip without")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=3, help="prompts per workload and context length")
    parser.add_argument("--workloads", nargs="+", default=["code", "summarization"],
                        help="code, summarization, LongBench tasks (gov_report qmsum multi_news lcc repobench-p) or "
                             "NAME=SOURCE for your own text")
    parser.add_argument("--longbench", default=None, help="LongBench folder of <task>.jsonl files, or a dataset id")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods (default: all)")
    parser.add_argument("--tree", type=parse_tree, action="append", default=None, metavar="NAME=W1,W2,...",
                        help="a LongSpec method per tree shape (repeatable; default longspec_chain=1,1,1 and "
                             "longspec_tree=4,16,16,16,16)")
    parser.add_argument("--self-draft-tree", default="1,1,1,1",
                        help="tree of the training-free self-speculative draft (W1,W2,...), or 'none' to skip it")
    parser.add_argument("--self-draft-window", type=int, default=512)
    parser.add_argument("--specpv-budgets", type=int, nargs="+", default=[], metavar="TOKENS",
                        help="add the first LongSpec tree (or the self-draft) with SpecPV partial verification "
                             "retrieving this many tokens per layer and KV head (approximate; see 'agree %%')")
    parser.add_argument("--early-exit-layer", type=int, default=None)
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--attn-backend", default="auto", choices=["auto", "flash_attn", "sdpa_lse", "torch"],
                        help="LongSpec's hybrid tree-attention backend")
    parser.add_argument("--target-attn", default=None, help="the target's attn_implementation (sdpa, eager, ...)")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--output-dir", default="bench-results")


def bench_cli(args: argparse.Namespace) -> dict:
    import torch

    from ..loading import load_causal_lm, load_draft
    from . import BenchSettings, default_methods, parse_workload, run_bench, write_outputs

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    target, tokenizer = load_causal_lm(args.target, args.gguf_file, args.dtype, device, args.target_attn)
    draft = None
    if args.draft:
        draft = load_draft(args.draft, target)
        draft.generation_config.tree_attn_backend = args.attn_backend
    trees = dict(args.tree) if args.tree else None
    self_tree = None if args.self_draft_tree.lower() == "none" else parse_tree(f"x={args.self_draft_tree}")[1]
    methods = default_methods(target, draft, trees, args.early_exit_layer, args.prompt_lookup_tokens, self_tree,
                              args.self_draft_window, args.specpv_budgets, args.attn_backend)
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
    paths = write_outputs(result, args.output_dir)
    print(paths["markdown"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return result
