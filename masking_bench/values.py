"""The value rules of the suite schema: safe folder names, seeds, masking ratios, booleans that are
never numbers, plain YAML data and paths without control characters. ``config`` builds its pydantic
models from the annotated types defined here."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

# A suite's name is a folder name (results/runs/<name>/, results/records/<name>/): one path component
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
SAFE_NAME_RULE = "1-100 letters, digits, '_', '.' or '-', starting with a letter or digit"
# Seeds feed torch generators, which take values below 2**64. The largest derived seed is
# step.mask_seed(seed, epoch, step) ≈ seed * 7.9e14 (+ epoch * 1e5 + step), so seed <= 23_293 fits;
# 20_000 leaves room for any epoch/step count (tests/test_config.py checks it against mask_seed).
MAX_SEED = 20_000
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# free-form mappings (strategy params, model overrides, sbatch options, grid values) stay plain data
_PLAIN_MAX_NODES = 10_000
_PLAIN_MAX_DEPTH = 20


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean (true/false)")
    return value


def _seed(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"a seed must be a whole number from 0 to {MAX_SEED}")
    return value


_RATIO_RULE = "a masking ratio must be a number strictly between 0 and 1 (0 hides nothing, 1 hides every token)"


def _ratio_not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(_RATIO_RULE)
    return value


def _ratio(value: float) -> float:
    if not 0.0 < value < 1.0:  # also false for NaN
        raise ValueError(_RATIO_RULE)
    return value


def plain_data(value: Any) -> Any:
    """``value`` if it is plain YAML data: str, int, finite float, bool, None, lists, mappings with string keys."""
    count = 0

    def check(node: Any, where: str, depth: int, open_ids: frozenset) -> None:
        nonlocal count
        count += 1
        if count > _PLAIN_MAX_NODES or depth > _PLAIN_MAX_DEPTH:
            raise ValueError(
                f"too large or too deeply nested (at most {_PLAIN_MAX_NODES} values, {_PLAIN_MAX_DEPTH} levels)"
            )
        if node is None or isinstance(node, (str, bool, int)):
            return
        if isinstance(node, float):
            if not math.isfinite(node):
                raise ValueError(f"{where or 'value'} is {node}: only finite numbers are accepted")
            return
        if isinstance(node, (list, tuple, dict)):
            if id(node) in open_ids:
                raise ValueError(f"{where or 'value'} contains itself (a YAML alias loop)")
            inner = open_ids | {id(node)}
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, item in items:
                if isinstance(node, dict) and not isinstance(key, str):
                    raise ValueError(f"key {key!r} is not a string: mapping keys must be text")
                check(item, f"{where}.{key}" if where else str(key), depth + 1, inner)
            return
        raise ValueError(
            f"{where or 'value'} is a {type(node).__name__}: accepted are numbers, text, true/false, "
            "null, lists and mappings"
        )

    check(value, "", 0, frozenset())
    return value


def _path_text(value: str | None) -> str | None:
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("a path must not contain control characters (NUL, newline, tab, ...)")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]  # finite: every model sets allow_inf_nan=False
Ratio = Annotated[float, Field(allow_inf_nan=True), BeforeValidator(_ratio_not_bool), AfterValidator(_ratio)]
Seed = Annotated[int, BeforeValidator(_seed)]
Plain = Annotated[dict[str, Any], AfterValidator(plain_data)]
PathText = Annotated[str, AfterValidator(_path_text)]


class StrictModel(BaseModel):
    """A schema section: unknown fields and non-finite numbers are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
