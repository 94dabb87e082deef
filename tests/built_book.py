"""One build of the book per test session, shared by tests/test_book.py and tests/test_browser.py.

The build is the only execution of the chapters in `make test`: myst-nb runs every notebook once (fresh cache, so a
library change is always executed), and the tests read what it produced: the executed notebooks in
`jupyter_execute/`, the pages in `html/`, and the pages in a headless browser.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "_build" / "test"  # gitignored; wiped at the start of each session's build
SCREENSHOTS = ROOT / "_build" / "screenshots"


@dataclass
class Build:
    returncode: int
    log: str
    html: Path
    executed: Path

    def page(self, doc: str) -> str:
        return (self.html / f"{doc}.html").read_text()


def toc_chapters() -> list[str]:
    """The chapter notebooks the toc lists, e.g. 'chapters/02_lora_from_scratch'."""
    return re.findall(r"file: (chapters/\S+)", (ROOT / "_toc.yml").read_text())


def toc_pages() -> list[str]:
    return [ROOT_DOC, *re.findall(r"file: (\S+)", (ROOT / "_toc.yml").read_text())]


ROOT_DOC = re.search(r"^root: (\S+)", (ROOT / "_toc.yml").read_text(), re.M).group(1)


@functools.cache
def build() -> Build:
    vendored = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vendor_assets.py")], capture_output=True, text=True
    )
    assert vendored.returncode == 0, vendored.stdout + vendored.stderr
    shutil.rmtree(OUT, ignore_errors=True)
    jb = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jb), "build", str(ROOT), "--path-output", str(OUT), "--warningiserror", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    log = result.stdout + result.stderr
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "build.log").write_text(log)
    # The failing cell's error (myst-nb prints it in the middle of a long log), then the end of the log.
    failures = [m.start() for m in re.finditer(r"Executing notebook failed|Error: ", log)]
    excerpt = "".join(log[max(0, i - 200) : i + 2500] + "\n...\n" for i in failures[:2])
    return Build(result.returncode, f"full log: {OUT / 'build.log'}\n{excerpt}{log[-4000:]}", OUT / "_build" / "html",
                 OUT / "_build" / "jupyter_execute")  # fmt: skip
