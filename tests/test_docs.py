"""The documentation site (``mkdocs.yml``, ``docs/``) and the README's examples.

* ``mkdocs build --strict`` succeeds into a temporary folder (a broken link, a missing reference or a docstring
  the handler cannot parse fails it) and every page of the navigation is built;
* every public name of the documented packages (``__all__``, or the public names a module defines when it has
  none) has an entry in the API reference: an anchor of that name on an API page, or, for a re-exported class or
  function, an anchor that resolves to that very object;
* the README's relative links name files that exist;
* the Python blocks marked ``<!-- docs-test: run -->`` in ``docs/`` and ``README.md`` run, page by page in one
  namespace (as a reader would run them in order), on the shipped toy trio.

Needs the ``docs`` extra (part of ``test``).
"""
import html
import importlib
import inspect
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC_PACKAGES = ("rast_kernels", "rast_kernels.engine", "rast_kernels.eval", "rast_kernels.serve",
                   "rast_kernels.parallel", "rast_kernels.ops", "rast_kernels.params")
RUN_MARK = "<!-- docs-test: run -->"
MARK_LINE = re.compile(r"^" + re.escape(RUN_MARK) + r"$", re.M)
RUNNABLE = re.compile(r"^" + re.escape(RUN_MARK) + r"\n```python\n(.*?)\n```$", re.S | re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _nav_pages(nav):
    for item in nav:
        if isinstance(item, str):
            yield item
        else:
            for value in item.values():
                yield from ([value] if isinstance(value, str) else _nav_pages(value))


def _built_path(site: Path, page: str) -> Path:
    stem = page[:-len(".md")]
    if stem == "index" or stem.endswith("/index"):
        return site / stem[:-len("index")] / "index.html"
    return site / stem / "index.html"


def test_every_nav_page_is_built(site):
    import yaml

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    pages = list(_nav_pages(config["nav"]))
    assert len(pages) >= 15
    for page in pages:
        assert (DOCS / page).is_file(), page
        built = _built_path(site, page)
        assert built.is_file(), f"{page} was not built ({built})"
    # the sampler's spec is rendered from its docstring, not copied
    spec = importlib.import_module("rast_kernels.ops.rast_sample").__doc__
    sampler = _text(_built_path(site, "concepts/sampler.md"))
    assert "exponential race" in spec and "exponential race" in sampler
    assert "exponential race" not in (DOCS / "concepts/sampler.md").read_text()


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k == "id" and v:
                self.ids.add(v)


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)


def _text(path: Path) -> str:
    p = _Text()
    p.feed(path.read_text())
    return html.unescape(" ".join(p.parts))


def _resolve(path: str):
    """The object a dotted path names (the longest importable module prefix, then attributes), or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None


def _public_names(module) -> list:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    # no __all__: what the module itself defines (classes, functions, constants), not what it imports
    return [n for n, v in vars(module).items() if not n.startswith("_") and not inspect.ismodule(v)
            and getattr(v, "__module__", module.__name__) == module.__name__]


def test_every_public_name_has_a_reference_entry(site):
    pytest.importorskip("fastapi")  # rast_kernels.serve's names are imported on first use
    ids = set()
    for page in (site / "api").rglob("index.html"):
        p = _Ids()
        p.feed(page.read_text())
        ids |= {i for i in p.ids if i.startswith("rast_kernels.")}
    # a re-export (rast_kernels.RastEngine) is documented where it is defined: match classes and functions by
    # identity (not data: two names may hold an equal constant)
    documented = {id(obj) for obj in map(_resolve, ids) if inspect.isclass(obj) or inspect.isroutine(obj)}
    missing = []
    for pkg_name in PUBLIC_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for name in _public_names(pkg):
            obj = getattr(pkg, name)
            if f"{pkg_name}.{name}" not in ids and id(obj) not in documented:
                missing.append(f"{pkg_name}.{name}")
    assert not missing, f"public names without an API reference entry: {missing}"


def test_readme_links_point_to_files():
    """The README is read on the forge, outside the site: its relative links must name files that exist."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    relative = [link for link in links if "://" not in link]
    assert len(relative) >= 10
    assert [link for link in relative if not (ROOT / link).exists()] == []


def _runnable_pages():
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    return [p for p in pages if MARK_LINE.search(p.read_text())]


def test_runnable_blocks_are_python_blocks():
    """A mark that is not followed by a ```python block would silently run nothing."""
    for page in _runnable_pages():
        text = page.read_text()
        assert len(MARK_LINE.findall(text)) == len(RUNNABLE.findall(text)), page


@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_marked_examples_run(page, capsys):
    import torch

    from rast_kernels.engine import clear_engine_cache
    from rast_kernels.parallel import shutdown

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toy models are tiny: threads only contend (on a loaded 2-core machine, 10x)
    namespace = {"__name__": "__docs_example__"}
    try:
        for i, block in enumerate(RUNNABLE.findall(page.read_text())):
            code = compile(block, f"{page.relative_to(ROOT)}[block {i}]", "exec")
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
    finally:
        torch.set_num_threads(threads)
        clear_engine_cache()  # rast_generate's cached engines
        shutdown()  # a parallel context an example set up
    capsys.readouterr()
