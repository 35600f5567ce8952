"""The built book, opened in headless Chromium (Debian's `chromium`, offline).

The book is built at TOOLKIT_SCALE=tiny into a temporary folder with the flags of `make book`
(`-n -W --keep-going`, so any warning fails). To run each notebook once per test session, the
build uses the copies that tests/test_notebooks.py executed (same kernel, same cwd, same scale)
with execution switched off; everything else is the book's own configuration. Every page of
_toc.yml is then loaded with JavaScript running and its final DOM checked: no console errors, math
typeset by the vendored MathJax (no raw TeX, no MathJax errors), every image, script and style
sheet local and present, every internal link and anchor resolving, and a Colab launch link on each
notebook page pointing at that notebook in the repository.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup
from test_notebooks import executed

from toolkit import toc

ROOT = Path(__file__).resolve().parent.parent
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing may come from the network
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=20000", "--dump-dom"]
CONSOLE = re.compile(r":CONSOLE[:(]\d+\)?\]? (\".*)")
BAD_CONSOLE = re.compile(r"uncaught|error|failed|refused|exception|not found|undefined control", re.I)


def _toc_pages() -> list[str]:
    return toc.pages(ROOT / "_toc.yml")


PAGES = _toc_pages()
NOTEBOOK_PAGES = [p for p in PAGES if (ROOT / f"{p}.ipynb").is_file()]
THEORY = [p for p in NOTEBOOK_PAGES if re.match(r"notebooks/0[1-4]_", p)]


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:  # the test set-up installs Debian's chromium where it can
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], env=env,
                       capture_output=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return shutil.which("chromium")


def load(browser: str, url: str) -> tuple[str, list[str]]:
    """Open `url` with JavaScript running; return the final DOM and the console messages."""
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", url],
                           capture_output=True, text=True, timeout=180)
    console = [m.group(1) for m in map(CONSOLE.search, r.stderr.splitlines()) if m]
    return r.stdout, console


def console_errors(console: list[str]) -> list[str]:
    return [c for c in console if BAD_CONSOLE.search(c)]


@pytest.fixture(scope="module")
def browser() -> str:
    path = _chromium()
    if not path:
        pytest.skip("headless Chromium is missing and could not be installed (`apt-get install chromium` "
                    "needs root and Debian's package servers): the site's browser checks did not run")
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The book built at the tiny scale from executed notebooks; fails on any error or warning."""
    vendored = subprocess.run(["sh", "book/vendor_mathjax.sh"], cwd=ROOT, capture_output=True, text=True)
    assert vendored.returncode == 0, f"vendoring MathJax from npm failed:\n{vendored.stderr[-2000:]}"
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("book")
    config = {**CONFIG, "execute": {**CONFIG["execute"], "execute_notebooks": "off"}}
    (src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(ROOT / "_toc.yml", src / "_toc.yml")
    shutil.copytree(ROOT / "book", src / "book")
    shutil.copytree(ROOT / ".cache" / "book_static", src / ".cache" / "book_static")
    (src / "notebooks").mkdir()
    for page in NOTEBOOK_PAGES:
        shutil.copy(executed(ROOT / f"{page}.ipynb"), src / f"{page}.ipynb")
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(src), "--path-output", str(out),
           "-n", "-W", "--keep-going"]
    r = subprocess.run(cmd, cwd=src, capture_output=True, text=True, timeout=1200)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"the book build failed or warned:\n{log[-6000:]}"
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def pages(site, browser) -> dict[str, tuple[BeautifulSoup, list[str]]]:
    """Every toc page loaded in Chromium (two at a time): page -> (final DOM, console messages)."""
    def one(page):
        dom, console = load(browser, (site / f"{page}.html").as_uri())
        return page, (BeautifulSoup(dom, "html.parser"), console)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, PAGES))


def test_console_check_can_fail(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('Error: boom'); undefinedFunction();</script></body></html>")
    dom, console = load(browser, bad.as_uri())
    assert "<body>" in dom
    assert len(console_errors(console)) == 2, console


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_without_console_errors(pages, page):
    soup, console = pages[page]
    assert soup.find("article") is not None, f"{page}: no article in the page"
    assert not console_errors(console), f"{page}: console errors {console_errors(console)}"


@pytest.mark.parametrize("page", PAGES)
def test_math_is_typeset(pages, page):
    soup, _ = pages[page]
    article = soup.find("article")
    math = article.select(".math")
    raw = [m.get_text()[:80] for m in math if m.find("mjx-container") is None]
    assert not raw, f"{page}: math left as raw TeX: {raw[:3]}"
    assert not article.select("mjx-merror"), f"{page}: MathJax errors {[e.get_text() for e in article.select('mjx-merror')][:3]}"
    for code in article.select("pre, code, .cell_input"):
        code.decompose()
    text = article.get_text()
    assert "\\(" not in text and "\\[" not in text and "$" not in text, f"{page}: raw TeX delimiters in the text"
    if page in THEORY or page == PAGES[0]:
        assert math and article.select("mjx-container"), f"{page}: expected typeset math"


@pytest.mark.parametrize("page", PAGES)
def test_no_python_reprs_in_the_prose(pages, page):
    """A value pasted with the wrong glue role reads "<IPython.core.display.Markdown object>"."""
    soup, _ = pages[page]
    article = soup.find("article")
    for code in article.select("pre, code, .cell_input, .cell_output"):
        code.decompose()
    reprs = re.findall(r"<[\w.]+ object(?: at 0x[0-9a-f]+)?>", article.get_text())
    assert not reprs, f"{page}: Python reprs in the text: {reprs[:3]}"


def _local_target(site: Path, page: str, url: str) -> Path | None:
    parts = urlsplit(url)
    if parts.scheme or url.startswith("//"):
        return None
    base = (site / page).parent
    return (base / unquote(parts.path)).resolve() if parts.path else (site / f"{page}.html").resolve()


@pytest.mark.parametrize("page", PAGES)
def test_assets_are_local_and_present(site, pages, page):
    soup, _ = pages[page]
    refs = [(t.name, t.get("src") or t.get("href")) for t in soup.find_all(["img", "script", "link"])
            if (t.get("src") or t.get("href")) and not (t.name == "link" and "canonical" in (t.get("rel") or []))]
    remote = [u for _, u in refs if urlsplit(u).scheme in ("http", "https") or u.startswith("//")]
    assert not remote, f"{page}: assets from the network: {remote}"
    missing = [u for _, u in refs if (p := _local_target(site, page, u)) is not None and not p.is_file()]
    assert not missing, f"{page}: missing files {missing}"
    images = [_local_target(site, page, t["src"]) for t in soup.find("article").find_all("img") if t.get("src")]
    assert all(p is not None and p.stat().st_size > 100 for p in images), f"{page}: empty images"
    if page in THEORY:
        assert images, f"{page}: expected its figures, found no images"


_ids: dict[Path, set[str]] = {}


def _anchors(path: Path) -> set[str]:
    if path not in _ids:
        _ids[path] = set(re.findall(r'\bid="([^"]+)"', path.read_text(errors="replace")))
    return _ids[path]


@pytest.mark.parametrize("page", PAGES)
def test_internal_links_resolve(site, pages, page):
    soup, _ = pages[page]
    bad = []
    for a in soup.find_all("a", href=True):
        href = a["href"]
        if href.startswith(("mailto:", "javascript:")) or href == "#":
            continue
        target = _local_target(site, page, href)
        if target is None:
            continue
        if target.is_dir():
            target = target / "index.html"
        frag = unquote(urlsplit(href).fragment)
        if not target.is_file():
            bad.append(href)
        elif frag and target.suffix == ".html" and frag not in _anchors(target):
            bad.append(href)
    assert not bad, f"{page}: broken internal links {bad[:10]}"


@pytest.mark.parametrize("page", NOTEBOOK_PAGES)
def test_notebook_page_has_colab_and_download_links(pages, page):
    soup, _ = pages[page]
    repo = CONFIG["repository"]["url"].rstrip("/").split("github.com/")[1]
    prefix = CONFIG["repository"].get("path_to_book", "").strip("/")
    path = f"{prefix}/{page}.ipynb" if prefix else f"{page}.ipynb"
    expected = f"{CONFIG['launch_buttons']['colab_url']}/github/{repo}/blob/{CONFIG['repository']['branch']}/{path}"
    hrefs = [a["href"] for a in soup.find_all("a", href=True)]
    assert expected in hrefs, f"{page}: no Colab link {expected}; Colab links: {[h for h in hrefs if 'colab' in h]}"
    assert (ROOT / path).is_file(), f"the Colab link points at {path}, which is not in the repository"
    assert any(h.endswith(f"_sources/{page}.ipynb") for h in hrefs), f"{page}: no .ipynb download link"
