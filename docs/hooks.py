"""mkdocs hooks (``hooks:`` in mkdocs.yml).

The docstrings are read by Sphinx-minded readers too: a role (``:meth:`Pool.tools` ``) shows as
the code it names, without the role's prefix.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:meth|func|class|attr|mod|exc|data|obj):(?=<code>)")


def on_page_content(html: str, **_: object) -> str:
    return _ROLE.sub("", html)
