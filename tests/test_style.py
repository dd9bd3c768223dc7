"""The code keeps the style its tools describe: ruff (pyproject.toml's [tool.ruff]: pyflakes,
pycodestyle, import order, bugbear, 120 columns) on python/ and tests/, and clang-format
(.clang-format: Google's style at 120 columns) on csrc/. To fix what they report:
`ruff check --fix python tests`, `clang-format -i FILE`."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

RUFF_NOT_YET: list[str] = []
CLANG_FORMAT_NOT_YET: list[str] = []


def cpp_sources() -> list[str]:
    files = sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".h", ".inl"))
    return [p.relative_to(ROOT).as_posix() for p in files]


def test_exclusions_name_existing_files():
    assert [f for f in RUFF_NOT_YET + CLANG_FORMAT_NOT_YET if not (ROOT / f).is_file()] == []


def test_ruff():
    try:
        import ruff  # noqa: F401  (the [test] extra installs it)
    except ImportError:
        pytest.fail("ruff is not installed: pip install '.[test]'")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--extend-exclude", ",".join(RUFF_NOT_YET),
                        "python", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_clang_format():
    if shutil.which("clang-format") is None:  # .ci/run installs it
        pytest.skip("clang-format is not installed (Debian: apt-get install clang-format)")
    checked = [f for f in cpp_sources() if f not in CLANG_FORMAT_NOT_YET]
    assert "csrc/isa.h" in checked
    r = subprocess.run(["clang-format", "--dry-run", "--Werror", *checked], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
