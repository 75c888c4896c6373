"""Typed dataclass fields from YAML files and the command line: a value parsed to its field's type, the one-line
docstring under each field, every dotted key of a config, and the ``--help`` text built from them.

Generic: nothing here knows tether's sections (:mod:`tether.config` holds them, with the aliases and checks).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tether.errors import TetherError


def is_dataclass_type(tp: Any) -> bool:
    """Whether a field's type is a config section (a dataclass) rather than a value."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_types(cls: type) -> dict[str, Any]:
    """Each field's type, with the annotations' strings resolved."""
    return typing.get_type_hints(cls)


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring written under each field of a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def parse_scalar(tp: Any, raw: Any, key: str) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return parse_scalar(inner, raw, key)
    if origin is Literal:
        if raw not in args:
            raise TetherError(f"{key}: {raw!r} is not one of {', '.join(map(str, args))}")
        return raw
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "no", "0", "off"):
            return False
        raise TetherError(f"{key}: expected true or false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise TetherError(f"{key}: expected an integer, got {raw!r}")
        try:
            value = float(raw) if isinstance(raw, str) else raw
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise TetherError(f"{key}: expected an integer, got {raw!r}") from None
    if tp is float:
        if isinstance(raw, bool):
            raise TetherError(f"{key}: expected a number, got {raw!r}")
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise TetherError(f"{key}: expected a number, got {raw!r}") from None
    if tp is str:
        if isinstance(raw, (dict, list)):
            raise TetherError(f"{key}: expected a string, got {raw!r}")
        return "" if raw is None else str(raw)
    raise TypeError(f"unsupported config type {tp} for {key}")


def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config, in declaration order."""
    keys = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            keys += flat_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a mapping; errors name the file (and line for syntax errors)."""
    path = Path(path)
    if not path.is_file():
        raise TetherError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TetherError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TetherError(f"{path}: the top level must be a mapping of config sections")
    return data


def override_value(raw: str):
    """An override's value as YAML reads it (``0.1``, ``true``, ``null``, ``[a, b]``); text that is not valid YAML
    (``,`` or ``a: b: c``) stays the string it is, and the field's type check decides."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def to_dict(config: Any) -> dict:
    """The config as a nested plain dict (for YAML/JSON)."""
    return dataclasses.asdict(config)


def help_text(config: Any, sections: list[str] | None = None) -> str:
    """One line per field: dotted key, default, and its docstring."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            if sections is not None and f.name not in sections:
                continue
            docs = field_docs(type(value))
            lines.append(f"{f.name}:")
            for sub in dataclasses.fields(value):
                default = getattr(value, sub.name)
                lines.append(f"  {f'{f.name}.{sub.name}={default}':<34} {docs.get(sub.name, '')}")
        else:
            lines.append(f"{f'{f.name}={value}':<36} {field_docs(type(config)).get(f.name, '')}")
    return "\n".join(lines)
