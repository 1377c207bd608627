"""The docs cannot rot: their code runs, every public name has a docstring, the site builds,
and every page in the nav reads as a reader sees it (checked on the built HTML, built once)."""

import html
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE_PAGES = ["getting-started.md", "howto/custom-block.md", "howto/reading-a-solution.md",
                  "howto/variational-inference.md"]
PUBLIC_MODULES = ["arflow_solvers", "arflow_solvers.metrics", "arflow_solvers.planners",
                  "arflow_solvers.init", "arflow_solvers.plot", "arflow_solvers.divergence",
                  "arflow_solvers.distributed", "arflow_solvers.adjoint", "arflow_solvers.density",
                  "arflow_solvers.testing",
                  "arflow_solvers.adapters.made", "arflow_solvers.adapters.nflows",
                  "arflow_solvers.adapters.zuko", "arflow_solvers.adapters.normflows",
                  "arflow_solvers.adapters.pyro", "arflow_solvers.adapters.sbi",
                  "arflow_solvers.adapters.tarflow", "arflow_solvers.adapters.starflow"]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_every_code_block_on_the_page_runs(page):
    blocks = python_blocks(page)
    assert blocks, f"{page} has no python code block"
    namespace: dict = {"__name__": "docs"}
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), namespace)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no module docstring"
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
            missing.append(name)
    assert not missing, f"{module_name}: no docstring for {missing}"


def nav_pages() -> list[str]:
    """The Markdown pages that mkdocs.yml's nav names, in nav order (external links left out)."""
    nav = re.search(r"^nav:\n((?:[ \t]+.*\n|[ \t]*\n)+)", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert nav, "mkdocs.yml has no nav"
    return re.findall(r"(?<![\w/:.-])([\w./-]+\.md)\b", nav.group(1))


NAV_PAGES = nav_pages()


def built_html(page: str) -> str:
    """Where mkdocs (use_directory_urls) writes a page: foo/bar.md -> foo/bar/index.html."""
    path = Path(page)
    folder = path.parent if path.stem in ("index", "README") else path.with_suffix("")
    return str(folder / "index.html")


@dataclass
class Site:
    root: Path
    build: subprocess.CompletedProcess

    def page(self, page: str) -> str:
        """The page's article (its content, without the theme's header, nav and footer)."""
        path = self.root / built_html(page)
        if self.build.returncode != 0 and not path.is_file():  # a strict build writes its pages, then fails
            pytest.skip("the site did not build (see test_the_site_builds_strictly)")
        assert path.is_file(), f"{page} is in the nav but the build wrote no {built_html(page)}"
        text = path.read_text()
        article = re.search(r'<article class="md-content__inner[^"]*">(.*?)</article>', text, flags=re.S)
        assert article, f"{built_html(page)} has no article"
        return article.group(1)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    """One strict build of the site for every test that inspects it."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).with_name("mkdocs"))
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    return Site(out, result)


def without(tags: str, page: str) -> str:
    """The HTML with every element whose tag is in `tags` (with its content) cut out."""
    for tag in tags.split():
        page = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}>", " ", page, flags=re.S)
    return page


def math_of(page: str) -> list[tuple[str, bool]]:
    """Each arithmatex expression of the page as (TeX, display?), delimiters stripped."""
    found = re.findall(r'<(span|div) class="arithmatex">(.*?)</\1>', page, flags=re.S)
    strip = re.compile(r"^\\[(\[]|\\[)\]]$")
    return [(strip.sub("", html.unescape(tex).strip()), tag == "div") for tag, tex in found]


def test_the_site_builds_strictly(site):
    assert site.build.returncode == 0, site.build.stdout + site.build.stderr


def test_the_nav_names_the_api_reference():
    assert "api/core.md" in NAV_PAGES and "api/adapters.md" in NAV_PAGES, NAV_PAGES


def test_every_page_is_in_the_nav():
    """A page left out of the nav is built but no reader finds it."""
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    orphans = sorted(set(pages) - set(NAV_PAGES))
    assert not orphans, f"pages not in mkdocs.yml's nav: {orphans}"


@pytest.mark.parametrize("page", NAV_PAGES)
def test_the_nav_page_is_built(site, page):
    assert (ROOT / "docs" / page).is_file(), f"the nav names docs/{page}, which does not exist"
    assert site.page(page).strip()


@pytest.mark.parametrize("page", NAV_PAGES)
def test_doctest_prompts_are_only_inside_code_blocks(site, page):
    """A `>>>` example outside a code block renders as nested block quotes run together on
    one line (a docstring's `Example:` section, or a bare `>>>` in a page)."""
    article = site.page(page)
    assert not re.search(r"<blockquote>\s*<blockquote>", article), (
        f"{page}: nested block quotes, i.e. a `>>>` example rendered as text instead of a code "
        "block (use a Google-style `Examples:` section in docstrings, a fenced block in pages)")
    prose = html.unescape(re.sub(r"<[^>]+>", " ", without("pre code script", article)))
    stray = [line.strip() for line in prose.splitlines() if ">>>" in line]
    assert not stray, f"{page}: doctest prompts outside a code block: {stray[:3]}"


@pytest.mark.parametrize("page", NAV_PAGES)
def test_math_is_typeset_by_the_vendored_katex(site, page):
    """Math reaches the reader as arithmatex spans that KaTeX, shipped with the site, renders:
    no TeX left in the prose, no math script or stylesheet from a CDN."""
    article = site.page(page)
    outside_math = re.sub(r'<(span|div) class="arithmatex">.*?</\1>', " ", article, flags=re.S)
    prose = html.unescape(re.sub(r"<[^>]+>", " ", without("pre code script", outside_math)))
    tex = r"\$\$.+?\$\$|\$[^$\s][^$]*?\\[A-Za-z]+[^$]*?\$|\\\(.+?\\\)|\\\[.+?\\\]"
    raw = re.findall(tex, prose, flags=re.S)
    assert not raw, f"{page}: TeX that will show as raw text: {raw[:3]}"
    full = (site.root / built_html(page)).read_text()
    assert re.search(r'<script src="[./]*javascripts/katex/katex\.min\.js"', full), page
    assert re.search(r'<link rel="stylesheet" href="[./]*javascripts/katex/katex\.min\.css"', full), page
    remote = re.findall(r'<(?:script|link)\b[^>]*(?:src|href)="(https?://[^"]+)"', full)
    assert not remote, f"{page} loads {remote}: the page must read the same without a network"


def test_every_formula_parses_with_katex(site):
    """KaTeX shows a formula it cannot parse as red source text: parse them all with it."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    # a page the build did not write fails test_the_nav_page_is_built
    built = [page for page in NAV_PAGES if (site.root / built_html(page)).is_file()]
    formulas = sorted({(tex, display, page) for page in built for tex, display in math_of(site.page(page))})
    assert formulas, "no math on any page"
    script = r"""
        const katex = require(process.argv[1]);
        const failed = [];
        for (const [tex, display, page] of JSON.parse(require("fs").readFileSync(0, "utf8"))) {
          try { katex.renderToString(tex, { displayMode: display, throwOnError: true }); }
          catch (err) { failed.push(`${page}: ${tex}: ${err.message}`); }
        }
        console.log(JSON.stringify(failed));
    """
    katex = ROOT / "docs" / "javascripts" / "katex" / "katex.min.js"
    result = subprocess.run([node, "-e", script, str(katex)], input=json.dumps(formulas),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    failed = json.loads(result.stdout)
    assert not failed, "\n".join(failed)


class _Links:
    """The ids, and the local href/src targets, of one built HTML file."""

    def __init__(self, text: str):
        self.ids = set(re.findall(r'\bid="([^"]+)"', text))
        self.targets = [html.unescape(t) for t in re.findall(r'\b(?:href|src)="([^"]*)"', text)]


@pytest.mark.parametrize("page", NAV_PAGES)
def test_links_and_cross_references_resolve(site, page):
    """Every local link, script, stylesheet and image exists, every #anchor exists on its page,
    no cross-reference was left as literal `[text][identifier]` text, and no anchor is on the
    page twice (an object documented twice, so links and the table of contents are ambiguous)."""
    site.page(page)
    path = site.root / built_html(page)
    links, broken = _Links(path.read_text()), []
    cache = {path: links}
    for target in links.targets:
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or target.startswith("//"):
            continue
        dest = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        if dest.is_dir():
            dest = dest / "index.html"
        if not dest.is_file():
            broken.append(target)
        elif parts.fragment and dest.suffix == ".html":
            if dest not in cache:
                cache[dest] = _Links(dest.read_text())
            if unquote(parts.fragment) not in cache[dest].ids:
                broken.append(target)
    assert not broken, f"{page}: links to nothing: {sorted(set(broken))}"
    ids = re.findall(r'\bid="([^"]+)"', site.page(page))
    twice = sorted({i for i in ids if ids.count(i) > 1})
    assert not twice, f"{page}: documented twice (the same anchor twice): {twice[:5]}"
    prose = html.unescape(re.sub(r"<[^>]+>", " ", without("pre code script", site.page(page))))
    literal = re.findall(r"\[[^\]\n]+\]\[[\w.]+\]", prose)
    assert not literal, f"{page}: unresolved cross-references: {literal[:5]}"


def _resolve(path: str):
    """The object a dotted path names (attributes followed after the longest importable module)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name, None)
        return obj
    return None


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_is_on_an_api_page(site, module_name):
    """Each name in a public module's `__all__` has an entry (an anchor) on an API page, under
    this module's path or under any path that names the same object."""
    ids = set()
    for page in NAV_PAGES:
        if page.startswith("api/"):
            site.page(page)
            ids |= _Links((site.root / built_html(page)).read_text()).ids
    module = importlib.import_module(module_name)
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if f"{module_name}.{name}" in ids:
            continue
        if not any(i.endswith(f".{name}") and _resolve(i) is obj for i in ids):
            missing.append(name)
    assert not missing, f"{module_name}: not on any API page: {missing} (add a `::: ` entry to docs/api/)"


def test_every_public_module_is_in_public_modules():
    """A new public module (`arflow_solvers.X`, `arflow_solvers.adapters.X`) joins PUBLIC_MODULES,
    and so the API pages, unless it only implements names that `arflow_solvers` re-exports."""
    package = ROOT / "arflow_solvers"
    implementing = set(re.findall(r"^from \.(\w+) import", (package / "__init__.py").read_text(), flags=re.M))
    unlisted = []
    for parent, folder in (("arflow_solvers", package), ("arflow_solvers.adapters", package / "adapters")):
        for path in sorted(folder.iterdir()):
            name = path.stem if path.suffix == ".py" else path.name
            is_module = path.suffix == ".py" or (path / "__init__.py").is_file()
            if not is_module or name.startswith("_") or name == "adapters":
                continue
            implementation = parent == "arflow_solvers" and name in implementing
            if f"{parent}.{name}" not in PUBLIC_MODULES and not implementation:
                unlisted.append(f"{parent}.{name}")
    assert not unlisted, f"public modules missing from PUBLIC_MODULES (and the API pages?): {unlisted}"
