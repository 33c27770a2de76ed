"""Number and table formatting shared by the markdown sections of ``report.md`` (no statistics here)."""

from __future__ import annotations

import math
from typing import Any


def number(value: Any, digits: int = 2, signed: bool = False) -> str:
    """``value`` with ``digits`` decimals (a sign when ``signed``); – when missing or not finite."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def interval(low: Any, high: Any, digits: int = 2) -> str:
    """`` [low, high]``, or nothing when either end is missing."""
    low_text, high_text = number(low, digits), number(high, digits)
    return "" if "–" in (low_text, high_text) else f" [{low_text}, {high_text}]"


def ratio_text(value: Any) -> str:
    return "–" if not isinstance(value, (int, float)) or not math.isfinite(value) else f"{value:g}"


def code_list(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_(no rows)_\n"

    def escape(cell: Any) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
