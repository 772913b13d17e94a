"""The project's own lint configuration (``ruff.toml``) holds for every Python file: ``ruff check`` (imports,
pyflakes, bugbear, pyupgrade, line length 120) finds nothing and ``ruff format`` would change nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ruff(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_check_finds_nothing():
    result = ruff("check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_ruff_format_changes_nothing():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
