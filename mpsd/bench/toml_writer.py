"""Write the TOML that bench and tune generate: temporary daemon configs and ``[[gpu]]`` blocks.

Why our own: Python reads TOML (tomllib) but cannot write it, and what mpsd writes is the small
subset its config uses — tables, arrays of tables one level deep, strings, numbers, booleans,
lists and inline tables. :func:`dumps` output always parses back to the same data
(tests/unit/bench/test_toml_writer.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def value(item: Any) -> str:
    """One TOML value (the right-hand side of ``key = ...``)."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int):
        return str(item)
    if isinstance(item, float):
        if not math.isfinite(item):
            raise ValueError(f"TOML config values must be finite (got {item})")
        return repr(item)
    if isinstance(item, str):
        return _string(item)
    if isinstance(item, list | tuple):
        return "[" + ", ".join(value(v) for v in item) + "]"
    if isinstance(item, Mapping):
        return "{" + ", ".join(f"{key(k)} = {value(v)}" for k, v in item.items()) + "}"
    raise TypeError(f"cannot write {type(item).__name__} as TOML")


def _string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML wants characters beyond
    the BMP as themselves (not surrogate pairs) and DEL escaped."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def key(name: str) -> str:
    bare = name.replace("_", "").replace("-", "").isalnum() and name.isascii()
    return name if bare else _string(name)


def _is_table_array(item: Any) -> bool:
    return isinstance(item, list) and bool(item) and all(isinstance(v, Mapping) for v in item)


def table(name: str, body: Mapping[str, Any], array: bool = False) -> list[str]:
    """``[name]`` (or ``[[name]]``) with its plain keys, then its sub-tables and table arrays."""
    lines = [f"[[{name}]]" if array else f"[{name}]"]
    nested: list[tuple[str, Any]] = []
    for k, v in body.items():
        if v is None:  # TOML has no null: an unset optional key is left out
            continue
        sub_table = isinstance(v, Mapping) and v and all(isinstance(x, Mapping)
                                                         for x in v.values())
        if sub_table or _is_table_array(v):
            nested.append((k, v))
        else:
            lines.append(f"{key(k)} = {value(v)}")
    for k, v in nested:
        if isinstance(v, Mapping):
            lines += table(f"{name}.{key(k)}", v)
        else:
            for entry in v:
                lines += table(f"{name}.{key(k)}", entry, array=True)
    return lines


def dumps(document: Mapping[str, Any]) -> str:
    """A whole file: top-level tables and arrays of tables (mpsd's config has no bare keys)."""
    lines: list[str] = []
    for name, body in document.items():
        if _is_table_array(body):
            for entry in body:
                lines += [*table(key(name), entry, array=True), ""]
        elif isinstance(body, Mapping):
            lines += [*table(key(name), body), ""]
        else:
            raise TypeError(f"top-level {name!r} must be a table or an array of tables")
    return "\n".join(lines)
