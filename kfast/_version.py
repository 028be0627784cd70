"""The kfast version: the single place it is written.

setuptools reads it for the wheel and sdist metadata (``[tool.setuptools.dynamic]`` in
pyproject.toml), ``kfast.__version__`` and ``kfast --version`` import it, and a test checks
that the top entry of docs/changelog.md names it.
"""

__version__ = "0.1.0"
