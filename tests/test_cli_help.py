"""`longspec <command> --help` answers at once: no command imports torch, transformers or the package to list its
options."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import longspec_hf_cli

HEAVY = ("torch", "transformers", "longspec_hf")


@pytest.mark.parametrize("command", [None, *longspec_hf_cli.COMMANDS])
def test_help_imports_nothing_heavy(command):
    argv = [command, "--help"] if command else ["--help"]
    script = (
        "import sys, longspec_hf_cli\n"
        "try:\n"
        f"    longspec_hf_cli.main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"usage: longspec {command or ''}".rstrip())
    assert out.strip().splitlines()[-1] == "[]"


def option_table(add_arguments) -> list[tuple]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    keys = ("option_strings", "dest", "nargs", "const", "default", "type", "choices", "required", "help", "metavar")
    return [(type(action).__name__, *(getattr(action, key) for key in keys)) for action in parser._actions]


def test_eval_options_match_the_evaluation_module():
    from longspec_hf.evaluation import add_eval_arguments

    # The command line keeps its own copy (evaluation imports torch): it must not drift.
    assert option_table(longspec_hf_cli.add_eval_arguments) == option_table(add_eval_arguments)


def test_train_flags_are_the_train_config_fields():
    from dataclasses import fields

    from longspec_hf.training import TrainConfig

    args = longspec_hf_cli.build_parser("train").parse_args(
        ["train", "--target", "t", "--data", "a.txt", "b.txt", "--output-dir", "o", "--lr", "0.5", "--seq-len", "64",
         "--tokenizer", "tok", "--resume", "--tree-shape", "2", "2"]
    )
    values = {k: v for k, v in vars(args).items() if k not in ("command", "recipe", "run")}
    config = TrainConfig.from_dict(values)
    assert (config.data, config.lr, config.seq_len, config.tokenizer, config.resume, config.tree_shape) == (
        ["a.txt", "b.txt"], 0.5, 64, "tok", True, [2, 2])
    assert config.max_steps == TrainConfig.__dataclass_fields__["max_steps"].default  # not given: the default
    sub = longspec_hf_cli.build_parser("train")._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in sub._actions} - {"help", "recipe", "run"}
    assert flags == {f.name for f in fields(TrainConfig)}
