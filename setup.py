"""Build the Cython extensions.

Switches (environment variables):
  KFAST_DEBUG=1     line tracing, assertions, -O0 -g (for coverage and gdb)
  KFAST_ANNOTATE=1  write cython -a HTML next to each .pyx
  KFAST_ASAN=1      compile with AddressSanitizer (see docs/testing.md)
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
DEBUG = os.environ.get("KFAST_DEBUG") == "1"
ANNOTATE = os.environ.get("KFAST_ANNOTATE") == "1"
ASAN = os.environ.get("KFAST_ASAN") == "1"
# Comma-separated path prefixes: build only matching extensions (fast
# iteration on one module, e.g. KFAST_ONLY=kfast/avro).
ONLY = [p for p in os.environ.get("KFAST_ONLY", "").split(",") if p]
# the extension that dlopens librdkafka (kfast/runtime/kafka/_consumer.pyx)
_DLOPEN_EXT = "kfast.runtime.kafka._consumer"


def extensions() -> list:
    # Portable code only: no -march/-mtune here, so a wheel runs on any CPU of its platform
    # tag (x86-64 baseline, SSE2). The interpreter's own CFLAGS (sysconfig) are the base and
    # carry none either (checked by `make dist`, docs/install.md).
    if sys.platform == "win32":  # MSVC (the release workflow's Windows wheels)
        compile_args = ["/Od", "/Zi"] if DEBUG else ["/O2"]
    else:
        compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
    link_args = []
    macros = []
    if DEBUG:
        macros += [("CYTHON_TRACE_NOGIL", "1")]
    else:
        macros += [("NDEBUG", "1")]
    if ASAN:
        compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        link_args += ["-fsanitize=address"]
    exts = []
    for pyx in sorted(ROOT.glob("kfast/**/*.pyx")):
        rel = pyx.relative_to(ROOT)
        if ONLY and not any(str(rel).startswith(prefix) for prefix in ONLY):
            continue
        name = ".".join(rel.with_suffix("").parts)
        exts.append(
            Extension(
                name,
                [rel.as_posix()],
                extra_compile_args=compile_args,
                extra_link_args=link_args,
                define_macros=macros,
                # the compiled Kafka consumer dlopens librdkafka (dlopen is in
                # libdl before glibc 2.34, e.g. on manylinux2014; unused on Windows)
                libraries=["dl"] if name == _DLOPEN_EXT and os.name == "posix" else [],
            )
        )
    return exts


class ParallelBuildExt(build_ext):
    """Cythonize, then compile the C sources on every core (pip gives no -j switch).

    Cython runs in run(), not when this file is loaded nor in finalize_options() (which the
    sdist command calls to list sources): building the sdist translates nothing, and the
    sdist ships .pyx/.pxd, never generated C.
    """

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        from Cython.Build import cythonize

        translated = cythonize(
            self.extensions,
            annotate=ANNOTATE,
            compiler_directives={
                "language_level": 3,
                "linetrace": DEBUG,
                "embedsignature": True,
            },
            include_path=[str(ROOT)],
            nthreads=os.cpu_count() or 1,
        )
        # setuptools keeps bookkeeping on the Extension objects it finalized; cythonize returns
        # new ones, so only their (now .c) sources are carried over.
        by_name = {ext.name: ext for ext in translated}
        for ext in self.extensions:
            ext.sources = by_name[ext.name].sources
        super().run()


setup(ext_modules=extensions(), cmdclass={"build_ext": ParallelBuildExt})
