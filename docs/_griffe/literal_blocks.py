"""A griffe extension: the docstrings' reStructuredText literal blocks, shown as code on the site.

dropsafe's docstrings end a paragraph with ``::`` before an indented example (``Example::``),
which reads well in the source, in ``help()`` and in an editor's tooltip. The site's Google-style
parser knows no ``::``: the reference pages showed a literal ``Example::`` and unhighlighted
text. This rewrites each such block, as the site loads it, to what the parser knows: a fenced
block (Python when it parses as Python, else text), under an ``Example:`` section when the
paragraph was that word alone. The source stays as it is; loaded by mkdocs.yml
(``extensions``), and excluded from the site's pages (``exclude_docs``).
"""

from __future__ import annotations

import ast
import textwrap
from typing import Any

import griffe

# Paragraphs that become a section of the Google style (an admonition on the page).
_SECTIONS = frozenset({"Example", "Examples"})


def convert(text: str) -> str:
    """Return ``text`` with each ``::`` literal block turned into a fenced code block."""
    lines = text.splitlines()
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.rstrip()
        if not stripped.endswith("::"):
            out.append(line)
            index += 1
            continue
        indent = len(line) - len(line.lstrip())
        end = index + 1
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > indent):
            end += 1
        block = lines[index + 1 : end]
        while block and not block[-1].strip():
            block.pop()
        if not any(each.strip() for each in block):
            out.append(line)
            index += 1
            continue
        code = textwrap.dedent("\n".join(block)).strip("\n")
        head = stripped[:-2].rstrip()
        margin = " " * indent
        if head.strip() in _SECTIONS:
            out.append(f"{margin}{head.strip()}:")
            margin += "    "
        else:
            if head.strip():
                out.append(f"{head}:")
            out.append("")
        out.append(f"{margin}```{_language(code)}")
        out.extend(f"{margin}{each}" if each else "" for each in code.splitlines())
        out.append(f"{margin}```")
        out.append("")
        index = end
    return "\n".join(out).rstrip("\n")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _language(code: str) -> str:
    try:
        ast.parse(code)
    except SyntaxError:
        return "text"
    return "python"


class LiteralBlocks(griffe.Extension):
    """Rewrite every loaded object's docstring (see the module doc)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ANN401
        """Rewrite ``obj``'s docstring, once it is loaded."""
        del kwargs
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
