"""The course site: built as the README's "Course site" section says, then read as files and in headless Chromium.

The build runs once per session (warnings are errors). The file checks need only the docs tools; the browser checks
need Chromium and its driver (Debian: `apt-get install chromium chromium-driver`) and skip, saying so, without them.
Internal links are checked here, by resolving every relative href and src of every page (and its #fragment) in the
built files: Sphinx's linkcheck would need the network for the external ones.
"""
import html
import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip("sphinx", reason="the course site needs the docs extra: pip install -e '.[docs]'")
pytest.importorskip("myst_nb", reason="the course site needs the docs extra: pip install -e '.[docs]'")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
ASSIGNMENTS = sorted((ROOT / "notebooks" / "assignments").glob("a*.ipynb"))
SOLUTIONS = sorted((ROOT / "notebooks" / "assignments" / "solutions").glob("a*.ipynb"))
COLAB = "https://colab.research.google.com/github/minina-org/minina/blob/main/"
BUILD_SECONDS = 180  # the site must stay cheap for CI: a few seconds of Sphinx per notebook at most


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The built site's folder: the README's command, into a temporary folder."""
    folder = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(folder / "doctrees"),
               "docs", str(folder / "html")]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert seconds < BUILD_SECONDS, f"the site took {seconds:.0f} s to build"
    print(f"course site built in {seconds:.1f} s into {folder / 'html'}")
    return folder / "html"


def page_of(path):
    """The site's page for a notebook: the notebook's own path in the repository, with .html."""
    return Path(*path.relative_to(ROOT).with_suffix(".html").parts)


class Page(html.parser.HTMLParser):
    """The resources (tag, attribute, url) a page refers to, and the ids it defines."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.references, self.ids = [], set()
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            if name in ("href", "src") and value is not None:
                self.references.append((tag, name, value))


def pages(site):
    """The site's pages, not the theme's template fragments copied into _static/."""
    return sorted(path for path in site.rglob("*.html") if "_static" not in path.relative_to(site).parts)


def test_every_notebook_and_assignment_has_a_page_with_a_colab_button(site):
    assert len(NOTEBOOKS) >= 9 and len(ASSIGNMENTS) >= 7
    for path in NOTEBOOKS + ASSIGNMENTS:
        page = site / page_of(path)
        assert page.is_file(), f"no page for {path.relative_to(ROOT)}"
        assert f'href="{COLAB}{path.relative_to(ROOT).as_posix()}"' in page.read_text(encoding="utf-8"), \
            f"{page_of(path)} has no Open in Colab button for {path.relative_to(ROOT)}"
    for name in ("index", "notebooks", "assignments", "teaching", "training", "performance", "learnability",
                 "results", "architecture", "api_tour", "api"):
        assert (site / f"{name}.html").is_file(), f"no page {name}.html"
    assert (site / "generated" / "minina.attention.html").is_file(), "no API page for minina.attention"


def solution_only_lines():
    """Lines of the solution notebooks (at least 20 characters) that no student notebook, chapter or file of the
    package contains: what the site would show only by leaking a solution."""
    handed_out = set()
    for path in ASSIGNMENTS + NOTEBOOKS:
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            handed_out.update(line.strip() for line in "".join(cell["source"]).splitlines())
    for path in (ROOT / "minina").rglob("*.py"):
        handed_out.update(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    lines = set()
    for path in SOLUTIONS:
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            for line in "".join(cell["source"]).splitlines():
                line = line.strip()
                if len(line) >= 20 and line not in handed_out and "SOLUTION" not in line and "HIDDEN" not in line:
                    lines.add(line)
    return lines


def text_of(html_text):
    """A page's text as a reader sees it: tags dropped, entities decoded, runs of spaces as one."""
    text = html.unescape(re.sub(r"<[^>]+>", "", html_text))
    return re.sub(r"\s+", " ", text)


def test_no_solution_appears_anywhere_on_the_site(site):
    secrets = solution_only_lines()
    assert len(secrets) > 50, "the solution notebooks should hold code the students' versions lack"
    squeezed = {re.sub(r"\s+", " ", line) for line in secrets}
    assert not list(site.rglob("solutions")), "a solutions folder was copied into the site"
    for path in site.rglob("*"):
        if path.suffix not in (".html", ".js", ".txt", ".ipynb", ".md", ".json") or not path.is_file() or \
                "_static" in path.relative_to(site).parts:  # the theme's and MathJax's own files
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = text_of(raw) if path.suffix == ".html" else re.sub(r"\s+", " ", raw)
        leaked = sorted(line for line in squeezed if line in text)
        assert not leaked, f"{path.relative_to(site)} shows solution code: {leaked[:3]}"


def is_external(url):
    return url.startswith(("http://", "https://", "//"))


def test_the_site_loads_nothing_from_the_network(site):
    """Scripts, styles, fonts and images all come from the site's own folder: it reads offline."""
    for page in pages(site):
        for tag, attribute, url in Page(page.read_text(encoding="utf-8")).references:
            if tag != "a" and is_external(url):
                pytest.fail(f"{page.relative_to(site)}: <{tag} {attribute}={url!r}> needs the network")
    for sheet in site.rglob("*.css"):
        remote = re.findall(r"(?:url\(\s*['\"]?|@import\s+['\"])((?:https?:)?//[^'\")]+)", sheet.read_text(
            encoding="utf-8", errors="replace"))
        assert not remote, f"{sheet.relative_to(site)} loads {remote[:3]}"
    home = (site / "index.html").read_text(encoding="utf-8")
    assert 'src="_static/mathjax/tex-chtml.js"' in home and (site / "_static/mathjax/tex-chtml.js").is_file()


def test_internal_links_resolve(site):
    """Every relative href and src of every page names a file of the site, and its #fragment an id there."""
    ids = {}
    broken = []
    for page in pages(site):
        for tag, attribute, url in Page(page.read_text(encoding="utf-8")).references:
            parts = urlsplit(url)
            if parts.scheme or url.startswith("//") or not (parts.path or parts.fragment):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(site)}: {url}")
            elif parts.fragment and target.suffix == ".html":
                if target not in ids:
                    ids[target] = Page(target.read_text(encoding="utf-8")).ids
                if unquote(parts.fragment) not in ids[target]:
                    broken.append(f"{page.relative_to(site)}: {url} (no such id)")
    assert not broken, f"{len(broken)} broken internal links: {broken[:10]}"


# ------------------------------------------------------------------------------------------------- in a browser


def browser_paths():
    """Chromium and its driver, or pytest.skip saying what to install."""
    pytest.importorskip("selenium", reason="the browser checks need selenium: pip install -e '.[dev]'")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium and its driver are not installed (Debian: apt-get install chromium "
                    "chromium-driver); the site itself was built and checked as files")
    return chromium, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="minina-chromium-")
    # no network here, and none needed: without these Chromium waits on connections it cannot make
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_page_load_timeout(60)
    yield session
    session.quit()
    shutil.rmtree(profile, ignore_errors=True)


# What a reader sees once MathJax has finished: typeset formulas, TeX errors, images that failed, text outside
# code with raw TeX delimiters left in it.
INSPECT = """
const done = arguments[arguments.length - 1];
const ready = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
ready.then(() => {
  const prose = document.querySelector("main") || document.body;
  const copy = prose.cloneNode(true);
  copy.querySelectorAll("pre, code, script, style, mjx-container").forEach((node) => node.remove());
  done({
    math: document.querySelectorAll("mjx-container").length,
    errors: document.querySelectorAll("mjx-merror").length,
    images: document.images.length,
    broken: Array.from(document.images).filter((img) => !(img.complete && img.naturalWidth > 0)).map((img) => img.src),
    raw: copy.innerText.includes("$$") || /\\\\(begin|frac|sqrt)\\b/.test(copy.innerText),
    title: document.title,
  });
});
"""


def inspect(browser, page):
    browser.get(page.as_uri())
    return browser.execute_async_script(INSPECT)


def has_math(path):
    return any(cell["cell_type"] == "markdown" and "$" in "".join(cell["source"])
               for cell in json.loads(path.read_text(encoding="utf-8"))["cells"])


def screenshot_folder(site):
    folder = Path(os.environ.get("MININA_SITE_SHOTS") or site.parent / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_home_page_and_notebook_03_show_typeset_math(site, browser, record_property):
    shots = screenshot_folder(site)
    home = inspect(browser, site / "index.html")
    assert home["math"] >= 3 and home["errors"] == 0 and not home["raw"], home
    browser.save_screenshot(str(shots / "home.png"))
    expressivity = next(path for path in NOTEBOOKS if path.stem.endswith("expressivity"))
    seen = inspect(browser, site / page_of(expressivity))
    assert seen["math"] > 20 and seen["errors"] == 0 and not seen["raw"], seen
    assert seen["images"] and not seen["broken"], seen
    browser.save_screenshot(str(shots / f"{expressivity.stem}.png"))
    assert (shots / "home.png").stat().st_size > 10_000
    record_property("screenshots", str(shots))
    print(f"screenshots of the course site in {shots}")


@pytest.mark.parametrize("path", NOTEBOOKS + ASSIGNMENTS, ids=[path.name for path in NOTEBOOKS + ASSIGNMENTS])
def test_notebook_page_in_the_browser(site, browser, path):
    """Each notebook's page: its math typeset without a TeX error, no raw $$ left, every figure loaded."""
    seen = inspect(browser, site / page_of(path))
    assert seen["errors"] == 0 and not seen["raw"], seen
    if has_math(path):
        assert seen["math"] > 0, f"{page_of(path)}: no typeset math: {seen}"
    assert not seen["broken"], f"{page_of(path)}: figures that did not load: {seen['broken']}"
    figures = sum("image/png" in output.get("data", {}) for cell in json.loads(path.read_text(encoding="utf-8"))[
        "cells"] for output in cell.get("outputs", []))
    assert seen["images"] >= figures, f"{page_of(path)} shows {seen['images']} images for {figures} figures"


def test_the_api_reference_lists_every_core_module():
    """docs/api.md's list of modules (the one place to update when modules move) names every file of the core."""
    listed = set(re.findall(r"^\s+(minina(?:\.\w+)*)$", (ROOT / "docs" / "api.md").read_text(encoding="utf-8"), re.M))
    core = {f"minina.{path.stem}" for path in (ROOT / "minina").glob("*.py")
            if path.stem not in ("__init__", "__main__")}
    assert core <= listed, f"docs/api.md misses {sorted(core - listed)}"
    missing = [name for name in listed if not (ROOT / Path(*name.split("."))).with_suffix(".py").is_file()
               and not (ROOT / Path(*name.split(".")) / "__init__.py").is_file()]
    assert not missing, f"docs/api.md lists modules that are gone: {missing}"
