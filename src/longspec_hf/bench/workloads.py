"""Benchmark workloads: prompts of an exact token length, cut from held-out long text or from LongBench.

* ``code`` — long code completion: windows of the CPython standard library's held-out sources
  (``python-stdlib:heldout``), which the shipped draft never trained on.
* ``summarization`` — long-document summarization: held-out ``pydoc_data`` documentation
  (``python-docs:heldout``) followed by an instruction to summarise.
* LongBench tasks (``gov_report``, ``qmsum``, ``multi_news``, ``lcc``, ``repobench-p``): records in LongBench's
  JSON-lines format (``context``, ``input``, ``answers``, ...) from a local folder of ``<task>.jsonl`` files (the
  layout of LongBench's data archive) or from a `datasets` id when a hub is reachable; long records are cut in the
  middle to the context length, as LongBench does, so the instruction at both ends survives.

Every workload returns prompts of exactly ``context`` tokens, so a context sweep compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SUMMARY_INSTRUCTION = "\n\nSummarize the documentation above in a few sentences.\nSummary:"

# Prompt wording for the LongBench tasks: the task's instruction before and after the record's fields.
LONGBENCH_TEMPLATES = {
    "gov_report": "A government agency's report follows. Write a one-page summary of it.\n\nReport:\n{context}\n\n"
                  "Write a one-page summary of the report above.\n\nSummary:",
    "qmsum": "A meeting transcript follows, then a query about it. Answer the query in one or more sentences.\n\n"
             "Transcript:\n{context}\n\nQuery: {input}\nAnswer:",
    "multi_news": "Several news articles follow. Write a one-page summary of all of them.\n\nNews:\n{context}\n\n"
                  "Write a one-page summary of the news above.\n\nSummary:",
    "lcc": "Complete the next line of the code below.\n\n{context}",
    "repobench-p": "Complete the next line of the code below.\n\n{context}{input}",
}


@dataclass
class Workload:
    """A named source of long prompts; `prompts(tokenizer, context, count)` -> `count` tensors `[1, context]`."""

    name: str
    source: str
    kind: str  # "completion" | "summarization" | "longbench"

    def prompts(self, tokenizer, context: int, count: int) -> list[torch.LongTensor]:
        if self.kind == "longbench":
            return longbench_prompts(self.name, self.source, tokenizer, context, count)
        from ..evaluation import prompt_windows
        from ..training.data import load_texts

        texts = load_texts([self.source])
        if self.kind == "completion":
            return prompt_windows(tokenizer, texts, context, count)
        suffix = tokenizer(SUMMARY_INSTRUCTION, add_special_tokens=False, return_tensors="pt").input_ids
        if suffix.shape[1] >= context:
            raise ValueError(f"A {context}-token context cannot hold the summarization instruction; use a longer one.")
        windows = prompt_windows(tokenizer, texts, context - suffix.shape[1], count)
        return [torch.cat([w, suffix], dim=-1) for w in windows]


def offline_workloads() -> dict[str, Workload]:
    return {
        "code": Workload("code", "python-stdlib:heldout", "completion"),
        "summarization": Workload("summarization", "python-docs:heldout", "summarization"),
    }


def parse_workload(spec: str, longbench: str | None = None) -> Workload:
    """`code`, `summarization`, a LongBench task name, or `NAME=SOURCE[@summarization]` for your own text."""
    if "=" in spec:
        name, source = spec.split("=", 1)
        kind = "completion"
        for suffix in ("completion", "summarization"):
            if source.endswith(f"@{suffix}"):
                source, kind = source[: -len(suffix) - 1], suffix
        return Workload(name, source, kind)
    if spec in offline_workloads():
        return offline_workloads()[spec]
    if spec in LONGBENCH_TEMPLATES:
        return Workload(spec, longbench or "THUDM/LongBench", "longbench")
    known = sorted(offline_workloads()) + sorted(LONGBENCH_TEMPLATES)
    raise ValueError(f"Unknown workload {spec!r}; use one of {known} or NAME=SOURCE (local text files or dataset "
                     "ids, optionally ending in @summarization).")


def load_longbench(task: str, source: str) -> list[dict]:
    """LongBench records of `task`: `<source>/<task>.jsonl` if `source` is a folder, else the `datasets` id."""
    import datasets

    folder = Path(source)
    if folder.is_dir():
        path = folder / f"{task}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; a LongBench folder holds one <task>.jsonl per task "
                                    "(the layout of LongBench's data archive).")
        return list(datasets.load_dataset("json", data_files=str(path), split="train"))
    try:
        return list(datasets.load_dataset(source, task, split="test"))
    except Exception as err:  # hub unreachable, or a loader this datasets version cannot run
        raise RuntimeError(f"Could not load LongBench task {task!r} from {source!r} ({type(err).__name__}: {err}). "
                           "Download LongBench's data archive and pass its folder with --longbench.") from err


def middle_truncate(ids: list[int], length: int) -> list[int]:
    """Keep the first and last `length // 2` tokens: LongBench's cut, which keeps the instructions at both ends."""
    if len(ids) <= length:
        return ids
    head = length // 2
    return ids[:head] + ids[len(ids) - (length - head):]


def longbench_prompts(task: str, source: str, tokenizer, context: int, count: int) -> list[torch.LongTensor]:
    template = LONGBENCH_TEMPLATES[task]
    prompts = []
    for record in load_longbench(task, source):
        text = template.format(context=record.get("context", ""), input=record.get("input", ""))
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) < context:
            continue  # too short for this context length: the sweep compares prompts of one length
        prompts.append(torch.tensor(middle_truncate(ids, context))[None])
        if len(prompts) == count:
            break
    if not prompts:
        raise ValueError(f"No {task} record reaches {context} tokens; use a shorter context for this task.")
    return prompts
