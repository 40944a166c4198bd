"""One look for every plot (static PNGs, the site, W&B): a distinct colour and marker per method, and
text labels that never overlap.

Colours are Kelly's 22 colours of maximum contrast (Kelly 1965, "Twenty-two colors of maximum
contrast"; white and black left out), so up to 20 methods get 20 different colours; markers cycle
through 8 shapes on a different period, so two methods never share both colour and marker. The
unpruned baseline (``none``) is always a black star. Styles are assigned by sorted method name over
the whole leaderboard, so a method has the same look in every plot of one build.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

KELLY = [  # ordered so that the first 16 are the most distinct from each other
    "#0067A5", "#BE0032", "#008856", "#F38400", "#875692", "#A1CAF1", "#F3C300", "#882D17", "#8DB600", "#E68FAC",
    "#604E97", "#848482", "#2B3D26", "#C2B280", "#B3446C", "#654522", "#F6A600", "#DCD300", "#E25822", "#F99379",
]
#: matplotlib marker -> plotly symbol
MARKERS = [("o", "circle"), ("s", "square"), ("^", "triangle-up"), ("D", "diamond"), ("v", "triangle-down"), ("P", "cross"), ("X", "x"), ("h", "hexagon")]
BASELINE = "none"


@dataclass(frozen=True)
class Style:
    color: str
    marker: str  # matplotlib
    symbol: str  # plotly


def method_styles(methods: Iterable[str]) -> dict[str, Style]:
    """``method -> Style``; distinct (colour, marker) for every method, distinct colours up to 20 methods."""
    out = {}
    others = sorted(m for m in set(methods) if m != BASELINE)
    for i, m in enumerate(others):
        mk, sym = MARKERS[i % len(MARKERS)]
        # past 20 methods the colours repeat with another marker phase (20 and 8 share the factor 4,
        # so shift by one marker per lap to keep (colour, marker) pairs unique)
        if i >= len(KELLY):
            mk, sym = MARKERS[(i + i // len(KELLY)) % len(MARKERS)]
        out[m] = Style(KELLY[i % len(KELLY)], mk, sym)
    out[BASELINE] = Style("#000000", "*", "star")
    return out


def _overlaps(a, b, pad: float = 1.0) -> bool:
    return not (a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0)


#: candidate offsets (points) tried in order for a label, nearest first
_OFFSETS = [(dx * r, dy * r) for r in (5, 10, 16, 24, 34) for dx, dy in ((0.6, 1), (0.6, -1.6), (-1, 1), (-1, -1.6), (1.2, 0), (-1.6, 0), (0, 1.4), (0, -2))]


def place_labels(ax, items: list[tuple[float, float, str]], fontsize: float = 7.5) -> tuple[list, int]:
    """Annotate ``(x, y, text)`` items in data coordinates without overlaps.

    Each label takes the first offset from :data:`_OFFSETS` where its box overlaps no label placed
    before it and stays inside the axes; a label that fits nowhere is left out. Returns the placed
    annotations and the number left out.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    placed, boxes, skipped = [], [], 0
    for x, y, text in items:
        done = False
        for dx, dy in _OFFSETS:
            far = abs(dx) + abs(dy) > 14
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, color="#333333",
                              ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top",
                              arrowprops=dict(arrowstyle="-", color="#999999", lw=0.5) if far else None)
            bb = ann.get_window_extent(renderer)
            inside = bb.x0 >= axbox.x0 and bb.x1 <= axbox.x1 and bb.y0 >= axbox.y0 and bb.y1 <= axbox.y1
            if inside and not any(_overlaps(bb, o) for o in boxes):
                placed.append(ann)
                boxes.append(bb)
                done = True
                break
            ann.remove()
        skipped += not done
    return placed, skipped
