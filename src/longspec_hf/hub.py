"""Publishing drafts: one commit with weights, config, tree settings, model card and a `custom_generate/` folder.

The `custom_generate/` folder lets people without longspec-hf run
``target.generate(ids, custom_generate="org/draft", trust_remote_code=True)``: transformers downloads
``custom_generate/generate.py`` and, through its relative imports, the modules it needs. Those are this package's
own modules, copied unchanged (they only use relative imports, which is what makes that possible), plus a one-line
``draft_source.py`` naming the repository the draft is loaded from.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

CUSTOM_GENERATE = "custom_generate"
CUSTOM_GENERATE_FILES = ("generate.py", "requirements.txt")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)


def custom_generate_template() -> Path:
    """The `custom_generate/` template, from the installed package or, in a source checkout, the repository root."""
    packaged = resources.files("longspec_hf").joinpath(CUSTOM_GENERATE, "generate.py")
    if packaged.is_file():
        return Path(str(packaged)).parent
    source = Path(__file__).resolve().parents[2] / CUSTOM_GENERATE
    if (source / "generate.py").is_file():
        return source
    raise FileNotFoundError("The custom_generate template is missing; reinstall longspec-hf.")


def relative_imports(path: Path) -> set[str]:
    return set(_RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")))


def package_modules_needed(entry: Path, package_dir: Path) -> list[str]:
    """Package module names `entry` reaches through relative imports (transitively), as transformers will fetch."""
    needed, todo = set(), list(relative_imports(entry))
    while todo:
        name = todo.pop()
        if name in needed or not (package_dir / f"{name}.py").is_file():
            continue
        needed.add(name)
        todo.extend(relative_imports(package_dir / f"{name}.py"))
    return sorted(needed)


def write_custom_generate(folder: str | os.PathLike, draft_repo: str, draft_revision: str | None = None) -> Path:
    """Write a self-contained `custom_generate/` folder that loads the draft from `draft_repo` (id or local path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template, package_dir = custom_generate_template(), Path(__file__).resolve().parent
    for name in CUSTOM_GENERATE_FILES:
        shutil.copyfile(template / name, folder / name)
    (folder / "draft_source.py").write_text(
        '"""Where generate.py loads the draft from (written by longspec push)."""\n\n'
        f"DRAFT_REPO = {str(draft_repo)!r}\nDRAFT_REVISION = {draft_revision!r}\n",
        encoding="utf-8",
    )
    for name in package_modules_needed(template / "generate.py", package_dir):
        shutil.copyfile(package_dir / f"{name}.py", folder / f"{name}.py")
    missing = relative_imports(template / "generate.py") - {p.stem for p in folder.glob("*.py")}
    if missing:
        raise FileNotFoundError(f"custom_generate/generate.py imports modules that do not exist: {sorted(missing)}.")
    return folder


def card_for_repo(card: ModelCard, repo_id: str, tags: list[str] | None = None) -> ModelCard:
    """`card` with the usage snippet pointing at `repo_id` and `tags` added to its metadata."""
    from .cards import REPO_PLACEHOLDER

    card = ModelCard(str(card).replace(REPO_PLACEHOLDER, repo_id))
    if tags:
        card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    return card


def push_draft(
    draft,
    repo_id: str,
    *,
    model_card: ModelCard | None = None,
    custom_generate: bool = True,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
):
    """Create `repo_id` if needed and upload the draft with its card (and `custom_generate/`) in one commit."""
    from .cards import draft_card

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card = card_for_repo(model_card if model_card is not None else draft_card(draft, repo_id=repo_id), repo_id, tags)
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        draft.save_pretrained(tmp, max_shard_size=max_shard_size, model_card=card)
        if custom_generate:
            write_custom_generate(Path(tmp) / CUSTOM_GENERATE, repo_id, revision)
        # One explicit commit of every file (the same two Hub calls as transformers' push_to_hub).
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(tmp).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(tmp).rglob("*")) if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload LongSpec draft",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
