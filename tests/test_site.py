"""The website, built from the current sources and read in a real browser.

The site is built once per test session, from scratch, into a temporary folder (the README's
build command with ``--path-output``, so every chapter executes afresh), then served on
127.0.0.1 and opened page by page in headless Chromium (Debian's ``/usr/bin/chromium``, driven
by Playwright's Python package; no browser download). Every page must load with no page error,
no console error, no failed request and no request to any other host, all images loaded and all
math typeset by the MathJax copy the site serves itself. Chapter pages also need their launch
buttons and a working solution dropdown, and the search page must find chapter content.

The reading experience (CONTRIBUTING.md, "The reading experience") is measured on every chapter
page at 1280 and 390 CSS px (``test_reading_experience``): figure text size (from the image's
rendered width, the PNG's dpi and the book style's smallest font size), numbered captions and
alt text, code boxes that scroll sideways (at 1280 px), asserts outside the collapsed check
cells, solution code outside its dropdown, nbgrader markers, warnings or stderr in outputs,
sideways scrolling of the page, and the key-takeaways box; every violation is listed, page by
page. Full-page screenshots at both widths land in ``_build/screenshots/``.

The solution-free site (``BNCOURSE_HIDE_SOLUTIONS=1``, see book/instructors.md) is built a
second time from the first build's execution cache, so no notebook runs twice, and must hold
no line of any reference solution and no way to the notebooks' sources.

Chromium: ``sudo apt-get install -y chromium`` on Debian; ``.ci/run`` installs it in CI. Without
it, the browser tests are skipped outside CI and fail in CI (where the variable ``CI`` is set).
"""

from __future__ import annotations

import functools
import html
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import _solution_lines

from bncourse.student import student_notebook

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("BNCOURSE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "_build" / "screenshots"  # ignored by git
BUILD_TIMEOUT = 900  # seconds; the book builds in under 5 minutes on 2 cores
SEARCH_TERM = "momentum"
HOST = "127.0.0.1"

# Console messages of level "error" that upstream code emits and that we cannot fix, with the
# reason each one is harmless: (regular expression, reason). Empty: the site is clean.
ALLOWED_CONSOLE_ERRORS: list[tuple[str, str]] = []

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPOSITORY = CONFIG["repository"]["url"].rstrip("/")


# --- what the table of contents holds ---------------------------------------------------------


def _toc_files(entry) -> Iterator[str]:
    if isinstance(entry, dict):
        if "file" in entry:
            yield entry["file"]
        for key in ("root", "parts", "chapters", "sections"):
            if key in entry:
                value = entry[key]
                if isinstance(value, str):
                    yield value
                else:
                    for item in value:
                        yield from _toc_files(item)
    elif isinstance(entry, list):
        for item in entry:
            yield from _toc_files(item)


def _source(docname: str) -> Path:
    for suffix in (".ipynb", ".md"):
        if (ROOT / (docname + suffix)).is_file():
            return ROOT / (docname + suffix)
    raise FileNotFoundError(f"_toc.yml lists {docname}, which has no .ipynb or .md source")


DOCNAMES = [
    name.removesuffix(".md").removesuffix(".ipynb")
    for name in _toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text()))
]
CHAPTERS = [name for name in DOCNAMES if _source(name).suffix == ".ipynb"]
# Every page of the site: the toc's documents and the pages Sphinx adds. index.html is Jupyter
# Book's redirect to the root document.
PAGES = [*DOCNAMES, "genindex", "search", "index"]


def _notebook(docname: str) -> dict:
    return json.loads(_source(docname).read_text(encoding="utf-8"))


# --- building ---------------------------------------------------------------------------------


@dataclass
class Build:
    output: Path  # what --path-output got
    log: str
    seconds: float

    @property
    def html(self) -> Path:
        return self.output / "_build" / "html"


def _jupyter_book() -> str:
    local = Path(sys.executable).parent / "jupyter-book"
    return str(local) if local.exists() else shutil.which("jupyter-book") or "jupyter-book"


def build_site(output: Path, *options: str, **environment: str) -> Build:
    """``jupyter-book build . -W -n --keep-going`` into ``output``; fails the test on an error."""
    command = [_jupyter_book(), "build", str(ROOT), "-W", "-n", "--keep-going", *options]
    command += ["--path-output", str(output)]
    start = time.perf_counter()
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    seconds = time.perf_counter() - start
    log = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"the site did not build ({' '.join(command)}):\n{log[-6000:]}")
    return Build(output, log, seconds)


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Build:
    """The website built from scratch (fresh execution cache) from the current sources."""
    build = build_site(tmp_path_factory.mktemp("site"))
    print(f"\nbuilt the site in {build.seconds:.0f} s into {build.html}")
    return build


@pytest.fixture(scope="session")
def site_without_solutions(site: Build, tmp_path_factory) -> Build:
    """The solution-free site, built the way book/instructors.md says, over a copy of the full
    build: its execution cache spares running the notebooks again, and whatever the full site
    published (page sources) must be gone."""
    output = tmp_path_factory.mktemp("site-without-solutions")
    shutil.copytree(site.output / "_build", output / "_build", symlinks=True)
    build = build_site(output, "--all", BNCOURSE_HIDE_SOLUTIONS="1")
    print(f"\nbuilt the solution-free site in {build.seconds:.0f} s into {build.html}")
    return build


def _html_pages(html_dir: Path) -> list[str]:
    return sorted(
        path.relative_to(html_dir).with_suffix("").as_posix()
        for path in html_dir.rglob("*.html")
        if not path.relative_to(html_dir).parts[0].startswith("_")
    )


# --- serving and browsing ---------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@pytest.fixture(scope="session")
def server(site: Build) -> Iterator[str]:
    """The built site served on 127.0.0.1; yields the base address."""
    handler = functools.partial(_QuietHandler, directory=str(site.html))
    httpd = http.server.ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _require_chromium() -> None:
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"Chromium ({CHROMIUM})")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -r requirements.txt)")
    if not missing:
        return
    message = (
        f"the browser tests need {' and '.join(missing)}. Install Chromium with "
        "`sudo apt-get install -y chromium` (Debian; never `playwright install`), or point "
        "BNCOURSE_CHROMIUM at a Chromium binary."
    )
    if os.environ.get("CI"):
        pytest.fail(message + " In CI, .ci/run installs it.")
    pytest.skip(message)


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (skips or fails, see _require_chromium, before the site is built)."""
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield chromium
        chromium.close()


@dataclass
class Visit:
    """What happened while a page loaded."""

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)


@pytest.fixture
def open_page(browser, server):
    """Open a page of the site in a fresh browser context; returns (page, Visit)."""
    contexts = []

    def open_(path: str):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        visit = Visit()

        def route(route):
            url = route.request.url
            if urlsplit(url).scheme in ("http", "https") and urlsplit(url).hostname != HOST:
                visit.foreign_requests.append(url)
                route.abort()
            else:
                route.continue_()

        context.route("**/*", route)
        page = context.new_page()
        page.on("pageerror", lambda error: visit.page_errors.append(str(error)))
        page.on(
            "console",
            lambda message: (
                visit.console_errors.append(f"{message.text} ({message.location})")
                if message.type == "error"
                else None
            ),
        )
        page.on(
            "requestfailed",
            lambda request: (
                visit.failed_requests.append(f"{request.url}: {request.failure}")
                if urlsplit(request.url).hostname == HOST
                else None
            ),
        )
        page.on(
            "response",
            lambda response: (
                visit.failed_requests.append(f"{response.url}: {response.status}")
                if response.status >= 400
                else None
            ),
        )
        page.goto(server + path, wait_until="load")
        page.wait_for_load_state("networkidle")
        return page, visit

    yield open_
    for context in contexts:
        context.close()


def _allowed(message: str) -> bool:
    return any(re.search(pattern, message) for pattern, _reason in ALLOWED_CONSOLE_ERRORS)


def _wait_for_mathjax(page) -> str | None:
    """Wait until MathJax has typeset the page; returns a problem, or None."""
    if not page.evaluate("() => document.querySelector('.math, mjx-container') !== null"):
        return None
    loaded = page.evaluate("() => !!(window.MathJax && window.MathJax.startup)")
    if not loaded:
        return "the page has math but MathJax did not load"
    page.wait_for_function("() => window.MathJax.startup.promise !== undefined", timeout=30_000)
    page.evaluate("() => window.MathJax.startup.promise.then(() => true)")
    return None


_MATH_PROBLEMS = """() => {
  const problems = [];
  for (const element of document.querySelectorAll('span.math, div.math')) {
    if (!element.querySelector('mjx-container')) {
      problems.push('not typeset: ' + element.textContent.trim().slice(0, 80));
    }
  }
  for (const error of document.querySelectorAll('mjx-merror, [data-mjx-error]')) {
    const text = error.getAttribute('data-mjx-error') || error.textContent;
    problems.push('MathJax error: ' + text.trim().slice(0, 120));
  }
  return problems;
}"""

_BROKEN_IMAGES = """async () => {
  window.scrollTo(0, document.body.scrollHeight);
  const images = Array.from(document.images);
  await Promise.all(images.map(image => image.decode().catch(() => null)));
  window.scrollTo(0, 0);
  return images
    .filter(image => !(image.complete && image.naturalWidth > 0))
    .map(image => image.getAttribute('src'));
}"""


_FAVICON_LOADS = """async () => {
  const icon = document.querySelector('link[rel="icon"]');
  if (!icon) return false;
  const response = await fetch(icon.href);
  return response.ok && (await response.text()).includes('<svg');
}"""


def _page_path(name: str) -> str:
    return f"{name}.html"


# --- static checks (no build) -----------------------------------------------------------------


def test_toc_sources_exist():
    assert DOCNAMES, "_toc.yml lists no document"
    for name in DOCNAMES:
        _source(name)


@pytest.mark.parametrize("docname", CHAPTERS)
def test_chapter_starts_with_the_hidden_colab_cell(docname: str):
    """The first code cell installs bncourse in Colab only, and is removed from the site."""
    cells = [cell for cell in _notebook(docname)["cells"] if cell["cell_type"] == "code"]
    assert cells, f"{docname} has no code cell"
    first = cells[0]
    source = "".join(first["source"])
    assert "google.colab" in source and "pip" in source, (
        f"{docname}: the first code cell is not the Colab set-up cell (CONTRIBUTING.md)"
    )
    assert "remove-cell" in first["metadata"].get("tags", []), (
        f"{docname}: the Colab set-up cell must be tagged remove-cell"
    )


def test_pages_workflow_runs_the_readme_build_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    build = next(command for command in commands if "jupyter-book build" in command)
    workflow = (ROOT / ".github" / "workflows" / "pages.yml").read_text()
    assert build in workflow, "the Pages workflow must build with the README's command"
    for action in ("upload-pages-artifact", "deploy-pages"):
        assert f"actions/{action}@" in workflow


def test_local_builds_are_incremental():
    """The README's build reuses _build/.jupyter_cache; the tests build into a fresh folder."""
    assert CONFIG["execute"]["execute_notebooks"] == "cache"


def _load_extension():
    path = ROOT / "book" / "_ext" / "bncourse_site.py"
    spec = importlib.util.spec_from_file_location("bncourse_site", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bncourse_site", module)
    spec.loader.exec_module(module)
    return module


def test_exercise_table_reads_kinds_points_and_minutes(tmp_path: Path):
    extension = _load_extension()

    def markdown(text):
        return {"cell_type": "markdown", "metadata": {}, "source": text}

    def code(grade_id, **nbgrader):
        return {
            "cell_type": "code",
            "metadata": {"nbgrader": {"grade_id": grade_id, **nbgrader}},
            "source": "",
            "outputs": [],
        }

    notebook = {
        "cells": [
            markdown("# Chapter `two`\n\nText."),
            markdown(
                "```{exercise} Forward pass\n:label: ex-2-1\n\nWrite it *(about 15 minutes)*.\n```"
            ),
            markdown(
                "```{solution} ex-2-1\n:label: sol-2-1\n:class: dropdown\n\n(about 99 minutes)\n```"
            ),
            code("ex-2-1-solution", solution=True, grade=False),
            code("ex-2-1-test", solution=False, grade=True, points=3),
            markdown("````{exercise} Why?\n:label: ex-2-2\n\nExplain.\n````"),
        ]
    }
    path = tmp_path / "ch2.ipynb"
    path.write_text(json.dumps(notebook))
    title, exercises = extension.read_exercises(path)
    assert title == "Chapter `two`"
    assert [(e.label, e.kind, e.points, e.estimate) for e in exercises] == [
        ("ex-2-1", "coding", 3.0, 15),
        ("ex-2-2", "conceptual", 0.0, extension.DEFAULT_MINUTES["conceptual"]),
    ]


def test_package_code_leaves_out_the_docstring():
    extension = _load_extension()
    source = 'def f(x):\n    """Doc,\n    two lines."""\n    return x  # keep\n'
    assert extension.source_without_docstring(source) == "def f(x):\n    return x  # keep"
    plain = "def g():\n    return 1\n"
    assert extension.source_without_docstring(plain) == plain.rstrip()
    method = '    def h(self):\n        """Doc."""\n        return 2\n'
    assert extension.source_without_docstring(method) == "def h(self):\n    return 2"


# --- the built site in the browser -------------------------------------------------------------


def test_site_build_executed_every_chapter_afresh(site: Build):
    executed = set(re.findall(r"(\S+\.ipynb): Executing notebook", site.log))
    missing = [name for name in CHAPTERS if str(_source(name)) not in executed]
    assert not missing, f"the test build did not execute {missing} (a stale cache?)"


def test_every_page_of_the_site_is_checked(site: Build):
    assert sorted(PAGES) == _html_pages(site.html), "pages built vs pages checked by this test"


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("name", PAGES)
def test_page_loads_cleanly_offline(name: str, open_page):
    page, visit = open_page(_page_path(name))
    math_problem = _wait_for_mathjax(page)
    problems = [f"page error: {error}" for error in visit.page_errors]
    problems += [f"console error: {m}" for m in visit.console_errors if not _allowed(m)]
    problems += [f"failed request: {request}" for request in visit.failed_requests]
    problems += [f"request to another host: {url}" for url in visit.foreign_requests]
    problems += [f"image not loaded: {src}" for src in page.evaluate(_BROKEN_IMAGES)]
    problems += [math_problem] if math_problem else []
    problems += page.evaluate(_MATH_PROBLEMS)
    problems += [] if page.evaluate(_FAVICON_LOADS) else ["no favicon, or it does not load"]
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.browser
@pytest.mark.slow
def test_bibliography_lists_the_references(open_page):
    name = next(name for name in DOCNAMES if name.endswith("bibliography"))
    page, _visit = open_page(_page_path(name))
    assert page.locator('[role="doc-biblioentry"]').count() >= 1, "the bibliography is empty"


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("name", CHAPTERS)
def test_chapter_page(name: str, open_page):
    """Launch buttons, the repository button, solution dropdowns that open (by their title,
    without jumping to the exercise). Screenshots: test_reading_experience."""
    page, visit = open_page(_page_path(name))
    notebook = f"{name}.ipynb"
    colab = page.locator(f'a[href^="https://colab.research.google.com/"][href$="{notebook}"]')
    binder = page.locator(f'a[href^="https://mybinder.org/"][href$="{notebook}"]')
    assert colab.count() == 1 and binder.count() == 1, f"{name}: launch buttons missing"
    page.locator(".dropdown-launch-buttons button").first.click()
    colab.wait_for(state="visible", timeout=5_000)
    binder.wait_for(state="visible", timeout=5_000)
    assert page.locator(f'a[href="{REPOSITORY}"]').count() >= 1, "repository button missing"
    assert "google.colab" not in page.content(), f"{name}: the Colab set-up cell is shown"

    solutions = page.locator("div.solution.dropdown")
    expected = sum(
        "{solution}" in "".join(c["source"]) or "{solution-start}" in "".join(c["source"])
        for c in _notebook(name)["cells"]
    )
    assert solutions.count() == expected, f"{name}: {solutions.count()} solution dropdowns"
    for index in range(solutions.count()):
        solution = solutions.nth(index)
        content = solution.locator("section#solution-content")
        assert content.is_hidden(), f"{name}: solution {index + 1} is not collapsed"
        if index == 0:  # the title opens the dropdown; its link does not jump to the exercise
            address = page.url
            solution.locator("p.admonition-title").click()
            content.wait_for(state="visible", timeout=5_000)
            assert page.url == address, f"{name}: the solution's title jumped to {page.url}"
        else:
            solution.locator("button.toggle-button").click()
            content.wait_for(state="visible", timeout=5_000)

    assert not visit.page_errors, visit.page_errors


@pytest.mark.browser
@pytest.mark.slow
def test_search_finds_chapter_content(open_page):
    page, visit = open_page(f"search.html?q={SEARCH_TERM}")
    page.wait_for_function(
        "() => /Search finished/.test(document.querySelector('#search-results')?.textContent)",
        timeout=30_000,
    )
    found = page.locator("#search-results ul.search li a").evaluate_all(
        "links => links.map(link => link.getAttribute('href'))"
    )
    assert found, f"searching {SEARCH_TERM!r} found nothing"
    found_pages = {re.sub(r"\.html.*$", "", href) for href in found}
    if "book/ch4_inference" in DOCNAMES:  # the chapter about momentum conventions
        assert "book/ch4_inference" in found_pages, found_pages
    assert found_pages <= set(PAGES), found_pages
    assert not visit.page_errors and not visit.foreign_requests


# --- the solution-free site --------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Text as it reads, for comparing a notebook's source lines with rendered HTML."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # markdown links
    text = re.sub(r"\\[()\[\]]|[`*$]", "", text)  # code spans, emphasis, math delimiters
    return re.sub(r"\s+", " ", text).strip()


def _page_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", text, flags=re.S)
    return _normalise(html.unescape(re.sub(r"<[^>]+>", "", text)))


def _site_text(build: Build) -> str:
    texts = [_page_text(path) for path in build.html.rglob("*.html")]
    texts.append(_normalise((build.html / "searchindex.js").read_text(encoding="utf-8")))
    return "\n".join(texts)


@functools.cache
def _text_without_solutions() -> str:
    """Every page's source with its solutions withheld (as the student edition does), as text."""
    texts = []
    for name in DOCNAMES:
        source = _source(name)
        if source.suffix == ".ipynb":
            cells = student_notebook(_notebook(name), name=name)["cells"]
            texts += ["".join(cell["source"]) for cell in cells]
        else:
            texts.append(source.read_text(encoding="utf-8"))
    return _normalise("\n".join(texts))


def _solution_texts(docname: str) -> set[str]:
    """The lines of a chapter's solutions that would give one away: long enough, and found in
    no page's text outside the solutions (a line that ends a wrapped sentence, such as
    "sampling noise.", may well appear elsewhere)."""
    lines = {_normalise(line) for line in _solution_lines(_notebook(docname))}
    outside = _text_without_solutions()
    return {line for line in lines if len(line) >= 20 and line not in outside}


CHAPTERS_WITH_SOLUTIONS = [name for name in CHAPTERS if _solution_texts(name)]


@pytest.mark.slow
def test_solution_free_site_has_no_solution(site: Build, site_without_solutions: Build):
    full, hidden = _site_text(site), _site_text(site_without_solutions)
    for name in CHAPTERS_WITH_SOLUTIONS:
        lines = _solution_texts(name)
        shown = {line for line in lines if line in full}
        # the comparison works: the full site shows (most of) the same lines
        assert len(shown) >= len(lines) / 2, f"{name}: {sorted(lines - shown)[:5]} not found"
        leaked = sorted(line for line in lines if line in hidden)
        assert not leaked, f"{name}: the solution-free site shows {leaked}"
    for name in CHAPTERS:
        page = (site_without_solutions.html / f"{name}.html").read_text(encoding="utf-8")
        assert 'class="solution' not in page and "tag_solution" not in page, name
        assert "all checks passed" not in page, f"{name}: autograded cells show their output"
        if any("{exercise}" in "".join(c["source"]) for c in _notebook(name)["cells"]):
            assert 'class="exercise' in page, f"{name}: the exercises are gone too"


@pytest.mark.slow
def test_solution_free_site_exposes_no_notebook(site_without_solutions: Build):
    html_dir = site_without_solutions.html
    assert not (html_dir / "_sources").exists(), "page sources are published"
    notebooks = [p.relative_to(html_dir).as_posix() for p in html_dir.rglob("*.ipynb")]
    assert not notebooks, f"notebooks are published: {notebooks}"
    for path in html_dir.rglob("*.html"):
        text = path.read_text(encoding="utf-8")
        links = re.findall(r'(?:href|src)="([^"]*)"', text)
        for pattern in (
            r"\.ipynb$",
            r"_sources/",
            r"colab\.research",
            r"mybinder\.org",
            rf"^{re.escape(REPOSITORY)}(/(blob|tree|edit|raw)/|/?$)",
        ):
            exposed = [link for link in links if re.search(pattern, link)]
            assert not exposed, f"{path.name} links to the sources: {exposed}"
        assert "btn-download" not in text, f"{path.name} has a download button"


@pytest.mark.slow
def test_solution_free_build_reuses_the_execution_cache(site_without_solutions: Build):
    executed = re.findall(r"(\S+\.ipynb): Executing notebook", site_without_solutions.log)
    assert not executed, f"the solution-free build ran notebooks again: {executed}"


# --- the reading experience (../shared/BOOK.md, "The reading experience") ---------------------

DESKTOP, PHONE = 1280, 390  # CSS px
MIN_FIGURE_TEXT_PX = {DESKTOP: 11.0, PHONE: 8.0}  # the smallest text of a figure, CSS px
MAX_SHRINK = 0.8  # a figure may be drawn at no less than 80 % of its size at 96 px per inch


def _style_min_font_pt() -> float:
    """The smallest font size, in points, that the book style gives any text of a figure."""
    from bncourse.plotting import BOOK_STYLE

    keys = ("font.size", "axes.labelsize", "xtick.labelsize", "ytick.labelsize", "legend.fontsize")
    return min(float(BOOK_STYLE[key]) for key in keys)


def png_dpi(path: Path) -> float | None:
    """The resolution a PNG declares (its ``pHYs`` chunk), in dots per inch; None if none."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind == b"pHYs":
            body = data[position + 8 : position + 8 + length]
            per_unit, unit = int.from_bytes(body[:4], "big"), body[8]
            return per_unit * 0.0254 if unit == 1 else None
        if kind == b"IDAT":
            return None
        position += 12 + length
    return None


_READING = r"""() => {
  const article = document.querySelector('article.bd-article') || document.body;
  const shown = element => element.getClientRects().length > 0
    && getComputedStyle(element).visibility !== 'hidden'
    && !element.closest('details:not([open])');
  const where = element => {
    const section = element.closest('section[id]');
    return section ? '#' + section.id : 'top';
  };
  const text = element => element.innerText.trim().replace(/\s+/g, ' ').slice(0, 70);
  const result = {figures: [], overflowing: [], asserts: [], solutions: [], markers: [],
                  warnings: [], wide: [], takeaways: false};
  for (const image of article.querySelectorAll('.cell_output img')) {
    if (!shown(image)) continue;
    const figure = image.closest('figure');
    const caption = figure && figure.querySelector('figcaption .caption-number');
    result.figures.push({
      src: image.getAttribute('src'), alt: image.getAttribute('alt') || '',
      width: image.getBoundingClientRect().width, natural: image.naturalWidth,
      caption: caption ? figure.querySelector('figcaption').innerText.trim().slice(0, 60) : null,
      where: figure && figure.id ? '#' + figure.id : where(image)});
  }
  for (const pre of article.querySelectorAll('pre')) {
    if (!shown(pre) || pre.closest('mjx-container')) continue;
    if (pre.scrollWidth > pre.clientWidth + 1) {
      const line = pre.innerText.split('\n').reduce((a, b) => (b.length > a.length ? b : a), '');
      result.overflowing.push({where: where(pre), chars: line.length, line: line.slice(0, 70),
        output: !!pre.closest('.cell_output')});
    }
  }
  for (const pre of article.querySelectorAll('.cell_input pre')) {
    if (!shown(pre)) continue;
    for (const line of pre.innerText.split('\n')) {
      if (/^\s*assert\b/.test(line)) {
        result.asserts.push({where: where(pre), line: line.trim().slice(0, 70)});
      }
    }
  }
  for (const cell of article.querySelectorAll('.cell.tag_solution')) {
    if (!cell.closest('div.solution')) result.solutions.push(where(cell) + ': ' + text(cell));
  }
  for (const marker of ['BEGIN SOLUTION', 'END SOLUTION']) {
    if (article.textContent.includes(marker)) result.markers.push(marker);
  }
  for (const output of article.querySelectorAll('.cell_output .output')) {
    const stderr = output.classList.contains('stderr');
    if (stderr || /\b[A-Z]\w*Warning\b/.test(output.textContent)) {
      result.warnings.push(where(output) + ': ' + output.textContent.trim().slice(0, 100));
    }
  }
  const viewport = document.documentElement.clientWidth;
  result.pageWidth = document.documentElement.scrollWidth;
  result.viewport = viewport;
  if (result.pageWidth > viewport + 1) {
    const scrolls = element => {
      for (let e = element.parentElement; e && e !== document.body; e = e.parentElement) {
        const overflow = getComputedStyle(e).overflowX;
        if (overflow !== 'visible' && e.getBoundingClientRect().right <= viewport + 1) return true;
      }
      return false;
    };
    for (const element of document.body.querySelectorAll('*')) {
      const box = element.getBoundingClientRect();
      if (box.width === 0 || box.right <= viewport + 1 || scrolls(element)) continue;
      const parent = element.parentElement;
      if (parent && parent.getBoundingClientRect().right > viewport + 1 && !scrolls(parent)
          && parent !== document.body && parent.closest('article')) continue;
      result.wide.push(`${element.tagName.toLowerCase()}.${[...element.classList].join('.')}`
        + ` in ${where(element)} to ${Math.round(box.right)} px: ${text(element)}`);
      if (result.wide.length >= 8) break;
    }
  }
  result.takeaways = [...article.querySelectorAll('.admonition .admonition-title')]
    .some(title => /key takeaways/i.test(title.textContent));
  return result;
}"""


@dataclass
class Reading:
    """What a reader meets on one page at one width, and what is wrong with it."""

    name: str
    width: int
    figures: list[dict]
    raw: dict
    problems: list[str] = field(default_factory=list)

    @property
    def smallest_text(self) -> float | None:
        sizes = [f["text_px"] for f in self.figures if f["text_px"] is not None]
        return min(sizes) if sizes else None

    def summary(self) -> dict:
        return {
            "page": self.name,
            "width": self.width,
            "figures": len(self.figures),
            "smallest figure text px": (
                None if self.smallest_text is None else round(self.smallest_text, 1)
            ),
            "figures with caption and alt": sum(
                bool(f["caption"]) and _good_alt(f["alt"]) for f in self.figures
            ),
            "code boxes overflowing": len(self.raw["overflowing"]),
            "visible asserts": len(self.raw["asserts"]),
            "page width": self.raw["pageWidth"],
            "problems": len(self.problems),
        }


def _good_alt(alt: str) -> bool:
    """Alt text that describes: words, not a file name or a hash."""
    return len(alt) >= 15 and " " in alt and not re.search(r"[0-9a-f]{16}|\.png$", alt)


def read_page(page, html_dir: Path, name: str, width: int) -> Reading:
    """Measure what a reader meets on ``page`` (already open at ``width``)."""
    raw = page.evaluate(_READING)
    font_pt = _style_min_font_pt()
    base = (html_dir / _page_path(name)).parent
    figures, problems = [], []
    for figure in raw["figures"]:
        dpi = png_dpi((base / figure["src"]).resolve())
        scale = figure["width"] / figure["natural"] if figure["natural"] else 0.0
        figure["dpi"] = dpi
        figure["text_px"] = font_pt * dpi / 72 * scale if dpi else None
        # drawn size relative to the figure's size at 96 CSS px per inch
        figure["shrink"] = figure["width"] / (figure["natural"] / dpi * 96) if dpi else None
        figures.append(figure)
        label = f"figure {figure['where']} ({figure['src'].rsplit('/', 1)[-1][:12]})"
        if dpi is None:
            problems.append(f"{label}: the PNG declares no dpi, its text size is unknown")
        elif round(figure["text_px"], 1) < MIN_FIGURE_TEXT_PX[width]:
            problems.append(
                f"{label}: text {figure['text_px']:.1f} px < {MIN_FIGURE_TEXT_PX[width]} px "
                f"(drawn {figure['width']:.0f} px wide from {figure['natural']} px, "
                f"{dpi:.0f} dpi)"
            )
        if width == DESKTOP and figure["shrink"] is not None and figure["shrink"] < MAX_SHRINK:
            problems.append(f"{label}: shrunk to {figure['shrink']:.0%} of its size")
        if not figure["caption"]:
            problems.append(f"{label}: no numbered caption")
        if not _good_alt(figure["alt"]):
            problems.append(f"{label}: alt text {figure['alt'][:40]!r} does not describe it")
    # on a phone a code box (lines of up to 75 characters) scrolls inside itself, by design
    for box in raw["overflowing"] if width == DESKTOP else []:
        kind = "output" if box["output"] else "code"
        problems.append(
            f"{kind} box in {box['where']} scrolls sideways ({box['chars']} chars: {box['line']!r})"
        )
    problems += [f"assert in the reading flow, {a['where']}: {a['line']}" for a in raw["asserts"]]
    problems += [f"solution code outside its dropdown: {s}" for s in raw["solutions"]]
    problems += [f"grader marker shown: {m}" for m in raw["markers"]]
    problems += [f"warning or stderr in an output: {w}" for w in raw["warnings"]]
    if raw["pageWidth"] > raw["viewport"] + 1:
        problems.append(
            f"the page scrolls sideways ({raw['pageWidth']} px in {raw['viewport']} px): "
            + "; ".join(raw["wide"])
        )
    return Reading(name, width, figures, raw, problems)


def open_at(browser, server: str, name: str, width: int):
    """A page of the site opened at ``width`` CSS px, MathJax done and images decoded."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(server + _page_path(name), wait_until="load")
    page.wait_for_load_state("networkidle")
    _wait_for_mathjax(page)
    page.evaluate(_BROKEN_IMAGES)
    return context, page


def _uses_key_takeaways(docname: str) -> bool:
    return any("Key takeaways" in "".join(c["source"]) for c in _notebook(docname)["cells"])


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("width", [DESKTOP, PHONE])
@pytest.mark.parametrize("name", CHAPTERS)
def test_reading_experience(name: str, width: int, browser, server, site: Build):
    """Figures readable in the text column with numbered captions and alt text, code that fits
    its box, checks and solutions folded away, no warnings, no sideways scrolling on a phone,
    a key-takeaways box; a full-page screenshot at each width."""
    context, page = open_at(browser, server, name, width)
    try:
        reading = read_page(page, site.html, name, width)
        if not reading.raw["takeaways"]:
            reading.problems.append("no key-takeaways box")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shot = SCREENSHOTS / f"{name.replace('/', '_')}-{width}.png"
        page.evaluate("() => { document.activeElement?.blur(); window.scrollTo(0, 0); }")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
    finally:
        context.close()
    print(json.dumps(reading.summary()))
    assert not reading.problems, (
        f"{name} at {width} px: {len(reading.problems)} problems\n" + "\n".join(reading.problems)
    )
