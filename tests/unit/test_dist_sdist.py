"""The sdist holds exactly what a build needs plus docs and license (MANIFEST.in)."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Paths inside kfast-VERSION/ that may ship. Anything else (benchmarks, CI files, generated C,
# built modules, benchmark results) is a packaging mistake.
ALLOWED = [
    r"PKG-INFO",
    r"setup\.cfg",  # written by setuptools' egg_info (tag settings)
    r"LICENSE",
    r"README\.md",
    r"MANIFEST\.in",
    r"pyproject\.toml",
    r"setup\.py",
    r"kfast\.egg-info/(PKG-INFO|SOURCES\.txt|dependency_links\.txt|entry_points\.txt"
    r"|requires\.txt|top_level\.txt)",
    r"kfast/([\w/]+/)?\w+\.(py|pyx|pxd|pyi)",
    r"kfast/py\.typed",
    r"kfast/testing/kafka-pom\.xml",
    r"kfast/testing/[\w-]+-pom\.xml",
    r"docs/([\w-]+/)*[\w-]+\.(md|png|py|toml|avsc|proto)",
    r"tests/([\w-]+/)*[\w-]+\.(py|proto|avsc|json|toml)",
]
# Sources the build needs: every one in the checkout must ship.
NEEDED = ("*.pyx", "*.pxd", "*.pyi", "py.typed", "*.xml")


def _sdist_members(tmp: Path) -> list[str]:
    # setuptools' PEP 517 hook directly (no isolated env, nothing compiled or cythonized)
    code = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    name = out.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp / name) as tar:
        members = [m.name for m in tar.getmembers() if m.isfile()]
    prefix = name.removesuffix(".tar.gz") + "/"
    assert all(m.startswith(prefix) for m in members)
    return [m.removeprefix(prefix) for m in members]


def test_sdist_contents_against_allow_list(tmp_path: Path) -> None:
    members = _sdist_members(tmp_path)
    unexpected = [m for m in members if not any(re.fullmatch(p, m) for p in ALLOWED)]
    assert not unexpected, f"files in the sdist outside the allow-list: {unexpected}"
    assert not [m for m in members if m.endswith((".c", ".so", ".html"))]
    assert not [m for m in members if m.startswith(("benchmarks/", ".github/", "tools/"))]
    needed = sorted(
        str(p.relative_to(ROOT)) for pattern in NEEDED for p in (ROOT / "kfast").rglob(pattern)
    )
    needed += ["LICENSE", "README.md", "pyproject.toml", "setup.py", "docs/changelog.md"]
    needed += [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")]
    missing = sorted(set(needed) - set(members))
    assert not missing, f"needed by a build or a user, missing from the sdist: {missing}"
