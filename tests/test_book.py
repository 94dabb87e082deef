"""The book builds without a single warning (every chapter executed, at tiny scale)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_book_builds_without_warnings(tmp_path):
    jb = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jb), "build", str(ROOT), "--path-output", str(tmp_path), "--warningiserror", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    assert (html / "chapters" / "02_lora_from_scratch.html").is_file()
    shutil.rmtree(tmp_path / "_build" / ".jupyter_cache", ignore_errors=True)
