"""Typed configuration: dataclasses built from dicts, YAML/TOML/JSON files and ``key=value`` overrides.

Every config in bcu is a dataclass whose defaults come from the paper it implements. This module
turns untrusted text (a config file, ``--set`` flags) into those dataclasses with type coercion and
validation (``dataclasses.asdict`` turns them back into plain dicts for reports). Only
:class:`~bcu.errors.ConfigError` escapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib  # Python >= 3.11 (pyproject's requires-python); a top-level import, never inside an except
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Type, TypeVar, Union

import yaml

from .errors import ConfigError, show
from . import untrusted
from .untrusted import check_tree, read_bounded

INT_MIN, INT_MAX = -(2 ** 63), 2 ** 63 - 1  # every integer option fits in int64
FLOAT_LIMIT = 1e12  # |x| of any number option: larger values overflow float32 arithmetic and mean nothing

C = TypeVar("C")


def check(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or (types.UnionType is not None and isinstance(tp, types.UnionType)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:  # try the next member
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {show(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {show(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of options, got {show(value)}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {show(value)}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true/false, got {show(value)}")
    if tp is int:
        out_int: Optional[int] = None
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            out_int = value
        elif isinstance(value, float) and value.is_integer():
            out_int = int(value)
        elif isinstance(value, str) and len(value) <= 40:  # int() of a 5,000-digit string raises
            try:
                out_int = int(value.strip())
            except ValueError:
                pass
        if out_int is None:
            raise ConfigError(f"{where}: expected an integer, got {show(value)}")
        if not INT_MIN <= out_int <= INT_MAX:
            raise ConfigError(f"{where}: expected an integer in [-2^63, 2^63 - 1], got {show(value)}")
        return out_int
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
                isinstance(value, str) and len(value) > 40):
            raise ConfigError(f"{where}: expected a number, got {show(value)}")
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError):  # float() of a huge integer overflows
            raise ConfigError(f"{where}: expected a number, got {show(value)}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {show(value)}")
        if abs(out) > FLOAT_LIMIT:
            raise ConfigError(f"{where}: expected a number in [-1e12, 1e12], got {show(value)}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                not isinstance(value, int) or value.bit_length() <= 128):
            return str(value)
        raise ConfigError(f"{where}: expected text, got {show(value)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: cannot use {show(value)} as {_type_name(tp)}")


def from_dict(cls: Type[C], data: Optional[Mapping[str, Any]] = None, where: str = "") -> C:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a table of options, got {show(data)}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted({k if isinstance(k, str) else show(k) for k in data} - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown option {prefix}{unknown[0]} (valid: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    return obj


def replace(obj: C, updates: Mapping[str, Any]) -> C:
    """A validated copy of dataclass ``obj`` with nested ``updates`` merged in."""
    merged = deep_merge(dataclasses.asdict(obj), updates)
    return from_dict(type(obj), merged)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any], where: str = "") -> Dict[str, Any]:
    """``base`` with ``override`` merged in, table by table.

    A table and a plain value never replace each other: ``--set optim=3`` over the ``optim`` table
    (or a table over a number) is a ConfigError naming the key, not silently dropped.
    """
    out = dict(base)
    for k, v in override.items():
        name = f"{where}.{k}" if where else f"{k}"
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v, name)
        elif k in out and out[k] is not None and isinstance(v, Mapping) != isinstance(out[k], Mapping):
            bad = out[k] if isinstance(v, Mapping) else v
            raise ConfigError(f"{name}: expected a table of options, got {show(bad)}")
        else:
            out[k] = v
    return out


class _BoundedYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no Python tags) that refuses a document whose aliases expand it past
    :data:`bcu.untrusted.MAX_TREE_NODES` values (a "billion laughs" bomb), or that refers to
    itself, before anything is constructed."""


def _yaml_children(node: Any) -> List[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_yaml_size(root: Any, where: str) -> None:
    """Expanded size (every alias counted with its whole sub-tree) and depth of a composed YAML graph."""
    sizes: Dict[int, int] = {}
    on_path: set = set()
    stack = [(root, False, 1)]
    while stack:
        node, done, depth = stack.pop()
        nid = id(node)
        if done:
            on_path.discard(nid)
            total = 1 + sum(sizes[id(c)] for c in _yaml_children(node))
            if total > untrusted.MAX_TREE_NODES:
                raise ConfigError(f"{where} expands to more than {untrusted.MAX_TREE_NODES} values (YAML aliases count "
                                  f"once per use)")
            sizes[nid] = total
            continue
        if nid in sizes:
            continue
        if nid in on_path:
            raise ConfigError(f"{where} holds a YAML alias that refers to itself")
        if depth > untrusted.MAX_TREE_DEPTH:
            raise ConfigError(f"{where} is nested more than {untrusted.MAX_TREE_DEPTH} levels deep")
        on_path.add(nid)
        stack.append((node, True, depth))
        stack.extend((c, False, depth + 1) for c in _yaml_children(node) if id(c) not in sizes)


def yaml_load(text: str, where: str) -> Any:
    """``yaml.safe_load`` with bounded alias expansion and depth (only ConfigError escapes)."""
    loader = _BoundedYamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be read") from None
    finally:
        loader.dispose()


def load_file(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) config file into a dict.

    At most :data:`bcu.untrusted.MAX_CONFIG_BYTES`, from a regular file; the parsed document is
    bounded in size and depth, and any parser failure is one ConfigError line.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    raw = read_bounded(p, untrusted.MAX_CONFIG_BYTES, "config files", ConfigError)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
    suffix = p.suffix.lower()
    kind = suffix.lstrip(".") or "YAML"
    where = f"config file {str(p)!r}"
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml_load(text, where)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be read") from None
    except Exception as e:  # any parser error is the user's file, not a bug
        raise ConfigError(f"{where} is not valid {kind}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    check_tree(data, where, ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a table of options at the top level")
    return data


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """Turn ``["distill.epochs=30", "reinit.ratios=[0.1, 0.2]"]`` into a nested dict.

    Values are parsed as YAML scalars/lists (so ``true``, ``3``, ``0.5``, ``[1, 2]`` work), with
    the same bounds as a config file.
    """
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml_load(raw, f"override {key}") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
            raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def describe(cls: Type[Any], prefix: str = "") -> List[str]:
    """Lines ``name: type = default  # help`` for ``bcu ... --list`` style listings."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        doc = f.metadata.get("help", "")
        lines.append(f"{prefix}{f.name} = {json.dumps(default)}" + (f"  # {doc}" if doc else ""))
    return lines
