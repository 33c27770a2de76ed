"""Point labels that do not overlap, placed deterministically (used by the Pareto plot).

Each label tries offsets around its point, nearest ring first (right, left, then the diagonals,
above, below), and takes the first whose box stays inside the axes and clears every label placed
before it, every point marker and the given obstacles (error bars). When none is free, the offset
with the least overlapping area wins. No randomness and no iteration: the same figure gives the
same placement. Placement happens in display space, so the figure's layout must be final first
(``fig.draw_without_rendering()``); the labels are kept out of the layout so it stays final.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

RINGS = (4.5, 9.0, 15.0, 22.0, 30.0, 40.0, 52.0)  # offset distances, in points
DIRECTIONS = ((1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1), (0, -1))
LEADER_FROM = 2  # labels from this ring on get a thin line to their point
PAD = 1.0  # pixels kept free around every label box


def _box(anchor: np.ndarray, width: float, height: float, ux: int, uy: int) -> tuple[float, float, float, float]:
    """The display box of a ``width`` × ``height`` text aligned away from its point in direction (ux, uy)."""
    x0 = anchor[0] - (width if ux < 0 else width / 2 if ux == 0 else 0.0)
    y0 = anchor[1] - (height if uy < 0 else height / 2 if uy == 0 else 0.0)
    return (x0, y0, x0 + width, y0 + height)


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def _outside(box: Sequence[float], area: Sequence[float]) -> float:
    inside = _overlap(box, area)
    return (box[2] - box[0]) * (box[3] - box[1]) - inside


def place_labels(
    ax,
    x: Sequence[float],
    y: Sequence[float],
    texts: Sequence[str],
    *,
    obstacles: Sequence[tuple[float, float, float, float]] = (),
    marker_radius: float = 3.5,
    **text_kwargs,
) -> list:
    """Annotate point i of (x, y) with ``texts[i]``, in the given order; returns the annotations.

    ``obstacles`` are boxes (x0, y0, x1, y1) in data coordinates that labels avoid; ``marker_radius``
    (points) is the size of the plotted markers, which labels avoid too.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0
    points = ax.transData.transform(np.column_stack([np.asarray(x, float), np.asarray(y, float)]))
    area = ax.get_window_extent(renderer).extents
    radius = marker_radius * px
    blocked = [(px_ - radius, py_ - radius, px_ + radius, py_ + radius) for px_, py_ in points]
    for x0, y0, x1, y1 in obstacles:
        (a0, b0), (a1, b1) = ax.transData.transform([(x0, y0), (x1, y1)])
        blocked.append((min(a0, a1) - PAD, min(b0, b1) - PAD, max(a0, a1) + PAD, max(b0, b1) + PAD))
    annotations = []
    for point, (xi, yi), text in zip(points, zip(x, y, strict=True), texts, strict=True):
        probe = ax.text(0, 0, text, **text_kwargs)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        width, height = extent.width + 2 * PAD, extent.height + 2 * PAD
        best = None
        for ring, distance in enumerate(RINGS):
            for ux, uy in DIRECTIONS:
                norm = math.hypot(ux, uy)
                offset = (ux / norm * distance, uy / norm * distance)
                box = _box(point + np.array(offset) * px, width, height, ux, uy)
                cost = _outside(box, area) + sum(_overlap(box, other) for other in blocked)
                if best is None or cost < best[0]:
                    best = (cost, ring, offset, ux, uy, box)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, ring, offset, ux, uy, box = best
        arrow = {"arrowstyle": "-", "color": "0.6", "lw": 0.4, "shrinkA": 0, "shrinkB": 2.5}
        annotation = ax.annotate(
            text,
            (xi, yi),
            xytext=offset,
            textcoords="offset points",
            ha="left" if ux > 0 else "right" if ux < 0 else "center",
            va="bottom" if uy > 0 else "top" if uy < 0 else "center",
            annotation_clip=False,
            arrowprops=arrow if ring >= LEADER_FROM else None,
            **text_kwargs,
        )
        annotation.set_in_layout(False)
        annotation.set_gid("point-label")
        annotations.append(annotation)
        blocked.append(box)
    return annotations
