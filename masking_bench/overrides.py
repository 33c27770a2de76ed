"""``--set PATH=VALUE`` overrides: dotted paths into the suite schema, applied to the raw suite before
validation, so an overridden suite is validated (and hashed) exactly like a file that says the same.

``--set train.epochs=2 --set ratios=[0.6,0.9]``: the value is parsed as YAML (numbers, lists, null,
true/false, mappings); a path names one field and replaces it whole (README "What you do with it").
Every problem is a one-line :class:`~masking_bench.errors.BenchError` naming the override.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import BenchError

EXAMPLE = "e.g. --set train.epochs=2"


@dataclass(frozen=True)
class Override:
    path: tuple[str, ...]
    value: Any
    text: str  # how errors name it: "--set train.epochs=2"


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _split_path(dotted: str, shown: str) -> tuple[str, ...]:
    path = tuple(part.strip() for part in dotted.split("."))
    if not dotted.strip() or not all(path):
        raise BenchError(f"{shown}: the path must be dotted field names like train.epochs ({EXAMPLE})")
    return path


def parse_one(item: str, prefix: str = "--set") -> Override:
    """``"train.epochs=2"`` -> Override(("train", "epochs"), 2); the value is parsed as YAML."""
    shown = _shorten(f"{prefix} {item}")
    dotted, sep, text = item.partition("=")
    if not sep:
        raise BenchError(f"{shown}: expected PATH=VALUE ({EXAMPLE}, --set ratios=[0.6,0.9])")
    path = _split_path(dotted, shown)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise BenchError(
            f"{shown}: the value is not valid YAML ({problem}); quote text, e.g. --set \"description='a: b'\""
        ) from None
    except RecursionError:
        raise BenchError(f"{shown}: the value is nested too deeply") from None
    return Override(path, value, shown)


def parse_overrides(overrides: Iterable[str] | Mapping[str, Any] | None, prefix: str = "--set") -> list[Override]:
    """Strings ``"a.b=v"`` (values parsed as YAML), a mapping ``{"a.b": v}`` (values as given), or Overrides."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        out = []
        for dotted, value in overrides.items():
            shown = _shorten(f"{prefix} {dotted}={value!r}")
            if not isinstance(dotted, str):
                raise BenchError(f"{shown}: an override's path must be text like 'train.epochs'")
            out.append(Override(_split_path(dotted, shown), value, shown))
        return out
    out = []
    for item in overrides:
        if isinstance(item, Override):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_one(item, prefix))
        else:
            raise BenchError(f"override {item!r}: give 'PATH=VALUE' text ({EXAMPLE}) or a mapping of paths to values")
    return out


# ------------------------------------------------------------------------------ the schema walk


def _kind(annotation: Any) -> Any:
    """The model class a field holds (Optional stripped), else 'mapping', 'list' or 'value'."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kind(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [_kind(a) for a in typing.get_args(annotation) if a is not type(None)]
        return next((k for k in kinds if not isinstance(k, str)), kinds[0] if kinds else "value")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if annotation is dict or origin is dict:
        return "mapping"
    if annotation in (list, tuple) or origin in (list, tuple):
        return "list"
    return "value"


def check_path(override: Override) -> tuple[str, ...]:
    """The path as it is set: every field exists in the schema. Free-form mappings (``model.overrides``)
    take any key; the rest of a ``grid`` path is one axis name (``grid.train.epochs``)."""
    from .config import Suite

    node: Any = Suite
    path = override.path
    for i, key in enumerate(path):
        where = ".".join(path[:i])
        if node == "mapping":
            return path[:i] + (".".join(path[i:]),) if path[:i] == ("grid",) else path
        if not isinstance(node, type):
            raise BenchError(
                f"{override.text}: '{where}' is a {node}, it has no field '{key}'; set it whole, "
                f"e.g. --set {where}=[...]"
                if node == "list"
                else f"{override.text}: '{where}' is a single value, it has no field '{key}'"
            )
        fields = node.model_fields
        if key not in fields:
            raise BenchError(
                f"{override.text}: unknown field '{key}' in {where or 'the suite'}; accepted: {', '.join(fields)}"
            )
        node = _kind(fields[key].annotation)
    return path


def _materialise(tree: dict, path: tuple[str, ...], override: Override) -> None:
    """Create the mappings on the way to the field (absent blocks, the ``model: preset`` shorthand)."""
    node = tree
    for i, key in enumerate(path[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif key == "model" and i == 0 and isinstance(child, str):
            child = node[key] = {"preset": child}
        if not isinstance(child, dict):
            raise BenchError(
                f"{override.text}: '{'.'.join(path[: i + 1])}' in the suite is not a mapping "
                f"(it is {_shorten(repr(child), 60)}); fix the suite or set the whole block"
            )
        node = child


def apply_overrides(raw: dict, overrides: Any = None) -> tuple[dict, list[Override]]:
    """A copy of ``raw`` with every override set, in order (the last one wins), and the parsed overrides."""
    from .config import _set_dotted

    sets = parse_overrides(overrides)
    if not sets:
        return raw, []
    tree = copy.deepcopy(raw)
    for override in sets:
        path = check_path(override)
        value = copy.deepcopy(override.value)
        if path == ("plugins",) and isinstance(value, list):  # from the command line: relative to here
            value = [str(Path(p).resolve()) if isinstance(p, str) and p else p for p in value]
        if path[0] == "grid" and len(path) == 2:  # the axis name is dotted itself
            _materialise(tree, path, override)
            tree["grid"][path[1]] = value
            continue
        _materialise(tree, path, override)
        _set_dotted(tree, ".".join(path), value, override.text)
    return tree, sets


def blame(err: ValidationError, sets: list[Override], source: str) -> str:
    """What a validation error names as its source: the override that set the failing field, else the file
    (with the overrides listed, when there are any)."""
    if not sets:
        return source
    loc = tuple(str(p) for p in err.errors()[0]["loc"])
    for override in reversed(sets):
        path = override.path
        if loc[: len(path)] == path or (loc and path[: len(loc)] == loc):
            return override.text
    return _shorten(f"{source} with " + ", ".join(o.text for o in sets), 200)


def describe(sets: list[Override]) -> str:
    """`` --set a=1 --set b=2`` for messages (empty without overrides)."""
    return "".join(f" {o.text}" for o in sets)
