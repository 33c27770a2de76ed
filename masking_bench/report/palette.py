"""One fixed colour and marker per strategy, the same in every figure of every report.

The built-in strategies come first, in :data:`BUILTIN_ORDER`, then any other label (plugins,
relabelled strategies) in alphabetical order. Colours are the Okabe–Ito palette (Okabe & Ito 2008,
"Color Universal Design"; safe for the common colour-vision deficiencies), the built-in baseline
``random`` in black, extended by three seaborn "colorblind" colours Okabe–Ito does not have. Every
strategy also gets its own marker, so a figure still reads in greyscale; past the palette's length
the (colour, marker) pairs stay distinct.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

# the strategies shipped in strategies/*.py, in the order they take the palette's colours
BUILTIN_ORDER = ("random", "block", "coarse_random", "sbam", "sbam_amr", "mto", "misalign")
OKABE_ITO = (
    "#000000",  # black
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#009E73",  # bluish green
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#F0E442",  # yellow
)
# seaborn "colorblind" colours that are not (near) Okabe–Ito ones: brown, pink, grey
EXTENSION = ("#CA9161", "#FBAFE4", "#949494")
PALETTE = OKABE_ITO + EXTENSION
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*")
FLOOR_COLOR = "#595959"  # the untrained-encoder reference line (dashed, never a strategy)


class Style(NamedTuple):
    color: str
    marker: str


def strategy_order(labels: Iterable[str]) -> list[str]:
    """The labels in palette order: built-in names in :data:`BUILTIN_ORDER`, then the rest A–Z."""
    unique = set(labels)
    builtin = [name for name in BUILTIN_ORDER if name in unique]
    return builtin + sorted(unique - set(BUILTIN_ORDER))


def strategy_styles(labels: Iterable[str]) -> dict[str, Style]:
    """label -> (colour, marker). A built-in name always gets the same slot, whatever else is plotted;
    other labels take the slots after the built-ins, in alphabetical order."""
    others = sorted(set(labels) - set(BUILTIN_ORDER))
    slots = {name: i for i, name in enumerate(BUILTIN_ORDER)}
    slots.update({name: len(BUILTIN_ORDER) + i for i, name in enumerate(others)})
    return {
        label: Style(PALETTE[slots[label] % len(PALETTE)], MARKERS[slots[label] % len(MARKERS)])
        for label in strategy_order(labels)
    }
