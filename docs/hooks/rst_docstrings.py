"""A Griffe extension for the API reference: the docstrings' reST spellings as Markdown.

The package's docstrings are written for ``help()`` and Sphinx-style readers: roles such as
``:class:`~celery_unique.Lock``` and literal blocks introduced by ``::``. mkdocstrings
renders Markdown, so before rendering, a role becomes inline code (its target's last part
with ``~``, as Sphinx shows it) and a ``::`` block becomes a fenced Python block.
"""

from __future__ import annotations

import ast
import re
import textwrap
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|exc|data|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _literal_blocks(text: str) -> str:
    """``para::`` followed by an indented block becomes ``para:`` and a fenced block."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        head = line.rstrip()[:-2].rstrip()
        if head:
            out.append(head + ":")
        indent = len(line) - len(line.lstrip())
        j = i + 1
        block: list[str] = []
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        code = textwrap.dedent("\n".join(block)).strip("\n")
        pad = " " * indent
        fence = "```" + _language(code)
        out += ["", pad + fence, *(pad + c if c else "" for c in code.splitlines())]
        out += [pad + "```", ""]
        i = j
    return "\n".join(out)


def _language(code: str) -> str:
    """``python`` for a block that parses as Python, else ``text`` (a tree, a table)."""
    try:
        ast.parse(code)
    except SyntaxError:
        return "text"
    return "python"


def markdown(text: str) -> str:
    """A reST-flavoured docstring as Markdown."""
    return _ROLE.sub(_role, _literal_blocks(text))


class RstDocstrings(griffe.Extension):
    """Rewrites every docstring once it is read."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
