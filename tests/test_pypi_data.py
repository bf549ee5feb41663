"""The ``pypi:`` training source: wheels of distributions that are not installed, read without the network once
cached; installed distributions (held-out text) refused."""

import subprocess
import zipfile

import pytest

from longspec_hf.training import pypi
from longspec_hf.training.data import load_texts, long_lines, offline_corpus

CODE = "def greet(name):\n    return f'hello {name}'\n"
README = "# fakepkg\n\nA package that greets people, with a long description.\n"
GUIDE = "Guide\n=====\n\nHow to greet.\n"
LICENSE = "Permission is hereby granted, free of charge, to any person obtaining a copy\n"


def write_wheel(folder, name="fakepkg", version="1.0"):
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n{README}"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", CODE)
        archive.writestr(f"{name}/empty.py", "")
        archive.writestr(f"{name}/docs/guide.rst", GUIDE)
        archive.writestr(f"{name}/LICENSE.txt", LICENSE)
        archive.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
        archive.writestr(f"{name}-{version}.dist-info/licenses/LICENSE", LICENSE)
    return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSPEC_HF_CACHE", str(tmp_path))
    return tmp_path / "pypi"


def test_a_pinned_cached_wheel_gives_its_code_and_prose_without_pip(cache, monkeypatch):
    write_wheel(cache)
    monkeypatch.setattr(pypi, "run_pip", lambda args: pytest.fail(f"pip ran: {args}"))
    texts = load_texts(["pypi:fakepkg==1.0"])
    assert texts == [CODE, README, GUIDE]  # code first, then the description and the docs; no license, no empty file


def test_pypi_prose_gives_the_description_and_docs_only(cache, monkeypatch):
    """No code, no license, and no .txt file: in wheels those are mostly data (lexicons, model dumps)."""
    wheel = write_wheel(cache)
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("fakepkg/data/words.txt", "abacus\nabdomen\n")
    write_wheel(cache, name="otherpkg", version="3.1")
    monkeypatch.setattr(pypi, "run_pip", lambda args: pytest.fail(f"pip ran: {args}"))
    assert load_texts(["pypi-prose:fakepkg==1.0"]) == [README, GUIDE]
    both = load_texts(["pypi-prose:otherpkg==3.1,fakepkg==1.0"])
    assert len(both) == 4 and CODE not in both and LICENSE not in both


def test_pypi_prose_refuses_an_installed_distribution_and_an_empty_list(cache):
    with pytest.raises(ValueError, match="pypi-prose:pytest==1.0: pytest is installed here"):
        load_texts(["pypi-prose:pytest==1.0"])
    with pytest.raises(ValueError, match="names no distribution; write pypi-prose:"):
        load_texts(["pypi-prose:"])


def test_an_unpinned_requirement_is_downloaded_by_pip_into_the_cache(cache, monkeypatch):
    calls = []

    def fake_pip(args):
        calls.append(args)
        wheel = write_wheel(cache, version="2.0")
        return subprocess.CompletedProcess(args, 0, stdout=f"Collecting fakepkg\nSaved {wheel}\n", stderr="")

    monkeypatch.setattr(pypi, "run_pip", fake_pip)
    assert load_texts(["pypi:fakepkg"]) == [CODE, README, GUIDE]
    assert calls[0][:4] == ["download", "--no-deps", "--only-binary", ":all:"] and "fakepkg" in calls[0]


def test_several_distributions_in_one_source_come_in_order(cache, monkeypatch):
    write_wheel(cache, name="fakepkg")
    write_wheel(cache, name="otherpkg", version="3.1")
    monkeypatch.setattr(pypi, "run_pip", lambda args: pytest.fail("pip ran"))
    texts = load_texts(["pypi:otherpkg==3.1, fakepkg==1.0"])
    assert len(texts) == 6 and texts[1].startswith("# fakepkg")  # otherpkg's README text names fakepkg too


def test_a_vendored_copy_of_a_standard_library_file_is_left_out(cache, monkeypatch):
    """A wheel can ship a copy of a held-out stdlib module (eventlet's green/http/server.py is http/server.py):
    training on it would turn the held-out stdlib score into memorisation."""
    held_out = next(t for t in offline_corpus("python-stdlib", "heldout") if len(long_lines(t)) > 50)
    wheel = write_wheel(cache)
    with zipfile.ZipFile(wheel, "a") as archive:
        archive.writestr("fakepkg/green/vendored.py", held_out)
    monkeypatch.setattr(pypi, "run_pip", lambda args: pytest.fail("pip ran"))
    assert held_out in pypi.wheel_texts(wheel)[0]
    assert load_texts(["pypi:fakepkg==1.0"]) == [CODE, README, GUIDE]


def test_an_installed_distribution_is_refused_as_held_out_text(cache):
    with pytest.raises(ValueError, match="pytest is installed here.*held-out.*not installed"):
        load_texts(["pypi:pytest==1.0"])
    with pytest.raises(ValueError, match="installed here"):
        load_texts(["pypi:Typing_Extensions"])  # normalised names match


def test_a_failed_download_names_the_network_and_the_pin(cache, monkeypatch):
    monkeypatch.setattr(pypi, "run_pip", lambda args: subprocess.CompletedProcess(
        args, 1, stdout="", stderr="ERROR: No matching distribution found for nopkg==9\n"))
    with pytest.raises(ValueError, match=r"No matching distribution found for nopkg==9.*name==version"):
        load_texts(["pypi:nopkg==9"])


def test_a_corrupt_wheel_says_to_delete_it(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "fakepkg-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    monkeypatch.setattr(pypi, "run_pip", lambda args: pytest.fail("pip ran"))
    with pytest.raises(ValueError, match="not a readable wheel.*delete it"):
        load_texts(["pypi:fakepkg==1.0"])


def test_an_empty_source_names_the_form(cache):
    with pytest.raises(ValueError, match="pypi:<name>==<version>"):
        load_texts(["pypi:"])


def test_a_long_list_of_distributions_is_no_file_name_to_look_up():
    from longspec_hf.training.generated import is_generated_file

    source = "pypi:" + ",".join(f"package-number-{i}==1.0.{i}" for i in range(40))  # > 255 characters
    assert not is_generated_file(source)
