"""MkDocs hook: the configuration reference, generated from ``RunConfig`` at build time.

``docs/reference/configuration.md`` holds the hand-written introduction and the marker
:data:`MARKER`; this hook replaces the marker with one table row per ``RunConfig`` field: the
kebab-case key, the type and the description from the numpy-style ``Attributes`` section of the
``RunConfig`` docstring, and the default as written in ``[tool.flwr.app.config]`` of
``pyproject.toml``. The build fails (and so does ``tests/test_docs.py``) when the three sources
disagree: a field without a docstring entry, an entry that does not name its key, a docstring default,
a dataclass default or a ``pyproject.toml`` default that differ, a key in one but not the others.

:func:`render` is importable on its own (``tests/test_config.py`` uses it) and needs no MkDocs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import sys
import tomllib
from typing import Any

PAGE = "reference/configuration.md"
MARKER = "<!-- generated: the RunConfig table -->"
SEE_ALSO_SECTIONS = ("tutorial/", "how-to/", "explanation/")  # pages whose mentions of a key are linked
SEE_ALSO_MAX = 3


class ConfigReferenceError(Exception):
    """The docstring, the dataclass and pyproject.toml disagree (or a page lacks the marker)."""


class Entry:
    """One item of the ``Attributes`` section (a plain class: MkDocs loads hooks outside ``sys.modules``)."""

    def __init__(self, names: list[str], type_: str, defaults: list[str], description: str) -> None:
        self.names = names  # dataclass field names, as the docstring lists them
        self.type = type_
        self.defaults = defaults  # one default text per name
        self.description = description  # RST-ish source text, joined into one line


def _run_config_class(repo: str) -> type:
    try:
        from fedlinear.common.config import RunConfig
    except ImportError:  # not installed: import from the checkout
        sys.path.insert(0, repo)
        from fedlinear.common.config import RunConfig
    return RunConfig


def parse_attributes(doc: str) -> list[Entry]:
    """The numpy-style ``Attributes`` section of a docstring, one :class:`Entry` per item."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes" and lines[i + 1].startswith("---"))
    except StopIteration:
        raise ConfigReferenceError("the RunConfig docstring has no 'Attributes' section") from None
    entries: list[Entry] = []
    head = re.compile(r"^(?P<names>[a-z_0-9]+(?:, [a-z_0-9]+)*) : (?P<type>.+?) \(default: (?P<default>.+)\)$")
    for i in range(start + 2, len(lines)):
        line = lines[i]
        if i + 1 < len(lines) and lines[i + 1].startswith("---") and line.strip():
            break  # the next section
        if not line.strip():
            continue
        if line.startswith(" "):
            if not entries:
                raise ConfigReferenceError(f"RunConfig docstring: description before any attribute: {line.strip()!r}")
            entries[-1].description = (entries[-1].description + " " + line.strip()).strip()
            continue
        match = head.match(line)
        if not match:
            raise ConfigReferenceError(
                f"RunConfig docstring: cannot read the attribute line {line!r} (expected 'name : type (default: value)')"
            )
        names = match["names"].split(", ")
        default = re.sub(r" = .*$", "", match["default"])  # "4194304 = 2**22" -> "4194304"
        defaults = [d.strip() for d in default.split(",")] if len(names) > 1 else [default.strip()]
        if len(defaults) != len(names):
            raise ConfigReferenceError(f"RunConfig docstring: {line!r} names {len(names)} attributes but gives {len(defaults)} defaults")
        entries.append(Entry(names, match["type"], defaults, ""))
    return entries


def _literal(text: str) -> Any:
    """A docstring default as a value: quoted string, true/false, or a number."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        raise ConfigReferenceError(f"RunConfig docstring: cannot read the default {text!r}") from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=0, abs_tol=0)


def _pyproject(repo: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``[tool.flwr.app.config]``: the parsed values and each value's text as written."""
    path = os.path.join(repo, "pyproject.toml")
    with open(path, "rb") as handle:
        values = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    written: dict[str, str] = {}
    section = None
    with open(path, encoding="utf-8") as handle:
        for raw in handle:
            line = raw.strip()
            if line.startswith("["):
                section = line
                continue
            if section == "[tool.flwr.app.config]" and "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                written[key.strip()] = value.split(" #")[0].strip()
    if set(written) != set(values):
        raise ConfigReferenceError("pyproject.toml: cannot read [tool.flwr.app.config] line by line (one 'key = value' a line)")
    return values, written


def _markdown(text: str) -> str:
    """RST-ish docstring markup to Markdown for a table cell: ``code`` -> `code`, :role:`x` -> `x`, and
    a ``|`` outside code escaped (inside a code span the table reads it as text)."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    parts = text.split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def rows(repo: str) -> list[dict[str, str]]:
    """One dict per RunConfig field, in declaration order: key, type, default (as in pyproject.toml),
    description (Markdown). Raises :class:`ConfigReferenceError` when the sources disagree."""
    run_config = _run_config_class(repo)
    fields = {f.name: f for f in dataclasses.fields(run_config)}
    entries = parse_attributes(run_config.__doc__ or "")
    documented: dict[str, tuple[Entry, str]] = {}
    for entry in entries:
        for name, default in zip(entry.names, entry.defaults):
            if name in documented:
                raise ConfigReferenceError(f"RunConfig docstring documents '{name}' twice")
            if name not in fields:
                raise ConfigReferenceError(f"RunConfig docstring documents '{name}', which is not a RunConfig field")
            documented[name] = (entry, default)
    problems = [f"RunConfig field '{name}' has no entry in the docstring's Attributes" for name in fields if name not in documented]
    values, written = _pyproject(repo)
    keys = [name.replace("_", "-") for name in fields]
    problems += [f"pyproject.toml [tool.flwr.app.config] lacks '{key}'" for key in keys if key not in values]
    problems += [f"pyproject.toml [tool.flwr.app.config] has '{key}', which is not a RunConfig field" for key in values if key not in keys]
    out = []
    for name, field in fields.items():
        if name not in documented:
            continue
        key = name.replace("_", "-")
        entry, doc_default = documented[name]
        value = field.default
        if not _same(_literal(doc_default), value):
            problems.append(f"'{key}': the docstring says default {doc_default}, the dataclass {value!r}")
        if key in values and not _same(values[key], value):
            problems.append(f"'{key}': pyproject.toml says {written[key]}, the dataclass {value!r}")
        named = re.findall(r"\(([^()]*)\)", entry.description)
        if not any(f"``{key}``" in group for group in named):
            problems.append(f"'{key}': the docstring entry does not name the key as (``{key}``)")
        description = entry.description
        keys_of_entry = ", ".join(f"``{n.replace('_', '-')}``" for n in entry.names)
        description = description.replace(f" ({keys_of_entry})", "")  # the key has its own column
        out.append({
            "key": key,
            "type": entry.type,
            "default": written.get(key, repr(value)),
            "description": _markdown(description),
        })  # fmt: skip
    if problems:
        raise ConfigReferenceError("the configuration reference cannot be generated:\n  " + "\n  ".join(problems))
    return out


def _see_also(keys: list[str], pages: dict[str, str]) -> dict[str, list[str]]:
    """For each key, the pages (src paths) that mention it in backticks most often."""
    out: dict[str, list[str]] = {}
    for key in keys:
        pattern = re.compile(r"`" + re.escape(key) + r"(?:`| ?=)")
        counts = [(len(pattern.findall(text)), order, path) for order, (path, text) in enumerate(pages.items())]
        ranked = sorted((c for c in counts if c[0]), key=lambda c: (-c[0], c[1]))
        out[key] = [path for _, _, path in ranked[:SEE_ALSO_MAX]]
    return out


def render(repo: str, pages: dict[str, str] | None = None, titles: dict[str, str] | None = None) -> str:
    """The Markdown table that replaces :data:`MARKER`. ``pages`` (src path -> Markdown source) adds a
    "see also" column linking to the pages that mention each key; links are relative to :data:`PAGE`."""
    table = rows(repo)
    see = _see_also([r["key"] for r in table], pages) if pages else {}
    here = os.path.dirname(PAGE)
    head = "| key | type | default | meaning |" + (" see also |" if pages else "")
    lines = [head, "| --- | --- | --- | --- |" + (" --- |" if pages else "")]
    for row in table:
        cells = [
            f'<span id="{row["key"]}"></span>`{row["key"]}`',
            row["type"].replace("|", "\\|"),
            f"`{row['default']}`",
            row["description"],
        ]
        if pages:
            links = [
                f"[{(titles or {}).get(path, path)}]({os.path.relpath(path, here)})" for path in see.get(row["key"], [])
            ]
            cells.append(", ".join(links))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- MkDocs events ------------------------------------------------------------------------------

_pages: dict[str, str] = {}
_titles: dict[str, str] = {}


def _nav_titles(nav: Any, out: dict[str, str]) -> dict[str, str]:
    """Page path -> the title ``nav`` gives it (``- Title: path.md``); bare paths get none."""
    if isinstance(nav, list):
        for item in nav:
            _nav_titles(item, out)
    elif isinstance(nav, dict):
        for title, value in nav.items():
            if isinstance(value, str):
                out[value] = title
            else:
                _nav_titles(value, out)
    return out


def on_files(files, config):  # noqa: ANN001 (MkDocs hook signature)
    _pages.clear()
    _titles.clear()
    nav_titles = _nav_titles(config.get("nav") or [], {})
    for file in files.documentation_pages():
        path = file.src_uri
        if path == PAGE or not path.startswith(SEE_ALSO_SECTIONS):
            continue
        text = file.content_string
        _pages[path] = text
        title = nav_titles.get(path) or next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), path)
        _titles[path] = title.replace("[", "").replace("]", "")
    return files


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001 (MkDocs hook signature)
    if page.file.src_uri != PAGE:
        return markdown
    from mkdocs.exceptions import PluginError

    if markdown.count(MARKER) != 1:
        raise PluginError(f"{PAGE} must contain the line {MARKER!r} exactly once")
    repo = os.path.dirname(os.path.abspath(config.config_file_path))
    try:
        table = render(repo, dict(_pages), dict(_titles))
    except ConfigReferenceError as error:
        raise PluginError(str(error)) from None
    return markdown.replace(MARKER, table)
