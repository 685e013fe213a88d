"""The bncourse book's own Sphinx extension (loaded through ``sphinx.local_extensions``).

It does these things:

1. **Offline MathJax.** MathJax 3 is served from the site itself: the ``es5`` tree that the
   ``django-static-mathjax`` wheel ships (a plain Python package, ``mathjax``) is copied into the
   HTML output's ``_static/mathjax/`` and ``mathjax_path`` points there. It is copied into the
   output, not into a source ``_static`` folder, because Jupyter Book would inject every script
   found there into every page.
2. **The solution-free site.** With ``BNCOURSE_HIDE_SOLUTIONS=1`` in the environment, the build
   removes every solution, plain (``{solution}``) or gated (``{solution-start}`` ...
   ``{solution-end}``, which holds the solution's code cell), and every code cell tagged
   ``solution`` (so the search index holds no solution either), and publishes no
   way to the notebooks' sources: no ``_sources`` (deleted when an earlier build left it), no
   download button, no launch, repository or issue buttons (they lead to the notebooks with
   their solutions)::

       BNCOURSE_HIDE_SOLUTIONS=1 jupyter-book build . -W -n --keep-going --all

   The notebooks do not run again when the execution cache of an earlier build is there.
   sphinx-exercise's own ``hide_solutions`` is not used: it breaks gated solutions.

3. **The exercise table** of the instructors' page: the ``{bncourse-exercises}`` directive lists,
   chapter by chapter in the order of the table of contents, every exercise of the chapter
   notebooks with its kind (conceptual or coding), its nbgrader points and an estimated time.
   The estimate is the one the exercise's text gives, as in ``*(about 15 minutes)*``, otherwise
   :data:`DEFAULT_MINUTES` for the exercise's kind.
4. **The reading experience** (CONTRIBUTING.md): the book's style sheet
   ``book/_static/bncourse.css`` (figures, phones, check cells, solution titles), and code cells
   shown without nbgrader's ``### BEGIN SOLUTION`` / ``### END SOLUTION`` lines.
5. **The package's code on the page**: ``{bncourse-code} bncourse.numpy_bn.batch_norm_forward``
   shows a function (or class) of the package as the package has it, without its docstring
   (``:docstring:`` keeps it), so a chapter shows the reference code rather than a copy.
6. **No CDN script.** sphinx-thebe (which Jupyter Book always loads) puts the address of thebe on
   unpkg.com into every page, twice; this book does not use thebe (live code in the page), so its
   scripts are left out of the pages, and any script left is loaded once.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

HIDE_SOLUTIONS_VARIABLE = "BNCOURSE_HIDE_SOLUTIONS"
MATHJAX_DIR = "mathjax"  # under the output's _static/
MATHJAX_ENTRY = "tex-mml-chtml.js"
# What tex-mml-chtml.js loads on demand: TeX extensions, the CHTML fonts, the menu and its
# accessibility tools (which need the speech-rule engine).
MATHJAX_PARTS = [MATHJAX_ENTRY, "input", "output/chtml", "output/chtml.js", "a11y", "ui", "sre"]
DEFAULT_MINUTES = {"conceptual": 10, "coding": 20}
STATIC_DIR = Path(__file__).resolve().parent.parent / "_static"  # book/_static
STYLESHEET = "bncourse.css"
_GRADER_MARKER = re.compile(r"^[ \t]*#+[ \t]*(BEGIN|END) (SOLUTION|HIDDEN TESTS)[ \t]*$")


def hide_solutions_requested() -> bool:
    """Whether this build is the solution-free site."""
    return os.environ.get(HIDE_SOLUTIONS_VARIABLE, "").strip().lower() not in ("", "0", "false")


# --- offline MathJax --------------------------------------------------------------------------


def _mathjax_source() -> Path:
    try:
        import mathjax
    except ImportError as err:
        raise ExtensionError(
            "offline MathJax needs the `django-static-mathjax` package "
            "(pip install -r requirements.txt)"
        ) from err
    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (es5 / MATHJAX_ENTRY).is_file():
        raise ExtensionError(f"MathJax's {MATHJAX_ENTRY} is missing from {es5}")
    return es5


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    """Copy MathJax into the HTML output (after Sphinx has written its own static files)."""
    if exception is not None or app.builder.format != "html":
        return
    source = _mathjax_source()
    target = Path(app.outdir) / "_static" / MATHJAX_DIR
    for part in MATHJAX_PARTS:
        origin = source / part
        if origin.is_dir():
            shutil.copytree(origin, target / part, dirs_exist_ok=True)
        else:
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / part)


# --- configuration ----------------------------------------------------------------------------


def configure(app: Sphinx, config: Config) -> None:
    _mathjax_source()  # fail early, with the fix, when MathJax is not installed
    config.mathjax_path = f"{MATHJAX_DIR}/{MATHJAX_ENTRY}"  # relative to _static/
    if str(STATIC_DIR) not in config.html_static_path:
        config.html_static_path = [*config.html_static_path, str(STATIC_DIR)]
    if not hide_solutions_requested():
        return
    logger.info("[bncourse] %s is set: building the solution-free site", HIDE_SOLUTIONS_VARIABLE)
    config.bncourse_hide_solutions = True
    config.html_copy_source = False
    config.html_show_sourcelink = False
    options = dict(config.html_theme_options)
    options.update(
        use_download_button=False,
        use_repository_button=False,
        use_edit_page_button=False,
        use_issues_button=False,
        use_source_button=False,
        launch_buttons={},
    )
    config.html_theme_options = options


def remove_published_sources(app: Sphinx) -> None:
    """In the solution-free site, delete the page sources an earlier full build left behind.

    Sphinx never deletes files from its output folder, so building the solution-free site over
    a full build (``_build/html``) would still publish ``_sources/`` with every notebook.
    """
    if not app.config.bncourse_hide_solutions:
        return
    outdir = Path(app.outdir)
    if (outdir / "_sources").is_dir():
        logger.info("[bncourse] removing %s left by an earlier build", outdir / "_sources")
        shutil.rmtree(outdir / "_sources")
    for notebook in outdir.rglob("*.ipynb"):
        notebook.unlink()


def remove_solution_cells(app: Sphinx, doctree: nodes.document) -> None:
    """In the solution-free site, drop every solution (plain or gated, with the code cells a
    gated one holds), every notebook cell tagged ``solution``, and the output of every
    autograded test cell (an "all checks passed" under a solution that is not shown)."""
    if not app.config.bncourse_hide_solutions:
        return
    from sphinx_exercise.nodes import solution_end_node, solution_node, solution_start_node

    for kind in (solution_node, solution_start_node, solution_end_node):
        for node in list(doctree.findall(kind)):
            node.parent.remove(node)
    for cell in list(doctree.findall(nodes.container)):
        if cell.get("nb_element") != "cell_code":
            continue
        metadata = cell.get("cell_metadata", {})
        if "solution" in metadata.get("tags", []) or "tag_solution" in cell.get("classes", []):
            cell.parent.remove(cell)
        elif metadata.get("nbgrader", {}).get("grade"):
            for output in list(cell.findall(nodes.container)):
                if output.get("nb_element") == "cell_code_output" and output.parent is cell:
                    cell.remove(output)


def without_grader_markers(code: str) -> str:
    """``code`` without nbgrader's marker lines (``### BEGIN SOLUTION`` and the like)."""
    return "\n".join(line for line in code.split("\n") if not _GRADER_MARKER.match(line))


def hide_grader_markers(app: Sphinx, doctree: nodes.document) -> None:
    """Show the code of every notebook cell without nbgrader's marker lines (the notebook
    keeps them: nbgrader and the student edition need them)."""
    for cell in doctree.findall(nodes.container):
        if cell.get("nb_element") != "cell_code":
            continue
        for block in list(cell.findall(nodes.literal_block)):
            code = block.astext()
            if not _GRADER_MARKER.search(code) and "SOLUTION" not in code:
                continue
            cleaned = without_grader_markers(code)
            if cleaned != code:
                replacement = nodes.literal_block(cleaned, cleaned, **block.attributes)
                block.replace_self(replacement)


def _thebe_enabled(config: Config) -> bool:
    launch_buttons = config.html_theme_options.get("launch_buttons") or {}
    return bool(launch_buttons.get("thebe"))


def _is_thebe_script(filename: str, attributes: dict) -> bool:
    return "sphinx-thebe" in filename or "THEBE_JS_URL" in str(attributes.get("body", ""))


def clean_scripts(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Load each script once per page, and leave out thebe's when live code is off.

    sphinx-thebe adds its inline configuration (``const THEBE_JS_URL = "https://unpkg.com/..."``)
    twice to every page (the builder's list and the registry's both hold it; Sphinx keeps both
    because one has the file name ``None`` and the other ``""``), and the second declaration of
    the constant is a page error in every page. Without a thebe launch button nothing calls
    thebe, so its scripts, and the CDN address, are dropped altogether.
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    drop_thebe = not _thebe_enabled(app.config)
    seen, kept = set(), []
    for script in scripts:
        attributes = getattr(script, "attributes", {})
        filename = getattr(script, "filename", script) or ""  # None and "" both mean inline
        if drop_thebe and _is_thebe_script(filename, attributes):
            continue
        key = (filename, tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"] = kept


# --- the exercise table -----------------------------------------------------------------------

_EXERCISE = re.compile(r"^\s*(`{3,}|~{3,}|:{3,})\{exercise\}[ \t]*(?P<title>.*)$")
_LABEL = re.compile(r"^\s*:label:\s*(?P<label>\S+)")
_MINUTES = re.compile(r"\(about (?P<minutes>\d+) minutes?\)")


@dataclass
class Exercise:
    label: str
    title: str
    coding: bool = False
    points: float = 0.0
    minutes: int | None = None

    @property
    def kind(self) -> str:
        return "coding" if self.coding else "conceptual"

    @property
    def estimate(self) -> int:
        return self.minutes if self.minutes is not None else DEFAULT_MINUTES[self.kind]


def read_exercises(path: Path) -> tuple[str, list[Exercise]]:
    """A chapter notebook's title and exercises, in order (see CONTRIBUTING.md for the format)."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    exercises: dict[str, Exercise] = {}
    title = path.stem
    for cell in notebook.get("cells", []):
        source = cell.get("source", "")
        lines = ("".join(source) if isinstance(source, list) else source).splitlines()
        metadata = cell.get("metadata", {})
        if cell.get("cell_type") == "markdown":
            heading = next((line[2:].strip() for line in lines if line.startswith("# ")), None)
            if heading and title == path.stem:
                title = heading
            for index, line in enumerate(lines):
                match = _EXERCISE.match(line)
                if not match:
                    continue
                fence = match.group(1)
                end = next(
                    (j for j in range(index + 1, len(lines)) if lines[j].strip() == fence),
                    len(lines),
                )
                body = lines[index + 1 : end]
                label = next((m["label"] for m in map(_LABEL.match, body) if m), None)
                if label is None:
                    continue
                minutes = _MINUTES.search(" ".join(body))
                exercises[label] = Exercise(
                    label,
                    match["title"].strip(),
                    minutes=int(minutes["minutes"]) if minutes else None,
                )
        elif cell.get("cell_type") == "code":
            grading = metadata.get("nbgrader", {})
            label = re.sub(r"-(solution|test)$", "", grading.get("grade_id", ""))
            if label in exercises:
                exercises[label].coding |= bool(grading.get("solution") or grading.get("grade"))
                if grading.get("grade"):
                    exercises[label].points += float(grading.get("points", 0))
    return title, list(exercises.values())


def _inline_markup(text: str) -> list[nodes.Node]:
    """Plain text with ``code`` spans, enough for exercise titles."""
    parts = re.split(r"`([^`]+)`", text)
    return [
        nodes.literal(part, part) if odd else nodes.Text(part)
        for odd, part in ((i % 2 == 1, p) for i, p in enumerate(parts))
        if part
    ]


def _ordered_docnames(env) -> list[str]:
    site_map = getattr(env, "external_site_map", None)
    if site_map is not None:
        return [name for name in site_map if name in env.found_docs]
    return sorted(env.found_docs)


class ExerciseTable(SphinxDirective):
    """``{bncourse-exercises}``: the table of every chapter's exercises."""

    has_content = False

    def _xref(self, reftype: str, target: str, *children: nodes.Node) -> addnodes.pending_xref:
        """A cross-reference to ``target`` (a label or a document) showing ``children``."""
        return addnodes.pending_xref(
            "",
            *children,
            refdomain="std",
            reftype=reftype,
            reftarget=target,
            refexplicit=True,
            refwarn=True,
            refdoc=self.env.docname,
        )

    def _row(self, *cells: list[nodes.Node] | str) -> nodes.row:
        row = nodes.row()
        for content in cells:
            entry = nodes.entry()
            paragraph = nodes.paragraph()
            if isinstance(content, str):
                paragraph += nodes.Text(content)
            else:
                paragraph.extend(content)
            entry += paragraph
            row += entry
        return row

    def run(self) -> list[nodes.Node]:
        chapters = []
        for docname in _ordered_docnames(self.env):
            path = Path(self.env.doc2path(docname))
            if path.suffix != ".ipynb" or docname == self.env.docname:
                continue
            self.env.note_dependency(str(path))
            title, exercises = read_exercises(path)
            if exercises:
                chapters.append((docname, title, exercises))
        if not chapters:
            return [nodes.paragraph(text="No chapter has exercises yet.")]

        headings = ["Exercise", "Kind", "nbgrader points", "Minutes"]
        table = nodes.table(classes=["bncourse-exercises", "colwidths-given"])
        group = nodes.tgroup(cols=len(headings))
        table += group
        group.extend(nodes.colspec(colwidth=width) for width in [64, 12, 12, 12])
        head = nodes.thead()
        head += self._row(*headings)
        body = nodes.tbody()
        group += head
        group += body
        total_minutes = 0
        for docname, chapter_title, exercises in chapters:
            minutes = sum(exercise.estimate for exercise in exercises)
            total_minutes += minutes
            # one row naming the chapter and its notebook, across the table
            target = posixpath.relpath(docname, posixpath.dirname(self.env.docname) or ".")
            notebook = posixpath.basename(docname) + ".ipynb"
            chapter = [
                nodes.strong("", "", self._xref("doc", target, *_inline_markup(chapter_title))),
                nodes.Text(" ("),
                nodes.literal(notebook, notebook),
                nodes.Text(f"): {len(exercises)} exercises, about {minutes} minutes"),
            ]
            row = self._row(chapter)
            row[0]["morecols"] = len(headings) - 1
            body += row
            for exercise in exercises:
                link = self._xref("numref", exercise.label, nodes.Text("Exercise {number}"))
                title = [link, nodes.Text(": "), *_inline_markup(exercise.title), nodes.Text(" (")]
                title += [nodes.literal(exercise.label, exercise.label), nodes.Text(")")]
                points = f"{exercise.points:g}" if exercise.coding else "–"
                body += self._row(title, exercise.kind, points, str(exercise.estimate))
        summary = nodes.paragraph(
            text=f"{sum(len(e) for _, _, e in chapters)} exercises in {len(chapters)} chapters, "
            f"about {total_minutes / 60:.1f} hours of work in all."
        )
        return [table, summary]


# --- the package's code ------------------------------------------------------------------------


def source_without_docstring(source: str) -> str:
    """The source of one function or class, its docstring (if any) left out."""
    source = inspect.cleandoc("\n" + source) if source[:1].isspace() else source
    tree = ast.parse(source)
    definition = tree.body[0]
    body = getattr(definition, "body", [])
    if not (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        return source.rstrip()
    lines = source.splitlines()
    start, end = body[0].lineno - 1, body[0].end_lineno
    return "\n".join(lines[:start] + lines[end:]).rstrip()


class PackageCode(SphinxDirective):
    """``{bncourse-code} module.name``: the package's source of ``name``, docstring left out."""

    required_arguments = 1
    option_spec = {"docstring": lambda argument: True}

    def run(self) -> list[nodes.Node]:
        module_name, _, name = self.arguments[0].rpartition(".")
        try:
            module = importlib.import_module(module_name)
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part)
            source = inspect.getsource(obj)
        except (ImportError, AttributeError, OSError, TypeError) as err:
            raise self.error(f"bncourse-code: cannot show {self.arguments[0]}: {err}") from err
        self.env.note_dependency(inspect.getsourcefile(obj))
        if "docstring" not in self.options:
            source = source_without_docstring(source)
        block = nodes.literal_block(source, source, language="python")
        block["classes"].append("package-code")
        self.set_source_info(block)
        return [block]


def setup(app: Sphinx) -> dict:
    app.add_config_value("bncourse_hide_solutions", False, "env")
    app.add_css_file(STYLESHEET)
    app.connect("config-inited", configure)
    app.connect("builder-inited", remove_published_sources)
    app.connect("doctree-read", remove_solution_cells)
    app.connect("doctree-read", hide_grader_markers)
    app.connect("build-finished", copy_mathjax)
    app.connect("html-page-context", clean_scripts, priority=900)
    app.add_directive("bncourse-exercises", ExerciseTable)
    app.add_directive("bncourse-code", PackageCode)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
