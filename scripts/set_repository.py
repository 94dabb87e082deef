"""Point the book at a repository: the one URL and the release tag that readers install from.

The URL lives in `_config.yml` (`repository: url:`, which also draws the book's repository button). This script
copies it, with the tag `v<version of pyproject.toml>`, into the setup cell of every chapter (which installs
`minipeft @ git+<url>@<tag>` on Colab) and into README.md. tests/test_book.py fails when a copy differs.

    python scripts/set_repository.py https://github.com/you/minipeft   # a fork: set the URL, then copy it
    python scripts/set_repository.py                                   # copy the URL and tag of the files as they are
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "_config.yml"
URL_LINE = re.compile(r"^(repository:\n  url: )(\S+)$", re.M)


def current_url() -> str:
    return URL_LINE.search(CONFIG.read_text()).group(2)


def version() -> str:
    return re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def set_config(url: str) -> None:
    CONFIG.write_text(URL_LINE.sub(lambda m: m.group(1) + url, CONFIG.read_text(), count=1))


def set_chapters(url: str, tag: str) -> list[str]:
    changed = []
    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        text = path.read_text()
        nb = json.loads(text)
        for cell in nb["cells"]:
            if "setup" not in cell.get("metadata", {}).get("tags", []):
                continue
            source = "".join(cell["source"])
            source = re.sub(r'^REPOSITORY = "[^"]*"$', f'REPOSITORY = "{url}"', source, count=1, flags=re.M)
            source = re.sub(r'^TAG = "[^"]*"$', f'TAG = "{tag}"', source, count=1, flags=re.M)
            cell["source"] = source.splitlines(keepends=True)
        out = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if out != text:
            path.write_text(out)
            changed.append(path.name)
    return changed


def set_readme(old: str, url: str) -> None:
    readme = ROOT / "README.md"
    readme.write_text(readme.read_text().replace(old, url))


def main(argv: list[str]) -> int:
    old = current_url()
    url = argv[0].rstrip("/") if argv else old
    if not re.fullmatch(r"https://\S+", url):
        raise SystemExit(f"set_repository: {url!r} is not an https URL, e.g. https://github.com/you/minipeft")
    tag = f"v{version()}"
    set_config(url)
    changed = set_chapters(url, tag)
    set_readme(old, url)
    print(f"repository {url}, tag {tag}: _config.yml, README.md and {len(changed)} chapter(s) updated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
