"""`longspec` command line: `train`, `eval`, `bench`, `convert` (official checkpoints) and `push` (to the Hub)."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path


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
            parser.add_argument(flag, nargs="+", type=item, default=argparse.SUPPRESS)
        else:
            default = None if required else (f.default if f.default is not MISSING else None)
            parser.add_argument(flag, type=base, default=argparse.SUPPRESS, help=f"(default: {default})")


def train_command(args: argparse.Namespace) -> None:
    from .training import TrainConfig, run_recipe, train

    values = {k: v for k, v in vars(args).items() if k not in ("command", "recipe", "func") and v is not None}
    stages = None
    if args.recipe:
        recipe = json.loads(open(args.recipe).read())
        values = {**recipe.get("base", {}), **values}
        stages = recipe.get("stages")
    for name in ("target", "output_dir"):
        if name not in values:
            sys.exit(f"longspec train: --{name.replace('_', '-')} is required")
    if "data" not in values and not stages:
        sys.exit("longspec train: --data is required")
    if stages:
        values.setdefault("data", stages[0].get("data", []))
        run_recipe(TrainConfig.from_dict(values), stages)
    else:
        train(TrainConfig.from_dict(values))


def eval_command(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_cli

    evaluate_cli(args)


def convert_command(args: argparse.Namespace) -> None:
    from .checkpoints import convert_official_checkpoint

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.exit(f"longspec convert: {out} exists and is not empty; pass --overwrite or choose another folder")
    hub = {"revision": args.revision} if args.revision else {}
    convert_official_checkpoint(args.checkpoint, out, **hub)
    print(f"wrote {out} (longspec-hf layout); load it with LongSpecDraftModel.from_pretrained({str(out)!r})")


def push_command(args: argparse.Namespace) -> None:
    from huggingface_hub import ModelCard

    from .modeling import LongSpecDraftModel

    draft = LongSpecDraftModel.from_pretrained(args.draft)
    readme = Path(args.draft) / "README.md"
    card = ModelCard.load(readme) if readme.is_file() else None
    commit = draft.push_to_hub(
        args.repo_id, model_card=card, custom_generate=not args.no_custom_generate, private=args.private or None,
        revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message,
    )
    print(f"pushed {args.draft} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")


def main(argv: list[str] | None = None) -> None:
    from .training import TrainConfig

    parser = argparse.ArgumentParser(prog="longspec", description="LongSpec drafts for transformers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a draft for a causal LM (runs under accelerate launch)")
    add_dataclass_arguments(train_parser, TrainConfig)
    train_parser.add_argument("--recipe", help="JSON file: {'base': {...options}, 'stages': [{...}, ...]}")
    train_parser.set_defaults(func=train_command)
    eval_parser = commands.add_parser("eval", help="measure tau of a draft on held-out text at several contexts")
    from .evaluation import add_eval_arguments

    add_eval_arguments(eval_parser)
    eval_parser.set_defaults(func=eval_command)
    bench_parser = commands.add_parser("bench", help="speed-up, tau and memory of decoding methods, same-run baseline")
    from .bench.cli import add_bench_arguments, bench_cli

    add_bench_arguments(bench_parser)
    bench_parser.set_defaults(func=bench_cli)
    convert_parser = commands.add_parser("convert", help="write an official LongSpec checkpoint in this layout")
    convert_parser.add_argument("checkpoint", help="official checkpoint id (e.g. sail/longspec-...) or folder")
    convert_parser.add_argument("output_dir")
    convert_parser.add_argument("--revision")
    convert_parser.add_argument("--overwrite", action="store_true")
    convert_parser.set_defaults(func=convert_command)
    push_parser = commands.add_parser("push", help="upload a saved draft with its card and custom_generate/ folder")
    push_parser.add_argument("draft", help="draft folder (save_pretrained layout; its README.md is the card)")
    push_parser.add_argument("repo_id", help="Hub repository, e.g. my-org/my-draft")
    push_parser.add_argument("--private", action="store_true")
    push_parser.add_argument("--revision", help="branch to push to")
    push_parser.add_argument("--create-pr", action="store_true")
    push_parser.add_argument("--commit-message")
    push_parser.add_argument("--no-custom-generate", action="store_true",
                             help="do not include the custom_generate/ folder for plain-transformers use")
    push_parser.set_defaults(func=push_command)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
