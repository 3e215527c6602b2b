"""The look of every plot: one colour code, figures built without pyplot, PNGs written atomically.

Helpful is blue and harmful vermillion (the Okabe-Ito pair, readable with the common colour-vision deficiencies),
random baselines grey. Figures are :class:`matplotlib.figure.Figure` objects, which render with Agg and touch no
pyplot global state, so plotting works headless, on any rank, and never changes the user's backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_fastif.app.plots.inputs import sorted_labels
from lightning_fastif.errors import ArgumentError
from lightning_fastif.io.atomic import PathLike, atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HELPFUL_COLOR = "#0072B2"
"""Colour of helpful points and edges (positive scores)."""
HARMFUL_COLOR = "#D55E00"
"""Colour of harmful points and edges (negative scores)."""
RANDOM_COLOR = "#7F7F7F"
"""Colour of random baselines."""
BEFORE_COLOR = "#C8C8C8"
"""Colour of the "before" bars of a correction."""
UNGROUPED_COLOR = "#9E9E9E"
"""Colour of points without a group."""
GROUP_PALETTE = (
    "#009E73",
    "#CC79A7",
    "#E6C229",
    "#8C564B",
    "#56B4E9",
    "#9467BD",
    "#7F7F7F",
    "#BCBD22",
    "#17BECF",
    "#2F4F4F",
    "#98DF8A",
    "#C5B0D5",
    "#F7B6D2",
)
"""Group colours that stay apart from the helpful blue and harmful vermillion of the edges."""
KIND_COLORS = {"helpful": HELPFUL_COLOR, "harmful": HARMFUL_COLOR, "random": RANDOM_COLOR}
"""Colour of each kind of selection, by name."""


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A constrained-layout figure of ``figsize`` inches.

    Raises:
        ImportError: if matplotlib is not installed, naming the install command.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "lightning_fastif.app.plots needs matplotlib to draw plots: pip install matplotlib "
            "(or pip install 'lightning-fastif[app]')"
        ) from err
    return Figure(figsize=figsize, layout="constrained")


def png_path(path: PathLike) -> Path:
    """``path`` as a :class:`~pathlib.Path`, checked to name a ``.png`` file.

    Raises:
        ArgumentError: if the name does not end in ``.png``.
    """
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ArgumentError(f"path: expected a file name ending in .png, got {str(path)!r}")
    return p


def save_png(fig: Figure, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (a temporary file, then a rename), readable by all."""
    # The temporary name ends in .tmp, so the format is given explicitly.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
        # mkstemp creates the file private (0600); a report is meant to be read by others (a web server, a team).
        tmp.chmod(0o644)
    return path


def group_colors(labels: Sequence[Any]) -> dict[Any, str]:
    """One colour per group label (the palette, or viridis for many groups); ``None`` gets the ungrouped grey."""
    groups = [g for g in sorted_labels(labels) if g is not None]
    if len(groups) <= len(GROUP_PALETTE):
        colors = dict(zip(groups, GROUP_PALETTE))
    else:
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        cmap = colormaps["viridis"]
        colors = {g: to_hex(cmap(i / max(1, len(groups) - 1))) for i, g in enumerate(groups)}
    colors[None] = UNGROUPED_COLOR
    return colors


def legend_patch(color: str, label: str) -> Any:
    """A filled square for a legend."""
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor="#333333", label=label)


def format_score(score: float) -> str:
    """An influence score with its sign and 3 significant digits: ``+0.042``."""
    return f"{score:+.3g}"


def count_label(n: int, noun: str) -> str:
    """``"1 edge"``, ``"3 edges"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
