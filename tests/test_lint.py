"""The code is linted with ruff (pyproject.toml's rules): the package, tests, benchmarks, the
book's extension and the code cells of the notebooks; the Python files are ruff-formatted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")


def _ruff(*args: str) -> subprocess.CompletedProcess:
    assert RUFF is not None, "ruff is not installed: it is in requirements.txt"
    return subprocess.run(
        [RUFF, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_ruff_check_passes_on_code_and_notebooks():
    result = _ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_files_are_ruff_formatted():
    # Notebook cells are wrapped by hand to the book's page width, so only .py files here.
    result = _ruff(
        "format", "--no-cache", "--check", "bncourse", "tests", "benchmarks", "book/_ext"
    )
    assert result.returncode == 0, result.stdout + result.stderr
