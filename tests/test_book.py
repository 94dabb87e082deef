"""The book builds without a single warning (every chapter executed, at tiny scale)."""

from __future__ import annotations

import re
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
    chapters = re.findall(r"file: (chapters/\S+)", (ROOT / "_toc.yml").read_text())
    assert len(chapters) == len(list((ROOT / "chapters").glob("*.ipynb"))), "a chapter is missing from _toc.yml"
    for chapter in chapters:
        page = (html / f"{chapter}.html").read_text()
        source = (ROOT / f"{chapter}.ipynb").read_text()
        assert "Traceback" not in page, chapter
        if "plt." in source:  # executed: its plots are in the page
            assert "<img" in page, f"{chapter}: no plot in the built page"
        if "ipywidgets" in source:  # and its widgets' state, so they render without a kernel
            assert "application/vnd.jupyter.widget-view+json" in page, f"{chapter}: no widget in the built page"
    shutil.rmtree(tmp_path / "_build" / ".jupyter_cache", ignore_errors=True)
