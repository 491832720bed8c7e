"""Pictures of a schedule (``peft-layersched plan --plot timeline.png``); matplotlib is an optional extra.

``pip install "peft-layersched[plot]"`` brings matplotlib; without it, plotting raises a ``ValueError``
saying so (the CLI turns that into exit code 1 and the message).
"""

from __future__ import annotations

import textwrap
from typing import Any, List, Sequence

# Cell states of the timeline, bottom to top in the colour bar.
NO_ADAPTER, WAITING, FROZEN, ACTIVE = 0, 1, 2, 3
_COLOURS = ("#f2f2f2", "#c9d8ea", "#8c8c8c", "#d6432b")
_LABELS = ("no adapter", "not active yet", "frozen (trained before)", "training")


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ValueError(
            f"plotting needs matplotlib, which is not installed ({error}); install it with "
            f"pip install 'peft-layersched[plot]' (or pip install matplotlib)."
        ) from None
    return plt


def timeline_states(rows: Sequence[Any], timeline: List[List[Any]], preallocated: Sequence[Any]) -> List[List[int]]:
    """``states[row][t]`` for each layer in ``rows`` (top row first) and time ``t``."""
    allocated = set(preallocated)
    states = []
    for layer in rows:
        seen = False
        row = []
        for active in timeline:
            if layer not in allocated:
                row.append(NO_ADAPTER)
            elif layer in active:
                row.append(ACTIVE)
                seen = True
            else:
                row.append(FROZEN if seen else WAITING)
        states.append(row)
    return states


def plot_timeline(
    path: str, rows: Sequence[Any], timeline: List[List[Any]], preallocated: Sequence[Any], unit: str, title: str
) -> str:
    """Draw the layers x time grid (``rows`` top to bottom) to ``path`` (PNG, SVG, PDF: by its suffix)."""
    plt = _pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    states = timeline_states(rows, timeline, preallocated)
    width = min(16.0, 3.0 + 0.25 * len(timeline))
    height = min(14.0, 1.6 + 0.28 * len(rows))
    figure, axes = plt.subplots(figsize=(width, height), dpi=110)
    cmap = ListedColormap(_COLOURS)
    axes.imshow(states, aspect="auto", interpolation="nearest", cmap=cmap,
                norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], cmap.N))
    axes.set_yticks(range(len(rows)))
    axes.set_yticklabels([str(layer) for layer in rows], fontsize=8)
    step = max(1, len(timeline) // 20)
    axes.set_xticks(range(0, len(timeline), step))
    axes.set_xlabel(unit)
    axes.set_ylabel("layer")
    axes.set_xticks([x - 0.5 for x in range(len(timeline) + 1)], minor=True)
    axes.set_yticks([y - 0.5 for y in range(len(rows) + 1)], minor=True)
    axes.grid(which="minor", color="white", linewidth=0.6)
    axes.tick_params(which="minor", length=0)
    axes.set_title(textwrap.fill(title, width=int(width * 8)), fontsize=9, loc="left")
    axes.legend(handles=[Patch(color=c, label=label) for c, label in zip(_COLOURS, _LABELS)][::-1],
                loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
