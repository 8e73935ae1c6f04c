"""``.. gaspar-settings::``: the settings reference, generated from gaspar.config.Settings.

Every setting is defined once, in :mod:`gaspar.config`; this directive renders them as a
table (name, command-line flag, default, meaning), so the reference can never drift from
the code (``tests/test_docs.py`` checks it is complete).
"""

from __future__ import annotations

import dataclasses

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def default_of(field: dataclasses.Field) -> str:
    """A field's default as a reader should see it (a computed one: its factory's doc)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if callable(value):
        return getattr(value, "__name__", "a function")
    return f"``{value!r}``" if isinstance(value, str) else f"``{value}``"


def rows() -> list[tuple[str, str, str, str]]:
    from gaspar.config import Settings

    out = []
    for f in dataclasses.fields(Settings):
        flag = "``--" + f.name.replace("_", "-") + "``" if f.metadata.get("cli") else "(Python, config file)"
        meaning = " ".join(str(f.metadata.get("help", "")).split())
        out.append((f"``{f.name}``", flag, default_of(f), meaning))
    return out


class SettingsTable(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 20 22 12 46", ""]
        lines += ["   * - setting", "     - flag", "     - default", "     - meaning"]
        for name, flag, default, meaning in rows():
            lines += [f"   * - {name}", f"     - {flag}", f"     - {default}", f"     - {meaning}"]
        node = nodes.container()
        self.state.nested_parse(StringList(lines, source="gaspar.config.Settings"), self.content_offset, node)
        return node.children


def setup(app):  # noqa: ANN001, ANN201
    app.add_directive("gaspar-settings", SettingsTable)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
