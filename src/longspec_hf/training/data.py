"""Training text: local files, `datasets` ids, or the offline Python corpora; tokenized and packed.

Sources (one string each):

* a local file or folder: ``.txt``/``.md``/``.rst``/``.py`` files are one document each; ``.jsonl``/``.json`` rows
  give their text column (read with `datasets`);
* ``python-stdlib:train`` / ``python-stdlib:heldout`` — the CPython standard library sources of this interpreter;
  ``python-docs:train`` / ``python-docs:heldout`` — Python's own documentation (``pydoc_data.topics``). Both split
  deterministically by a hash of the file or topic name (10% held out), so evaluation never sees training text;
* ``installed-code`` / ``installed-prose`` — evaluation text from outside CPython: the Python sources, and the long
  descriptions (README text of their METADATA) and license files, of the installed third-party distributions (this
  project excluded; source files that mostly repeat standard-library lines, such as vendored stdlib backports, are
  dropped). Distributions in a seeded order of their sorted names, at most ``INSTALLED_PER_DISTRIBUTION`` characters
  each, ``INSTALLED_BUDGET`` in all: deterministic for a given set of installed packages;
* ``pypi:<name>==<version>[,...]`` — the Python sources and documentation in the wheels of distributions that are
  not installed (an installed one is refused: its text is held out), minus the files that mostly repeat
  standard-library lines (a wheel can vendor a copy of a held-out stdlib module, e.g. eventlet's
  ``green/http/server.py``): see `longspec_hf.training.pypi`; ``pypi-prose:<name>==<version>[,...]`` — their
  documentation only (the README text of their METADATA and their ``.md``/``.rst`` files, no licenses);
* ``generated:<source>`` — the target's own continuations of prompts cut from ``<source>``; only training reads it
  (it needs the target): see `longspec_hf.training.generated`;
* anything else is a `datasets` id, optionally ``id:config`` and ``@split`` (default ``train``) — unless it looks
  like a local path (a file suffix, a leading ``.``, ``/`` or ``~``, more than one ``/``): a missing file is reported
  at once instead of being looked up on the Hub.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

from .pypi import PREFIXES as PYPI_PREFIXES
from .pypi import distribution_key, pypi_texts

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
JSON_SUFFIXES = {".jsonl", ".json"}
INSTALLED_CORPORA = ("installed-code", "installed-prose")
GENERATED_PREFIX = "generated:"
# "generated" only reaches `offline_corpus` to be refused with the fix: it needs the target, which text loading lacks.
OFFLINE_CORPORA = ("python-stdlib", "python-docs", *INSTALLED_CORPORA, GENERATED_PREFIX.rstrip(":"))
INSTALLED_BUDGET = 2_000_000  # characters: several 8k-token prompt windows for 8 prompts, spread over the packages
INSTALLED_PER_DISTRIBUTION = 40_000  # so one big package (torch) cannot fill the corpus
OWN_DISTRIBUTION = "longspec-hf"
# What the sources yield, as a number that caches built from them record (the target's continuations, feature
# stores): raised whenever a rule changes which text a source gives, so text cut by the old rule is not reused.
# 2: pypi files that mostly repeat standard-library lines are left out.
DATA_VERSION = 2
# Suffixes of data files (dataset ids do not end in them), so `corpus.txt` is a missing file, not a Hub id.
FILE_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | {".csv", ".parquet", ".gz", ".zst"}


def is_held_out(name: str, fraction: float = 0.1) -> bool:
    digest = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    return digest % 1000 < fraction * 1000


def offline_corpus(name: str, split: str) -> list[str]:
    if name == GENERATED_PREFIX.rstrip(":"):
        raise ValueError(f"generated:{split} needs the target to write its continuations; use it as training data "
                         "(longspec train --data generated:...) or write the file with generate_data().")
    if name in INSTALLED_CORPORA:
        if split != "train":  # the default `load_texts` fills in; these corpora have no splits, nothing trains on them
            raise ValueError(f"{name} has no splits (it is evaluation text only); write {name}, not {name}:{split}.")
        return installed_code() if name == "installed-code" else installed_prose()
    if split not in ("train", "heldout"):
        raise ValueError(f"Split of {name} must be 'train' or 'heldout', got {split!r}.")
    want_held_out = split == "heldout"
    if name == "python-docs":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics) if is_held_out(k) == want_held_out]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    return [p.read_text(errors="ignore") for p in files if is_held_out(str(p.relative_to(root))) == want_held_out]


def local_texts(path: Path, text_column: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    texts: list[str] = []
    for file in files:
        if file.suffix in TEXT_SUFFIXES:
            texts.append(file.read_text(errors="ignore"))
        elif file.suffix in JSON_SUFFIXES:
            texts.extend(dataset_column(load_json(file), text_column, str(file)))
    return texts


def load_json(file: Path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(file), split="train")


def dataset_column(dataset, text_column: str, name: str) -> list[str]:
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{name} has no {text_column!r} column (columns: {', '.join(dataset.column_names)}); pass the right "
            "one with --text-column."
        )
    return [t for t in dataset[text_column] if t]


def load_hub_dataset(dataset_id: str, config: str | None, split: str):
    from datasets import load_dataset

    return load_dataset(dataset_id, config, split=split)


def hub_offline() -> bool:
    """Whether `datasets` is in offline mode: HF_DATASETS_OFFLINE when set, else HF_HUB_OFFLINE (its own rule)."""
    value = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_failure(source: str, error: Exception, offline: bool) -> str:
    """One line for a source that is no local path and that the Hub did not give: the user may have meant either."""
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    if offline:
        return (f"{source} is neither a local file/folder nor reachable on the Hub in offline mode ({reason}); pass "
                f"a path (./{source} for a local folder), or unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE to download it.")
    return (f"{source} is not a local file or folder (check the spelling; write ./{source} for a local path), and "
            f"loading it from the Hub as a datasets id org/name[:config][@split] failed: {reason}")


def hub_texts(source: str, text_column: str) -> list[str]:
    name, _, split = source.partition("@")
    dataset_id, _, config = name.partition(":")
    try:
        # Offline, `datasets` still answers from its cache and fails at once when the dataset is not there.
        dataset = load_hub_dataset(dataset_id, config or None, split or "train")
    except ModuleNotFoundError:
        raise  # `datasets` is not installed: the command line names the missing module
    except Exception as error:  # unreachable, unknown, gated, wrong config or split: the Hub's traceback buries it
        raise ValueError(hub_failure(source, error, hub_offline())) from None
    return dataset_column(dataset, text_column, source)


def looks_like_local_path(source: str) -> bool:
    """Whether `source` names a local file or folder rather than a `datasets` id (`org/name:config@split`).

    A Hub id has at most one `/` and no file suffix; without this check a mistyped path would be sent to the Hub
    and fail there after its retries, with an error about the Hub.
    """
    return (
        source.startswith((".", "/", "~"))
        or Path(source).suffix.lower() in FILE_SUFFIXES
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        # `data/corpus` when a local `data/` folder exists: a path into it, not the Hub dataset `data/corpus`
        or ("/" in source and Path(source.split("/", 1)[0]).is_dir())
    )


def load_texts(sources: list[str], text_column: str = "text") -> list[str]:
    """Documents from every source, in order."""
    texts: list[str] = []
    for source in sources:
        corpus, _, split = source.partition(":")
        if source.startswith(PYPI_PREFIXES):
            installed = {distribution_key(d.metadata["Name"]) for d in installed_distributions()}
            texts.extend(t for t in pypi_texts(source, installed | {OWN_DISTRIBUTION}) if not repeats_stdlib(t))
        elif corpus in OFFLINE_CORPORA:
            texts.extend(offline_corpus(corpus, split or "train"))
        elif Path(source).expanduser().exists():
            texts.extend(local_texts(Path(source).expanduser(), text_column))
        elif looks_like_local_path(source):
            raise FileNotFoundError(
                f"Data file or folder not found: {source} (looked for {Path(source).expanduser().absolute()}); "
                "check the path, or name a datasets id as org/name[:config][@split]."
            )
        else:
            texts.extend(hub_texts(source, text_column))
    if not texts:
        raise ValueError(f"No text found in {sources}; check the paths, the split or --text-column.")
    return texts


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.LongTensor:
    """Tokenize, join documents with the EOS token and cut into `[N, seq_len]` training sequences."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False).input_ids + separator)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"The data has {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}.")
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def installed_distributions(seed: int = 0) -> list:
    """Installed distributions other than this project, one per name, in a seeded order of their sorted names.

    Only the interpreter's site directories are searched, not all of `sys.path`: importing some tools puts their
    vendored copies on it (setuptools' `_vendor`, which torch.compile's C++ builder imports), which would change the
    set, and duplicate texts, mid-process."""
    import site
    from importlib.metadata import distributions

    folders = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    found = {}
    for dist in distributions(path=folders):
        name = dist.metadata["Name"]
        if name and distribution_key(name) != OWN_DISTRIBUTION:
            found.setdefault(distribution_key(name), dist)  # the first on sys.path wins, as for imports
    ordered = [found[k] for k in sorted(found)]
    random.Random(seed).shuffle(ordered)  # sorted first, so the order depends on the seed alone
    return ordered


def long_lines(text: str, min_chars: int = 24) -> list[str]:
    """Stripped lines long enough to identify copied code (short ones like `return None` are everywhere)."""
    return [line for line in (raw.strip() for raw in text.splitlines()) if len(line) >= min_chars]


@lru_cache(maxsize=1)
def stdlib_lines() -> frozenset[str]:
    """Every long line of the standard-library corpus (both splits): what held-out code must not repeat."""
    return frozenset(line for text in offline_corpus("python-stdlib", "train") + offline_corpus(
        "python-stdlib", "heldout") for line in long_lines(text))


def repeats_stdlib(text: str, max_shared: float = 0.3) -> bool:
    """Whether most of a file's long lines are standard-library lines: a vendored stdlib copy or backport
    (setuptools' distutils, importlib_metadata, eventlet's green/http/server.py). Such a file mixes the standard
    library's text into another corpus: training text into the held-out `installed-*` sets, or held-out stdlib
    files into `pypi:` training text; both leave it out."""
    lines = long_lines(text)
    return bool(lines) and sum(line in stdlib_lines() for line in lines) > max_shared * len(lines)


def distribution_files(dist, suffixes: tuple[str, ...]) -> list[Path]:
    return [Path(dist.locate_file(f)) for f in sorted(dist.files or [], key=str) if f.suffix in suffixes]


def fill(documents, budget: int, per_distribution: int) -> list[str]:
    """Texts from `(distribution, text)` pairs, at most `per_distribution` characters of each distribution (a text
    that crosses the limit is kept whole) and `budget` in all."""
    texts, used, total = [], {}, 0
    for dist, text in documents:
        if used.get(dist, 0) >= per_distribution:
            continue
        texts.append(text)
        used[dist] = used.get(dist, 0) + len(text)
        total += len(text)
        if total >= budget:
            break
    return texts


def installed_code(seed: int = 0, budget: int = INSTALLED_BUDGET,
                   per_distribution: int = INSTALLED_PER_DISTRIBUTION) -> list[str]:
    """Python sources of installed third-party distributions (files of one package stay together, in path order),
    each distinct file once (packages that vendor the same module would otherwise repeat it)."""

    def documents():
        seen = set()
        for dist in installed_distributions(seed):
            taken = 0
            for path in distribution_files(dist, (".py",)):
                if taken >= per_distribution:
                    break  # without reading the rest of a large package
                if not path.is_file() or path.stat().st_size > 10 * per_distribution:
                    continue  # generated tables and data modules are not code to continue
                text = path.read_text(errors="ignore")
                if text.strip() and text not in seen and not repeats_stdlib(text):
                    seen.add(text)
                    taken += len(text)
                    yield dist.metadata["Name"], text

    return fill(documents(), budget, per_distribution)


def installed_prose(seed: int = 0, budget: int = INSTALLED_BUDGET, per_distribution: int = INSTALLED_PER_DISTRIBUTION,
                    min_chars: int = 1000) -> list[str]:
    """Long descriptions (the README text in METADATA) and license texts of installed distributions, each distinct
    text once (many packages ship the same license), texts under `min_chars` dropped."""
    license_name = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)

    def documents():
        seen = set()
        for dist in installed_distributions(seed):
            texts = [dist.metadata.get_payload() or dist.metadata.get("Description") or ""]
            texts += [path.read_text(errors="ignore") for path in distribution_files(dist, ("", ".txt", ".md", ".rst"))
                      if license_name.match(path.name) and path.is_file()]
            for text in texts:
                digest = hashlib.sha1(" ".join(text.split()).encode()).hexdigest()
                if len(text.strip()) >= min_chars and digest not in seen:
                    seen.add(digest)
                    yield dist.metadata["Name"], text

    return fill(documents(), budget, per_distribution)
