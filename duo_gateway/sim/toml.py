"""A TOML writer for the one thing the demo writes: the DUO config it generated (``duo.toml``).

The standard library reads TOML but does not write it; the config is plain data (tables, arrays of
tables, strings, numbers, booleans, lists of those), so this covers exactly that and refuses the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _key(key: str) -> str:
    return key if key and set(key) <= _BARE_KEY else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _table(data: Mapping[str, Any], path: list[str], out: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if v is not None and not isinstance(v, Mapping)
               and not _is_table_array(v)}
    for key, value in scalars.items():
        out.append(f"{_key(key)} = {_value(value)}")
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.append("")
            out.append("[" + ".".join(_key(p) for p in [*path, key]) + "]")
            _table(value, [*path, key], out)
        elif _is_table_array(value):
            for item in value:
                out.append("")
                out.append("[[" + ".".join(_key(p) for p in [*path, key]) + "]]")
                _table(item, [*path, key], out)


def dumps(data: Mapping[str, Any]) -> str:
    out: list[str] = []
    _table(data, [], out)
    return "\n".join(out).lstrip("\n") + "\n"
