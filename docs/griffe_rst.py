"""Griffe extension for the docs site: the package's docstrings use a few reStructuredText forms (cross-reference
roles such as ``:class:`~rast_kernels.RastEngine``` and ``::`` before a literal block); this turns them into
Markdown once mkdocstrings has loaded the package, so the source stays as it is.

* ``:role:`target``` becomes an optional cross-reference: a link when the target has an entry on the site, plain
  code otherwise (so ``mkdocs build --strict`` never fails on it). ``~`` shows the last component; a leading ``.``
  is relative to the object's package; an unqualified name is looked up in the object's class, module and package.
  A re-exported name links to where it is defined (``rast_kernels.rast_sample`` to
  ``rast_kernels.ops.rast_sample.rast_sample``).
* ``Text::`` ending a line becomes ``Text:`` and a line holding only ``::`` is dropped (the indented block after
  it is a Markdown code block already).
"""
from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(class|func|mod|meth|attr|data|exc|obj|const):`(~?)([.\w]+)`")
LITERAL_ALONE = re.compile(r"(?m)^[ \t]*::[ \t]*$")
LITERAL_END = re.compile(r"(?m)(?<=\S)::[ \t]*$")
_LOOKUP_ERRORS = (KeyError, ValueError, AttributeError, griffe.AliasResolutionError, griffe.CyclicAliasError)


def _module(obj):
    while not obj.is_module:
        obj = obj.parent
    return obj


def _find(loader, path: str, role: str):
    """The canonical path of the object ``path`` names, or None when the loaded package has no such object."""
    try:
        obj = loader.modules_collection.get_member(path)
        if obj.is_alias:
            obj = obj.final_target
    except _LOOKUP_ERRORS:
        return None
    name = path.rsplit(".", 1)[-1]
    if role != "mod" and obj.is_module and name in obj.members:
        # ``ops/__init__`` imports the function ``rast_sample`` from the module of the same name: griffe sees the
        # module there, the docstring means the function
        try:
            obj = obj.members[name]
            obj = obj.final_target if obj.is_alias else obj
        except _LOOKUP_ERRORS:
            return None
    return obj.path


def _resolve(obj, role: str, target: str, loader) -> str:
    mod = _module(obj)
    if target.startswith("."):
        base = mod.path if mod.is_init_module or mod.parent is None else mod.parent.path
        rest = target.lstrip(".")
        for _ in range(len(target) - len(rest) - 1):  # ".." is the parent package, as in a relative import
            base = base.rpartition(".")[0]
        candidates = [f"{base}.{rest}"]
    else:
        scopes, o = [], obj
        while o is not None:
            scopes.append(o.path)
            o = o.parent
        candidates = [f"{scope}.{target}" for scope in scopes] + [target]
    for path in candidates:
        found = _find(loader, path, role)
        if found:
            return found
    return candidates[0] if target.startswith(".") else target


def _markdown(obj, text: str, loader) -> str:
    def role(m):
        kind, tilde, target = m.groups()
        shown = target.rsplit(".", 1)[-1] if tilde else target.lstrip(".")
        path = _resolve(obj, kind, target, loader)
        return f'<autoref identifier="{html.escape(path)}" optional><code>{html.escape(shown)}</code></autoref>'

    text = LITERAL_END.sub(":", LITERAL_ALONE.sub("", text))
    return ROLE.sub(role, text)


def _walk(obj):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg, loader, **kwargs) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = _markdown(obj, obj.docstring.value, loader)
