"""MkDocs hook: the docstrings' Sphinx roles (``:class:`~a.B```, ``:func:`f```) rendered as code.

mkdocstrings renders Google-style docstrings as Markdown, where a role comes out as its literal text
before a code span (``:class:<code>~a.B</code>``). The role is dropped and, as Sphinx does for ``~``, only
the last component of the name is shown.
"""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _code(match: re.Match[str]) -> str:
    short, name = match.group(1), match.group(2)
    return f"<code>{name.rsplit('.', 1)[-1] if short else name}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return ROLE.sub(_code, html)
