"""The book builds without a single warning, every chapter executed once (at tiny scale), and its pages tell the
truth: every chapter ran without an error, its widgets respond without a kernel, nothing loads from the network,
the chapter map is the toc, and every chapter installs the package from the one repository URL."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tests.built_book import ROOT, build, toc_chapters, toc_pages

CHAPTERS = toc_chapters()


def notebook(chapter: str, executed: bool = False) -> dict:
    path = build().executed / f"{chapter}.ipynb" if executed else ROOT / f"{chapter}.ipynb"
    return json.loads(path.read_text())


def test_book_builds_without_warnings():
    result = build()
    assert result.returncode == 0, result.log


def test_every_chapter_is_in_the_toc():
    on_disk = sorted(f"chapters/{p.stem}" for p in (ROOT / "chapters").glob("*.ipynb"))
    assert sorted(CHAPTERS) == on_disk


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_executed_without_error(chapter):
    executed = notebook(chapter, executed=True)
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert code and all(c["execution_count"] for c in code), f"{chapter}: a code cell did not run"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"{chapter}: {errors[0]['ename']}: {errors[0]['evalue']}"
    page = build().page(chapter)
    assert "Traceback" not in page, chapter
    if "plt." in json.dumps(notebook(chapter)):  # executed: its plots are in the page
        assert "<img" in page, f"{chapter}: no plot in the built page"


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_widgets_respond_without_a_kernel(chapter):
    page = build().page(chapter)
    # An ipywidgets widget on a static page draws its controls, but nothing answers when they move.
    assert "application/vnd.jupyter.widget-view+json" not in page, f"{chapter}: a widget that needs a kernel"
    source = json.dumps(notebook(chapter))
    assert "ipywidgets" not in source and "interact(" not in source, f"{chapter}: use minipeft.viz.explore"
    if "explore(" not in source:
        return
    widgets = re.findall(r'<div class="mp-explore" id="[^"]+" data-frames="(\d+)">(.*?)<script>', page, re.S)
    assert widgets, f"{chapter}: explore() is called but the page has no precomputed widget"
    for n_frames, body in widgets:
        frames = re.findall(r'<div class="mp-frame" data-key="([\d,]+)"( hidden)?>(.*?)</div>', body, re.S)
        assert len(frames) == int(n_frames) >= 2, chapter
        assert sum(not hidden for _, hidden, _ in frames) == 1, f"{chapter}: exactly one frame is shown at first"
        assert len({content for _, _, content in frames}) > 1, f"{chapter}: every frame is the same"


def test_pages_load_nothing_from_the_network():
    result = build()
    for doc in toc_pages():
        page = result.page(doc)
        remote = re.findall(r'<script[^>]+src="((?:https?:)?//[^"]+)"', page)
        remote += [
            t for t in re.findall(r"<link[^>]+>", page) if "stylesheet" in t and re.search(r'href="(https?:)?//', t)
        ]
        assert not remote, f"{doc} loads {remote}"
        if 'class="math' not in page:
            continue
        mathjax = re.findall(r'<script[^>]+src="([^"?]*tex-chtml\.js)(?:\?[^"]*)?"', page)  # sphinx adds ?v=<hash>
        assert mathjax, f"{doc}: math but no MathJax script"
        assert (result.html / doc).parent.joinpath(mathjax[0]).resolve().is_file(), f"{doc}: {mathjax[0]} missing"


def setup_cell(nb: dict) -> str:
    cells = [c for c in nb["cells"] if "setup" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "a chapter has exactly one cell tagged 'setup'"
    return "".join(cells[0]["source"])


def test_every_setup_cell_installs_from_the_one_repository():
    url = re.search(r"^repository:\n  url: (\S+)$", (ROOT / "_config.yml").read_text(), re.M).group(1)
    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    cells = {chapter: setup_cell(notebook(chapter)) for chapter in CHAPTERS}
    first = cells[CHAPTERS[0]]
    assert all(cell == first for cell in cells.values()), [c for c, cell in cells.items() if cell != first]
    assert f'REPOSITORY = "{url}"\n' in first and f'TAG = "v{version}"\n' in first, first
    assert 'f"minipeft @ git+{REPOSITORY}@{TAG}"' in first
    assert url in (ROOT / "README.md").read_text(), "README.md does not name the repository of _config.yml"


def test_intro_chapter_map_is_the_toc():
    intro = (ROOT / "book" / "intro.md").read_text()
    mapped = re.findall(r"\{doc\}`[^`<]*<\.\./(chapters/[^>]+)>`", intro)
    assert sorted(set(mapped)) == sorted(CHAPTERS)
    assert "(coming)" not in intro
    # No range of chapter numbers that runs past the chapters that exist (chapter 00 once said "chapters 01-12").
    numbers = {Path(c).name[:2] for c in CHAPTERS}
    for page in [*(ROOT / "book").glob("*.md"), *(ROOT / "chapters").glob("*.ipynb")]:
        for last in re.findall(r"chapters \d\d-(\d\d)", page.read_text()):
            assert last in numbers, f"{page.name} refers to chapter {last}, which does not exist"


def test_execution_page_reports_every_chapter():
    page = build().page("book/execution")
    table = page[page.index("Run Time") :]
    for chapter in CHAPTERS:
        assert chapter in table, f"{chapter} missing from the execution table"
    for word in ("torch", "transformers", "jupyter-book", "scale", "CPU"):
        assert word in page, word


def test_explore_precomputes_every_combination():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minipeft.viz import MAX_FRAMES, explore

    def show(r=2, kind="bar"):
        print(f"r={r} kind={kind}")
        fig, ax = plt.subplots(figsize=(2, 1))
        (ax.bar if kind == "bar" else ax.plot)(range(r), range(r))
        plt.show()

    widget = explore(show, r=[1, 2, 4], kind=["bar", "line"])
    assert list(widget.frames) == [f"{i},{j}" for i in range(3) for j in range(2)]
    assert all(body.count("<img") == 1 and "<pre" in body for body in widget.frames.values())
    assert "r=4 kind=line" in widget.frames["2,1"] and len(set(widget.frames.values())) == 6
    html = widget._repr_html_()
    shown = re.findall(r'<div class="mp-frame" data-key="([\d,]+)">', html)  # without "hidden"
    assert shown == ["1,0"], "the function's defaults (r=2, kind=bar) are shown first"
    assert 'type="range"' in html and "<select" in html and plt.get_fignums() == []
    for bad, message in [
        (dict(q=[1]), "no argument"),
        (dict(r=[]), "no values"),
        (dict(r=list(range(MAX_FRAMES + 1))), "combinations"),
    ]:
        with pytest.raises(ValueError, match=message):
            explore(show, **bad)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_comparisons_carry_their_baselines_and_seeds(chapter):
    """A chapter that compares methods through minipeft.experiment ships a seed grid with at least 3 seeds per run,
    includes the linear probe and full fine-tuning of the same weights, and checks its live runs against the grid."""
    from minipeft.experiment import GRID_DIR

    source = json.dumps(notebook(chapter))
    stem = Path(chapter).name
    if "Experiment(" not in source:
        return
    assert "mismatches()" in source, f"{chapter}: no check of the live runs against the grid"
    grids = sorted(GRID_DIR.glob(f"{stem}*.csv"))
    assert grids, f"{chapter} uses Experiment but ships no grid in {GRID_DIR}"
    names: set[str] = set()
    for grid in grids:
        rows = list(csv.DictReader(open(grid)))
        seeds: dict[str, set] = {}
        for r in rows:
            seeds.setdefault(r["name"], set()).add(r["seed"])
        assert all(len(s) >= 3 for s in seeds.values()), f"{grid.name}: a run with fewer than 3 seeds"
        names |= set(seeds)
    lowered = {n.lower() for n in names}
    assert any("probe" in n for n in lowered), f"{chapter}: no linear probe in its comparisons"
    assert any("full fine-tuning" in n for n in lowered), f"{chapter}: no full fine-tuning in its comparisons"
