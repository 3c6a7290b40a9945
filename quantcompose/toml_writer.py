"""A small TOML writer for recipes: the standard library reads TOML (``tomllib``) but does not write it.

It writes what a recipe holds and nothing more: strings, booleans, integers,
finite floats, lists of those, tables of those, and arrays of such tables.
``None`` has no TOML form, so keys whose value is ``None`` are left out; a
reader then gets the key's default.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any, where: str) -> str:
    # bool first: it is an int subclass.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} has no TOML form")
        return repr(value)
    if isinstance(value, str):
        # A JSON string literal is a valid TOML basic string (same escapes).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, f"{where}[{i}]") for i, v in enumerate(value) if v is not None) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_key(k)} = {_value(v, f'{where}.{k}')}" for k, v in value.items() if v is not None)
        return "{ " + items + " }" if items else "{}"
    raise ValueError(f"{where}: a {type(value).__name__} has no TOML form")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def dumps(document: Mapping[str, Any]) -> str:
    """``document`` as TOML text: plain keys first, then tables, then arrays of tables."""
    plain = {k: v for k, v in document.items() if v is not None and not isinstance(v, Mapping)
             and not _is_table_array(v)}
    tables = {k: v for k, v in document.items() if isinstance(v, Mapping)}
    arrays = {k: v for k, v in document.items() if _is_table_array(v)}
    lines = [f"{_key(k)} = {_value(v, k)}" for k, v in plain.items()]
    for name, table in tables.items():
        lines += ["", f"[{_key(name)}]"]
        lines += [f"{_key(k)} = {_value(v, f'{name}.{k}')}" for k, v in table.items() if v is not None]
    for name, entries in arrays.items():
        for i, entry in enumerate(entries):
            lines += ["", f"[[{_key(name)}]]"]
            lines += [f"{_key(k)} = {_value(v, f'{name}[{i}].{k}')}" for k, v in entry.items() if v is not None]
    return "\n".join(lines) + "\n"


__all__ = ["dumps"]
