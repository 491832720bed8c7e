"""Pictures: a schedule's timeline (``plan --plot``) and the demo's accuracy over training time.

matplotlib comes with the ``plot`` extra. Without it, plotting raises :class:`MatplotlibMissing`.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Cell states of the timeline, bottom to top in the colour bar.
NO_ADAPTER, WAITING, FROZEN, ACTIVE = 0, 1, 2, 3
_COLOURS = ("#f2f2f2", "#c9d8ea", "#8c8c8c", "#d6432b")
_LABELS = ("no adapter", "not active yet", "frozen (trained before)", "training")


_RUN_COLOURS = ("#d6432b", "#4a6fa5", "#5b9a5b", "#8c8c8c")


class MatplotlibMissing(ValueError):
    """Plotting was asked for, and matplotlib cannot be imported."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MatplotlibMissing(
            f"plotting needs matplotlib, which is not installed ({error}); install it with "
            f"pip install 'peft-layersched[plot]' (or pip install matplotlib)."
        ) from None
    return plt


def _image_path(path: str) -> str:
    """The file a plot of ``path`` goes to: ``path`` itself, with ``.png`` added to a name without a suffix.

    savefig alone would add ``rcParams["savefig.format"]`` to such a name without saying so, and the path
    reported to the user would not exist.
    """
    if os.path.splitext(path)[1] in ("", "."):
        return path.rstrip(".") + ".png"
    return path


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
    """Draw the layers x time grid (``rows`` top to bottom) to ``path`` (PNG, SVG, PDF: by its suffix;
    ``.png`` is added to a name without one); return the path of the file written."""
    plt = _pyplot()
    path = _image_path(path)
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


def accuracy_over_time(epochs: Sequence[Dict[str, Any]], start_accuracy: float) -> Tuple[List[float], List[float]]:
    """``(seconds, accuracy)`` points of a run: ``(0, start_accuracy)``, then one per epoch record (its
    ``"seconds"`` of training added up, and its ``"accuracy"`` after it)."""
    seconds, accuracy = [0.0], [start_accuracy]
    for record in epochs:
        seconds.append(seconds[-1] + float(record["seconds"]))
        accuracy.append(float(record["accuracy"]))
    return seconds, accuracy


def plot_accuracy(path: str, runs: Sequence[Dict[str, Any]], start_accuracy: float, title: str) -> str:
    """Draw test accuracy against training time to ``path``: one line per run, a point per epoch; return
    the path of the file written (``.png`` added to a name without a suffix, as in :func:`plot_timeline`).

    Each run is ``{"label": str, "epochs": [{"seconds": s, "accuracy": a}, ...], "notes": [str, ...] or
    None}``; ``notes`` label the run's epoch points (e.g. the layers that trained in that epoch).
    """
    plt = _pyplot()
    path = _image_path(path)
    figure, axes = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for i, run in enumerate(runs):
        seconds, accuracy = accuracy_over_time(run["epochs"], start_accuracy)
        colour = _RUN_COLOURS[i % len(_RUN_COLOURS)]
        axes.plot(seconds, [100 * a for a in accuracy], marker="o", color=colour, linewidth=1.8,
                  label=f"{run['label']}: {100 * accuracy[-1]:.1f}% in {seconds[-1]:.1f} s")
        notes: Optional[List[str]] = run.get("notes")
        for x, y, note in zip(seconds[1:], accuracy[1:], notes or []):
            if not note:
                continue
            axes.annotate(note, (x, 100 * y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7,
                          color=colour, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    axes.set_xlabel("training time (s)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_xlim(left=0)
    axes.set_ylim(top=min(axes.get_ylim()[1], 100.0) + 3)  # room above a run at 100 % for its label
    axes.grid(color="#e0e0e0", linewidth=0.6)
    axes.set_title(textwrap.fill(title, width=80), fontsize=9, loc="left")
    axes.legend(loc="lower right", fontsize=8, frameon=False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
