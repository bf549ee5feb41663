"""The `longspec` commands that live here: `train`, `eval`, `convert` (official checkpoints) and `push` (to the Hub).

The parser and `main` are in the top-level `longspec_hf_cli` module, which imports nothing heavy, so `--help` is
instant; `main` is re-exported here for `python -m longspec_hf.cli` and `accelerate launch -m longspec_hf.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from longspec_hf_cli import main

__all__ = ["main"]


def train_command(args: argparse.Namespace) -> None:
    from .training import TrainConfig, run_recipe, train

    values = {k: v for k, v in vars(args).items() if k not in ("command", "recipe", "run") and v is not None}
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

    if not getattr(args, "auto_evidence", None):
        return evaluate_cli(args)
    from . import auto_evidence

    with auto_evidence.recording() as evidence:
        evaluate_cli(args)
    auto_evidence.save(evidence, args.auto_evidence)
    print(f"\nauto's evidence ({args.auto_evidence}), replayed with other constants:\n")
    print(auto_evidence.replay(evidence))


def convert_command(args: argparse.Namespace) -> None:
    from .modeling import LongSpecDraftModel

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.exit(f"longspec convert: {out} exists and is not empty; pass --overwrite or choose another folder")
    hub = {"revision": args.revision} if args.revision else {}
    LongSpecDraftModel.convert_official(args.checkpoint, out, **hub)
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


if __name__ == "__main__":
    main()
