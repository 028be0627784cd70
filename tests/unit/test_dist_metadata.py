"""One version from kfast/_version.py, the changelog following it, and where kfast was imported from."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from pathlib import Path

import pytest

import kfast
import kfast._version
from kfast.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_written_once_and_reaches_the_metadata() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.post\d+|\.dev\d+)?", kfast.__version__)
    assert kfast.__version__ == kfast._version.__version__
    # the installed distribution (wheel or editable) was built from the same string
    assert importlib.metadata.version("kfast") == kfast.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(
        r"^version\s*=", pyproject.split("[project.optional-dependencies]")[0], re.M
    )


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"kfast {kfast.__version__}"


def test_changelog_top_entry_is_the_version() -> None:
    headings = re.findall(r"^## (\S+)", (ROOT / "docs" / "changelog.md").read_text(), re.M)
    assert headings, "docs/changelog.md has no '## VERSION' entry"
    assert headings[0] == kfast.__version__


def test_no_cpu_specific_flags_in_setup_py() -> None:
    # a wheel must run on every CPU of its platform tag: no -march/-mtune/-mavx...
    code = [line.split("#")[0] for line in (ROOT / "setup.py").read_text().splitlines()]
    text = "\n".join(code)
    assert not re.search(r"-m(arch|tune|cpu|avx|sse[34]|fma|bmi|popcnt)", text)


def test_kfast_is_imported_from_where_it_was_installed() -> None:
    """Under `make dist-check` kfast must come from the wheel's venv, never the checkout."""
    package = Path(kfast.__file__).resolve().parent
    expected = os.environ.get("KFAST_TEST_INSTALLED")
    if expected:
        assert package.is_relative_to(Path(expected).resolve()), f"kfast from {package}"
    # the compiled modules load from the same package directory as kfast/__init__.py
    pyx = sorted(package.rglob("*.pyx"))
    assert pyx, f"no .pyx next to {package}"
    for source in pyx:
        name = ".".join(("kfast", *source.relative_to(package).with_suffix("").parts))
        module = importlib.import_module(name)
        assert Path(module.__file__ or "").resolve().parent == source.parent, name
