"""`longspec <command> --help` answers at once: no command imports torch, transformers or the package to list its
options."""

from __future__ import annotations

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


def test_eval_tree_shape_takes_widths_or_auto():
    from longspec_hf.tree import tree_setting

    def parsed(*shape):
        args = longspec_hf_cli.build_parser("eval").parse_args(
            ["eval", "--target", "t", "--draft", "d", "--tree-shape", *shape])
        return tree_setting(",".join(args.tree_shape))

    assert parsed("auto") == "auto" and parsed("4", "16") == (4, 16)
    with pytest.raises(ValueError, match="tree_shape"):
        parsed("x")


def test_generate_data_options_parse():
    args = longspec_hf_cli.build_parser("generate-data").parse_args(
        ["generate-data", "--target", "toy:llama", "--source", "python-stdlib:train", "--output", "o.jsonl",
         "--temperatures", "0", "0.7"])
    assert args.run == "longspec_hf.training.generated:generate_data_cli" and args.temperatures == [0.0, 0.7]


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


def test_train_data_help_names_every_kind_of_source():
    sub = longspec_hf_cli.build_parser("train")._subparsers._group_actions[0].choices["train"]
    text = next(a.help for a in sub._actions if a.dest == "data")
    for kind in ("datasets", "python-stdlib:train", "python-docs:train", "pypi:", "generated:"):
        assert kind in text
