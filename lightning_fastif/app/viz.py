"""Plots and text explanations of influence results. **Positive score = helpful** (it lowered the test loss).

Every plot function takes plain tensors, arrays or lists (no Lightning object), writes one PNG atomically (a
temporary file in the same directory, then ``os.replace``) and returns its path. One colour code throughout:
helpful in blue, harmful in vermillion (the Okabe-Ito pair, readable with the common colour-vision deficiencies),
random baselines in grey.

* :func:`plot_influence_graph`: FastIF's visualisation, a bipartite graph from training points to test points.
* :func:`plot_examples_grid`, :func:`plot_explanation`: examples shown as what they are (images).
* :func:`plot_accuracy_bars`, :func:`plot_accuracy_history`: accuracy before and after error correction.
* :func:`plot_self_influence`, :func:`mislabel_detection`: finding flipped labels by self-influence.
* :func:`plot_recall_curve`: recall of the full-influence top points among the k nearest neighbours.
* :func:`plot_sweep`: a quantity against a setting (damping, LiSSA depth ...).
* :func:`format_text_explanation`, :func:`text_explanation_blocks`: a text example and its helpful and harmful
  training examples, as Markdown or as :mod:`lightning_fastif.app.report` blocks.

matplotlib is an optional dependency (``pip install matplotlib``, part of the ``app`` extra). It is imported inside
each plot function, and figures are built on :class:`matplotlib.figure.Figure`, which renders with Agg and touches
no pyplot global state: plotting works headless, on any rank, and never changes the user's backend.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from lightning_fastif.app.report import Block, Heading, Paragraph, Quote, Table, render_markdown
from lightning_fastif.io.atomic import PathLike, atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "HARMFUL_COLOR",
    "HELPFUL_COLOR",
    "RANDOM_COLOR",
    "format_text_explanation",
    "mislabel_detection",
    "plot_accuracy_bars",
    "plot_accuracy_history",
    "plot_examples_grid",
    "plot_explanation",
    "plot_influence_graph",
    "plot_recall_curve",
    "plot_self_influence",
    "plot_sweep",
    "shorten_text",
    "text_explanation_blocks",
]

HELPFUL_COLOR = "#0072B2"
"""Colour of helpful points and edges (positive scores)."""
HARMFUL_COLOR = "#D55E00"
"""Colour of harmful points and edges (negative scores)."""
RANDOM_COLOR = "#7F7F7F"
"""Colour of random baselines."""
BEFORE_COLOR = "#C8C8C8"
_UNGROUPED_COLOR = "#9E9E9E"
# Group colours that stay apart from the helpful blue and harmful vermillion of the edges.
_GROUP_PALETTE = (
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
_KIND_COLORS = {"helpful": HELPFUL_COLOR, "harmful": HARMFUL_COLOR, "random": RANDOM_COLOR}
_MAX_LEGEND_GROUPS = 16

# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------


def _figure(figsize: tuple[float, float]) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "lightning_fastif.app.viz needs matplotlib to draw plots: pip install matplotlib "
            "(or pip install 'lightning-fastif[app]')"
        ) from err
    return Figure(figsize=figsize, layout="constrained")


def _png_path(path: PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ValueError(f"path: expected a file name ending in .png, got {str(path)!r}")
    return p


def _save(fig: Figure, path: Path, dpi: int = 120) -> Path:
    # The temporary name ends in .tmp, so the format is given explicitly.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
        # mkstemp creates the file private (0600); a report is meant to be read by others (a web server, a team).
        tmp.chmod(0o644)
    return path


def _tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{name}: expected a tensor, a numpy array or a (nested) list of numbers, got {type(value).__name__} "
            f"({err})"
        ) from err


def _vector(value: Any, name: str, length: int | None = None) -> Tensor:
    """A 1-D float64 tensor (a scalar counts as one value) of the expected length."""
    t = _tensor(value, name)
    if t.dim() > 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {tuple(t.shape)}")
    t = t.reshape(-1).double()
    if length is not None and t.numel() != length:
        raise ValueError(f"{name}: expected {length} values, got {t.numel()}")
    return t


def _labels(value: Any, name: str, length: int) -> list[Any]:
    """Group labels as Python values (ints from tensors, strings kept), one per entry."""
    if isinstance(value, Tensor):
        labels = value.detach().cpu().reshape(-1).tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        labels = list(value.tolist())
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        labels = list(value)
    else:
        raise TypeError(f"{name}: expected a sequence or tensor of labels, got {type(value).__name__}")
    if len(labels) != length:
        raise ValueError(f"{name}: expected {length} labels (one per test point), got {len(labels)}")
    return labels


def _sorted_labels(labels: Sequence[Any]) -> list[Any]:
    unique = list(dict.fromkeys(labels))
    try:
        return sorted(unique)
    except TypeError:  # mixed types, e.g. ints and None
        return sorted(unique, key=str)


def _group_colors(labels: Sequence[Any]) -> dict[Any, str]:
    groups = [g for g in _sorted_labels(labels) if g is not None]
    if len(groups) <= len(_GROUP_PALETTE):
        colors = dict(zip(groups, _GROUP_PALETTE))
    else:
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        cmap = colormaps["viridis"]
        colors = {g: to_hex(cmap(i / max(1, len(groups) - 1))) for i, g in enumerate(groups)}
    colors[None] = _UNGROUPED_COLOR
    return colors


def _fmt_score(score: float) -> str:
    return f"{score:+.3g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# FastIF's influence graph
# ---------------------------------------------------------------------------------------------------------------------


def _graph_edges(candidates: Tensor, scores: Tensor, top_n: int, normalize: str) -> list[tuple[int, int, float, float]]:
    """``(test row, training index, score, weight in (0, 1])`` for each row's top helpful and top harmful points."""
    edges: list[tuple[int, int, float, float]] = []
    for t in range(candidates.shape[0]):
        # NaN scores (a failed row) and negative indices (padding) are not edges; a zero score is neither kind.
        keep = torch.isfinite(scores[t]) & (candidates[t] >= 0)
        c, s = candidates[t][keep], scores[t][keep]
        row: list[tuple[int, int, float]] = []
        for sign in (1.0, -1.0):
            mask = s * sign > 0
            order = torch.sort(s[mask] * sign, descending=True, stable=True).indices[:top_n]
            row += [(t, int(i), float(v)) for i, v in zip(c[mask][order].tolist(), s[mask][order].tolist())]
        edges += [(t, j, v, 0.0) for t, j, v in row]
    if not edges:
        return []
    magnitude = torch.tensor([abs(e[2]) for e in edges], dtype=torch.float64)
    if normalize == "global":
        weight = magnitude / magnitude.max()
    else:
        rows = torch.tensor([e[0] for e in edges])
        row_max = torch.zeros(candidates.shape[0], dtype=torch.float64).scatter_reduce(0, rows, magnitude, "amax")
        weight = magnitude / row_max[rows]
    return [(t, j, v, float(w)) for (t, j, v, _), w in zip(edges, weight.tolist())]


def _circle_layout(groups: list[Any], test_indices: list[int]) -> tuple[Tensor, dict[Any, float]]:
    """Test points on the unit circle, each group on its own arc; returns ``[T, 2]`` positions and group angles."""
    order_groups = _sorted_labels(groups)
    num = len(groups)
    gap = max(1, round(0.06 * num)) if len(order_groups) > 1 else 0
    slots = num + gap * len(order_groups)
    angle = torch.zeros(num, dtype=torch.float64)
    group_angle: dict[Any, float] = {}
    slot = 0
    for g in order_groups:
        members = sorted((i for i in range(num) if groups[i] == g), key=lambda i: test_indices[i])
        start = slot
        for i in members:
            angle[i] = math.pi / 2 - 2 * math.pi * slot / slots
            slot += 1
        group_angle[g] = math.pi / 2 - 2 * math.pi * (start + (len(members) - 1) / 2) / slots
        slot += gap
    return torch.stack([angle.cos(), angle.sin()], dim=1), group_angle


def _train_layout(edges: list[tuple[int, int, float, float]], test_xy: Tensor) -> tuple[list[int], Tensor, Tensor]:
    """Each training point at the |influence|-weighted mean of its test points, drawn inwards and jittered.

    Returns the training indices, their ``[M, 2]`` positions and their total edge weight.
    """
    nodes = sorted({j for _, j, _, _ in edges})
    slot = {j: k for k, j in enumerate(nodes)}
    total = torch.zeros(len(nodes), 2, dtype=torch.float64)
    weight = torch.zeros(len(nodes), dtype=torch.float64)
    for t, j, _, w in edges:
        total[slot[j]] += w * test_xy[t]
        weight[slot[j]] += w
    if test_xy.shape[0] == 1:
        return nodes, _star_layout(edges, nodes), weight
    mean = total / weight.unsqueeze(1)
    radius = mean.norm(dim=1)
    angle = torch.atan2(mean[:, 1], mean[:, 0])
    # A fixed seed keeps the picture the same from run to run; the jitter separates points that share test points.
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(len(nodes), generator=gen, dtype=torch.float64)
    v = torch.rand(len(nodes), generator=gen, dtype=torch.float64)
    angle = torch.where(radius < 1e-9, 2 * math.pi * v, angle + 0.35 * (v - 0.5))
    # Inside the circle, so edges stay visible between the nodes and the test points they point to.
    radius = radius * (0.4 + 0.45 * u)
    return nodes, torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1), weight


def _star_layout(edges: list[tuple[int, int, float, float]], nodes: list[int]) -> Tensor:
    """One test point sits at the centre: helpful points fan over the upper half, harmful over the lower half,
    ordered by score, the strongest closest."""
    slot = {j: k for k, j in enumerate(nodes)}
    xy = torch.zeros(len(nodes), 2, dtype=torch.float64)
    for sign, (lo, hi) in ((1.0, (0.1, 0.9)), (-1.0, (-0.1, -0.9))):
        kind = sorted((e for e in edges if e[2] * sign > 0), key=lambda e: -e[3])
        for rank, (_, j, _, w) in enumerate(kind):
            a = math.pi * (lo + (hi - lo) * (rank + 0.5) / len(kind))
            r = 1.0 - 0.4 * w
            xy[slot[j]] = torch.tensor([r * math.cos(a), r * math.sin(a)], dtype=torch.float64)
    return xy


def _train_group(train_groups: Any, j: int) -> Any:
    if train_groups is None:
        return None
    if isinstance(train_groups, Mapping):
        return train_groups.get(j)
    if j >= len(train_groups):
        raise ValueError(
            f"train_groups: has {len(train_groups)} labels, but candidate_indices holds training index {j}; "
            "give one label per training point, or a dict training index -> label"
        )
    return train_groups[j]


def _normalize_train_groups(train_groups: Any) -> Any:
    if train_groups is None:
        return None
    if isinstance(train_groups, Mapping):
        return {int(k.item() if isinstance(k, Tensor) else k): v for k, v in train_groups.items()}
    if isinstance(train_groups, Tensor):
        return train_groups.detach().cpu().reshape(-1).tolist()
    if hasattr(train_groups, "tolist") and not isinstance(train_groups, (str, bytes)):
        return list(train_groups.tolist())
    if isinstance(train_groups, Sequence) and not isinstance(train_groups, (str, bytes)):
        return list(train_groups)
    raise TypeError(
        f"train_groups: expected a dict training index -> label or a sequence/tensor of labels, got "
        f"{type(train_groups).__name__}"
    )


def plot_influence_graph(
    test_indices: Any,
    candidate_indices: Any,
    scores: Any,
    path: PathLike,
    *,
    test_groups: Any = None,
    train_groups: Any = None,
    top_n: int = 5,
    normalize: Literal["per_test", "global"] = "per_test",
    title: str = "Training points and the test points they influence",
) -> Path:
    """FastIF's visualisation: a bipartite graph from training points to the test points they influence.

    Test points sit on a circle, one arc per group (e.g. their true class). For each test point, its ``top_n``
    most helpful and ``top_n`` most harmful candidates are drawn as training points placed at the
    |influence|-weighted mean of the test points they influence (pulled inside the circle), with an edge to each:
    blue for helpful (positive score), vermillion for harmful, width and opacity growing with |score|.
    Training points are coloured by their group.

    Args:
        test_indices: ``[T]`` dataset indices of the test points (order within an arc; labels for small ``T``).
        candidate_indices: ``[T, K]`` training indices of each test point's candidates (``[K]`` for one test
            point); negative entries are padding and skipped.
        scores: ``[T, K]`` influence scores, same shape; NaN entries are skipped.
        path: the ``.png`` file to write.
        test_groups: ``[T]`` group of each test point (e.g. its true class), or ``None`` for one group.
        train_groups: group (e.g. label) of each training point: a dict training index -> label, or a sequence or
            tensor indexed by training index.
        top_n: helpful and harmful edges per test point (fewer when there are fewer candidates of a sign).
        normalize: ``"per_test"`` scales widths by each test point's largest |score| (scores of different test
            points differ by orders of magnitude), ``"global"`` by the largest |score| overall.
        title: the figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: if shapes disagree (the message names the argument), ``top_n`` is not positive, ``normalize``
            is unknown or ``path`` does not end in ``.png``.
        ImportError: if matplotlib is not installed.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "graph.png"
        >>> plot_influence_graph([10, 11], [[0, 1, 2], [1, 2, 3]], [[0.5, -0.2, 0.1], [0.3, 0.4, -0.9]], out,
        ...                      test_groups=[0, 1], train_groups=[0, 1, 1, 0]).name
        'graph.png'
    """
    path = _png_path(path)
    cand, sc = _tensor(candidate_indices, "candidate_indices"), _tensor(scores, "scores")
    if cand.dim() == 1:
        cand = cand.unsqueeze(0)
    if sc.dim() == 1:
        sc = sc.unsqueeze(0)
    if cand.dim() != 2:
        raise ValueError(f"candidate_indices: expected a [T, K] tensor, got shape {tuple(cand.shape)}")
    if cand.is_floating_point() and not torch.equal(cand, cand.round()):
        raise ValueError("candidate_indices: expected integer training indices, got non-integer values")
    if sc.shape != cand.shape:
        raise ValueError(f"scores: expected the shape of candidate_indices {tuple(cand.shape)}, got {tuple(sc.shape)}")
    tests = _tensor(test_indices, "test_indices").reshape(-1).long().tolist()
    num_test = cand.shape[0]
    if len(tests) != num_test:
        raise ValueError(
            f"test_indices: expected {num_test} entries (one per row of candidate_indices), got {len(tests)}"
        )
    if num_test == 0:
        raise ValueError("test_indices: empty; there is nothing to plot")
    top_n = _positive_int(top_n, "top_n")
    if normalize not in ("per_test", "global"):
        raise ValueError(f"normalize: expected 'per_test' or 'global', got {normalize!r}")
    groups = _labels(test_groups, "test_groups", num_test) if test_groups is not None else [None] * num_test
    train_labels = _normalize_train_groups(train_groups)

    edges = _graph_edges(cand.long(), sc.double(), top_n, normalize)
    test_xy, group_angle = _circle_layout(groups, tests)
    if num_test == 1:
        test_xy = torch.zeros(1, 2, dtype=torch.float64)
        group_angle = dict.fromkeys(group_angle, math.pi / 2)
    nodes, train_xy, node_weight = _train_layout(edges, test_xy) if edges else ([], torch.zeros(0, 2), torch.zeros(0))
    node_groups = [_train_group(train_labels, j) for j in nodes]
    colors = _group_colors(groups + node_groups)

    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D

    fig = _figure((10.5, 8.0))
    ax = fig.add_subplot()
    slot = {j: k for k, j in enumerate(nodes)}
    # Weak edges first, so the strong ones are drawn on top.
    ordered = sorted(edges, key=lambda e: e[3])
    segments = [[train_xy[slot[j]].tolist(), test_xy[t].tolist()] for t, j, _, _ in ordered]
    # Hundreds of full-strength edges hide each other: thinner and fainter as the graph grows.
    density = min(1.0, math.sqrt(120 / max(1, len(edges))))
    edge_colors = [
        to_rgba(HELPFUL_COLOR if s > 0 else HARMFUL_COLOR, 0.12 + 0.68 * w * density) for _, _, s, w in ordered
    ]
    widths = [0.25 + 2.75 * w * density for _, _, _, w in ordered]
    if segments:
        ax.add_collection(LineCollection(segments, colors=edge_colors, linewidths=widths, zorder=1))
    if nodes:
        sizes = (10 + 40 * node_weight / node_weight.max()).tolist()
        ax.scatter(
            train_xy[:, 0].tolist(),
            train_xy[:, 1].tolist(),
            s=sizes,
            c=[colors[g] for g in node_groups],
            edgecolors="white",
            linewidths=0.4,
            zorder=2,
        )
    ax.scatter(
        test_xy[:, 0].tolist(),
        test_xy[:, 1].tolist(),
        s=90 if num_test <= 50 else 45,
        c=[colors[g] for g in groups],
        edgecolors="black",
        linewidths=1.2,
        zorder=3,
    )
    if num_test == 1:
        label = f"test {tests[0]}" + (f"\ngroup {groups[0]}" if test_groups is not None else "")
        ax.text(
            -0.06,
            0,
            label,
            fontsize=9,
            ha="right",
            va="center",
            color="#333333",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5},
            zorder=4,
        )
    elif num_test <= 24:
        for (x, y), index in zip(test_xy.tolist(), tests):
            ax.text(1.08 * x, 1.08 * y, str(index), fontsize=7, ha="center", va="center", color="#333333")
    if test_groups is not None and num_test > 1:
        for g, a in group_angle.items():
            ax.text(
                1.24 * math.cos(a),
                1.24 * math.sin(a),
                str(g),
                fontsize=11,
                fontweight="bold",
                ha="center",
                va="center",
                color=colors[g],
            )
    if not edges:
        ax.text(0, 0, "no helpful or harmful candidates\n(all scores zero or missing)", ha="center", va="center")

    handles = [
        Line2D([0], [0], color=HELPFUL_COLOR, lw=2.5, label="helpful (score > 0)"),
        Line2D([0], [0], color=HARMFUL_COLOR, lw=2.5, label="harmful (score < 0)"),
        Line2D([0], [0], marker="o", ls="", mfc="white", mec="black", mew=1.2, ms=9, label="test point"),
        Line2D([0], [0], marker="o", ls="", mfc=_UNGROUPED_COLOR, mec="white", ms=6, label="training point"),
    ]
    shown = [g for g in _sorted_labels(groups + node_groups) if g is not None]
    if 0 < len(shown) <= _MAX_LEGEND_GROUPS:
        handles += [
            Line2D([0], [0], marker="o", ls="", mfc=colors[g], mec=colors[g], ms=7, label=str(g)) for g in shown
        ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
        fontsize=9,
        title="edges, nodes, groups" if shown else "edges and nodes",
    )
    limit = 1.4 if num_test > 1 else 1.1
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.suptitle(title, fontsize=13)
    ax.set_title(
        f"{_count(num_test, 'test point')}, {_count(len(nodes), 'training point')}, {_count(len(edges), 'edge')} "
        f"(top {top_n} helpful and harmful each; width ~ |score|, {normalize.replace('_', ' ')} scale)",
        fontsize=9,
    )
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Examples as images
# ---------------------------------------------------------------------------------------------------------------------


def _images(value: Any, name: str) -> Tensor:
    """``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (colour) float images from the accepted layouts."""
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float)):
        parts = [_tensor(v, f"{name}[{i}]") for i, v in enumerate(value)]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"{name}: images of different shapes {sorted(shapes)}; expected one shape")
        t = torch.stack(parts)
    else:
        t = _tensor(value, name)
    t = t.float()
    accepted = "[N, H, W], [N, 1, H, W], [N, 3, H, W], [N, H, W, 3], or [N, D] with D a square (flat images)"
    if t.dim() == 2:
        side = math.isqrt(t.shape[1])
        if side * side != t.shape[1] or side == 0:
            raise ValueError(
                f"{name}: got shape {tuple(t.shape)}, whose rows are not square images; expected {accepted}"
            )
        return t.reshape(t.shape[0], side, side)
    if t.dim() == 3:
        return t
    if t.dim() == 4 and t.shape[1] in (1, 3):
        return t[:, 0] if t.shape[1] == 1 else t.permute(0, 2, 3, 1)
    if t.dim() == 4 and t.shape[3] in (1, 3):
        return t[..., 0] if t.shape[3] == 1 else t
    raise ValueError(f"{name}: got shape {tuple(t.shape)}; expected {accepted}")


def _single_image(value: Any, name: str) -> Tensor:
    t = _tensor(value, name)
    if t.dim() not in (1, 2, 3):
        raise ValueError(f"{name}: expected one image ([H, W], [C, H, W] or a flat [D]), got shape {tuple(t.shape)}")
    return _images(t.unsqueeze(0), name)[0]


def _show(ax: Axes, image: Tensor, cmap: str, vmin: float, vmax: float) -> None:
    if image.dim() == 3:  # colour: imshow wants [0, 1]
        ax.imshow(((image - vmin) / max(vmax - vmin, 1e-12)).clamp(0, 1).numpy())
    else:
        ax.imshow(image.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _value_range(*stacks: Tensor) -> tuple[float, float]:
    # One range for the whole figure, so the same intensity means the same value in every image.
    values = torch.cat([s.reshape(-1) for s in stacks if s.numel()])
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def plot_examples_grid(
    images: Any,
    path: PathLike,
    *,
    titles: Sequence[str] | None = None,
    rows: int | None = None,
    cmap: str = "gray",
    title: str | None = None,
) -> Path:
    """Show images in a grid (e.g. the top helpful and harmful training examples), one shared intensity scale.

    Args:
        images: ``[N, H, W]``, ``[N, 1, H, W]``, ``[N, 3, H, W]``, ``[N, H, W, 3]``, ``[N, D]`` with ``D`` a
            square (flat images such as scikit-learn's 8x8 digits), or a list of same-shaped images.
        path: the ``.png`` file to write.
        titles: one title per image (e.g. ``"#12 label 3\\n+0.042"``).
        rows: number of rows (default: up to 10 columns).
        cmap: colour map of grey images.
        title: optional figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: for an unsupported image shape, an empty set, ``titles`` of another length or a bad ``rows``.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "grid.png"
        >>> plot_examples_grid(torch.rand(6, 64), out, titles=[str(i) for i in range(6)], rows=2).name
        'grid.png'
    """
    path = _png_path(path)
    stack = _images(images, "images")
    n = stack.shape[0]
    if n == 0:
        raise ValueError("images: empty; expected at least one image")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles: expected {n} titles (one per image), got {len(titles)}")
    if rows is None:
        cols = min(n, 10)
        rows = math.ceil(n / cols)
    else:
        rows = _positive_int(rows, "rows")
        cols = math.ceil(n / rows)
    vmin, vmax = _value_range(stack)
    fig = _figure((1.35 * cols + 0.3, 1.55 * rows + (0.5 if title else 0.15)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        _show(ax, stack[k], cmap, vmin, vmax)
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_explanation(
    test_image: Any,
    test_title: str,
    helpful_images: Any,
    helpful_scores: Any,
    harmful_images: Any,
    harmful_scores: Any,
    path: PathLike,
    *,
    helpful_titles: Sequence[str] | None = None,
    harmful_titles: Sequence[str] | None = None,
    cmap: str = "gray",
    title: str | None = None,
) -> Path:
    """One test image and its most helpful and most harmful training images: one row per kind, the test first.

    Each training image is framed in its kind's colour (helpful blue, harmful vermillion) and titled with its
    score (and its entry of ``helpful_titles``/``harmful_titles``, e.g. its index and label, when given).

    Args:
        test_image: ``[H, W]``, ``[C, H, W]`` or a flat square ``[D]`` (e.g. an 8x8 digit as 64 values).
        test_title: title of the test image (e.g. ``"test #5: label 3, predicted 8"``).
        helpful_images: the helpful training images (any layout of :func:`plot_examples_grid`; may be empty).
        helpful_scores: their scores (positive), one per image.
        harmful_images: the harmful training images (may be empty).
        harmful_scores: their scores (negative), one per image.
        path: the ``.png`` file to write.
        helpful_titles: optional first title line per helpful image.
        harmful_titles: optional first title line per harmful image.
        cmap: colour map of grey images.
        title: optional figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: if images and scores (or titles) differ in number, or image shapes differ from the test image.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "explain.png"
        >>> plot_explanation(torch.rand(64), "test #0", torch.rand(3, 8, 8), [0.3, 0.2, 0.1],
        ...                  torch.rand(2, 8, 8), [-0.5, -0.1], out).name
        'explain.png'
    """
    path = _png_path(path)
    test = _single_image(test_image, "test_image")

    def kind(images: Any, scores: Any, titles: Sequence[str] | None, name: str) -> tuple[Tensor, list[str]]:
        empty = images is None or (hasattr(images, "__len__") and len(images) == 0)
        stack = torch.zeros(0, *test.shape) if empty else _images(images, f"{name}_images")
        values = _vector([] if scores is None else scores, f"{name}_scores", stack.shape[0])
        if stack.shape[1:] != test.shape and stack.shape[0]:
            raise ValueError(
                f"{name}_images: image shape {tuple(stack.shape[1:])} differs from test_image's {tuple(test.shape)}"
            )
        if titles is not None and len(titles) != stack.shape[0]:
            raise ValueError(f"{name}_titles: expected {stack.shape[0]} titles (one per image), got {len(titles)}")
        labels = [(f"{titles[i]}\n" if titles is not None else "") + _fmt_score(float(v)) for i, v in enumerate(values)]
        return stack, labels

    helpful, helpful_labels = kind(helpful_images, helpful_scores, helpful_titles, "helpful")
    harmful, harmful_labels = kind(harmful_images, harmful_scores, harmful_titles, "harmful")
    cols = 1 + max(helpful.shape[0], harmful.shape[0], 1)
    vmin, vmax = _value_range(test, helpful, harmful)
    extra = 0.35 if (helpful_titles or harmful_titles) else 0.0
    fig = _figure((1.45 * cols + 0.5, 2 * (1.75 + extra) + (0.45 if title else 0.1)))
    axes = fig.subplots(2, cols, squeeze=False)
    rows = (("helpful", helpful, helpful_labels, HELPFUL_COLOR), ("harmful", harmful, harmful_labels, HARMFUL_COLOR))
    for r, (name, stack, labels, color) in enumerate(rows):
        _show(axes[r, 0], test, cmap, vmin, vmax)
        axes[r, 0].set_title(test_title, fontsize=8, fontweight="bold")
        axes[r, 0].set_ylabel(f"most {name}", fontsize=10, color=color, fontweight="bold")
        for c in range(1, cols):
            ax = axes[r, c]
            if c - 1 >= stack.shape[0]:
                ax.axis("off")
                if c == 1:
                    ax.text(0.5, 0.5, f"no {name}\ncandidates", ha="center", va="center", fontsize=8, color=color)
                continue
            _show(ax, stack[c - 1], cmap, vmin, vmax)
            ax.set_title(labels[c - 1], fontsize=8, color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Error correction
# ---------------------------------------------------------------------------------------------------------------------


def _number_format(values: Tensor) -> str:
    finite = values[torch.isfinite(values)]
    return ".3f" if finite.numel() == 0 or float(finite.abs().max()) <= 1.0 else ".1f"


def plot_accuracy_bars(
    labels: Sequence[str],
    before: Any,
    after: Any,
    path: PathLike,
    *,
    errors: Any = None,
    errors_before: Any = None,
    title: str = "Accuracy before and after correction",
    ylabel: str = "accuracy",
) -> Path:
    """Grouped bars: accuracy before and after a correction, per setting (e.g. ``helpful``/``harmful``/``random``).

    The y axis is zoomed on the values (corrections move accuracy by a few points), and every bar carries its
    value; each pair carries the change ``Δ``. Bars of the settings named ``helpful``, ``harmful`` and
    ``random`` take their kind's colour.

    Args:
        labels: one name per setting.
        before: accuracy before each correction (one value per label, or one value shared by all).
        after: accuracy after each correction, one per label.
        path: the ``.png`` file to write.
        errors: optional spread (e.g. the standard deviation over seeds) of ``after``, drawn as ± bars.
        errors_before: optional spread of ``before``.
        title: the figure title.
        ylabel: the y axis label.

    Returns:
        ``path``.

    Raises:
        ValueError: if a value sequence does not have one entry per label.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "acc.png"
        >>> plot_accuracy_bars(["helpful", "harmful", "random"], 0.80, [0.83, 0.76, 0.80], out,
        ...                    errors=[0.01, 0.02, 0.01]).name
        'acc.png'
    """
    path = _png_path(path)
    if isinstance(labels, str) or len(labels) == 0:
        raise ValueError(f"labels: expected a non-empty sequence of setting names, got {labels!r}")
    n = len(labels)
    after_v = _vector(after, "after", n)
    before_v = _vector(before, "before")
    if before_v.numel() == 1:
        before_v = before_v.expand(n)
    elif before_v.numel() != n:
        raise ValueError(f"before: expected {n} values (one per label) or a single value, got {before_v.numel()}")
    err_after = _vector(errors, "errors", n) if errors is not None else None
    err_before = _vector(errors_before, "errors_before", n) if errors_before is not None else None

    fig = _figure((max(4.5, 1.6 * n + 2.0), 4.2))
    ax = fig.add_subplot()
    x = torch.arange(n, dtype=torch.float64)
    width = 0.38
    after_colors = [_KIND_COLORS.get(str(lab).lower(), HELPFUL_COLOR) for lab in labels]
    ax.bar(
        (x - width / 2).tolist(),
        before_v.tolist(),
        width,
        color=BEFORE_COLOR,
        edgecolor="#666666",
        label="before",
        yerr=None if err_before is None else err_before.tolist(),
        capsize=4,
    )
    ax.bar(
        (x + width / 2).tolist(),
        after_v.tolist(),
        width,
        color=after_colors,
        edgecolor="#333333",
        label="after",
        yerr=None if err_after is None else err_after.tolist(),
        capsize=4,
    )
    spread = torch.cat([v for v in (err_after, err_before) if v is not None] or [torch.zeros(1)]).nan_to_num()
    values = torch.cat([before_v, after_v])
    finite = values[torch.isfinite(values)]
    lo = float(finite.min()) - float(spread.max()) if finite.numel() else 0.0
    hi = float(finite.max()) + float(spread.max()) if finite.numel() else 1.0
    span = max(hi - lo, 1e-3 * max(abs(hi), 1.0), 1e-9)
    bottom = max(0.0, lo - 0.6 * span) if lo >= 0 else lo - 0.6 * span
    ax.set_ylim(bottom, hi + 0.45 * span)
    fmt = _number_format(values)
    for i in range(n):
        b, a = float(before_v[i]), float(after_v[i])
        top_b = b + (float(err_before[i]) if err_before is not None else 0.0)
        top_a = a + (float(err_after[i]) if err_after is not None else 0.0)
        ax.text(i - width / 2, top_b, format(b, fmt), ha="center", va="bottom", fontsize=8)
        ax.text(i + width / 2, top_a, format(a, fmt), ha="center", va="bottom", fontsize=8)
        if math.isfinite(a - b):
            ax.text(
                i,
                hi + 0.3 * span,
                f"Δ {a - b:+{fmt[:-1]}f}",
                ha="center",
                va="center",
                fontsize=9,
                fontweight="bold",
                color=after_colors[i],
            )
    ax.set_xticks(x.tolist(), [str(lab) for lab in labels])
    ax.set_ylabel(ylabel)
    ax.set_title(title + (" (mean ± spread)" if err_after is not None else ""), fontsize=11)
    ax.legend(
        handles=[
            _patch(BEFORE_COLOR, "before"),
            _patch(after_colors[0], "after") if len(set(after_colors)) == 1 else _patch("#FFFFFF", "after (coloured)"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.09),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _patch(color: str, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, edgecolor="#333333", label=label)


def plot_accuracy_history(
    history: Sequence[Mapping[str, Any]],
    path: PathLike,
    *,
    title: str = "Accuracy before and after each correction",
) -> Path:
    """Accuracy before and after each correction, in order (``ErrorCorrection.history``).

    Args:
        history: dicts with ``accuracy_before`` and ``accuracy_after`` (entries where either is ``None`` are
            skipped), and optionally ``epoch``, ``moment`` and ``selection`` for the tick labels.
        path: the ``.png`` file to write.
        title: the figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: if ``history`` holds no entry with both accuracies.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "history.png"
        >>> plot_accuracy_history([{"epoch": 0, "accuracy_before": 0.8, "accuracy_after": 0.82},
        ...                        {"epoch": 1, "accuracy_before": 0.85, "accuracy_after": 0.86}], out).name
        'history.png'
    """
    path = _png_path(path)
    if isinstance(history, Mapping) or not isinstance(history, Sequence):
        raise TypeError(f"history: expected a list of dicts, got {type(history).__name__}")
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise TypeError(
                f"history[{i}]: expected a dict with accuracy_before/accuracy_after, got {type(entry).__name__}"
            )
    kept = [e for e in history if e.get("accuracy_before") is not None and e.get("accuracy_after") is not None]
    if not kept:
        raise ValueError(
            f"history: none of its {len(history)} entries has both accuracy_before and accuracy_after "
            "(ErrorCorrection measures them only when given an eval_dataset)"
        )
    before = torch.tensor([float(e["accuracy_before"]) for e in kept], dtype=torch.float64)
    after = torch.tensor([float(e["accuracy_after"]) for e in kept], dtype=torch.float64)

    def tick(e: Mapping[str, Any], i: int) -> str:
        parts = [f"epoch {e['epoch']}" if e.get("epoch") is not None else f"#{i}"]
        if e.get("selection"):
            parts.append(str(e["selection"]))
        return "\n".join(parts)

    fig = _figure((max(4.5, 0.9 * len(kept) + 2.5), 4.0))
    ax = fig.add_subplot()
    x = list(range(len(kept)))
    ax.plot(x, before.tolist(), "o", color="#666666", label="before", zorder=3)
    ax.plot(x, after.tolist(), "s", color=HELPFUL_COLOR, label="after", zorder=3)
    for i in x:
        b, a = float(before[i]), float(after[i])
        ax.annotate(
            "",
            xy=(i, a),
            xytext=(i, b),
            arrowprops={"arrowstyle": "->", "color": HELPFUL_COLOR if a >= b else HARMFUL_COLOR, "lw": 1.5},
        )
    ax.plot(x, after.tolist(), "-", color=HELPFUL_COLOR, alpha=0.3)
    ax.set_xticks(x, [tick(e, i) for i, e in enumerate(kept)], fontsize=8)
    ax.set_xlim(-0.6, len(kept) - 0.4)
    ax.set_ylabel("accuracy")
    mean_change = float((after - before).mean())
    fmt = _number_format(torch.cat([before, after]))
    ax.set_title(f"{title}\nmean change {mean_change:+{fmt[:-1]}f} over {len(kept)} corrections", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Self-influence, kNN recall and sweeps
# ---------------------------------------------------------------------------------------------------------------------


def _flag_mask(flagged: Any, n: int) -> Tensor:
    f = _tensor(flagged, "flagged").reshape(-1)
    if f.dtype == torch.bool:
        if f.numel() != n:
            raise ValueError(f"flagged: a boolean mask needs {n} entries (one per score), got {f.numel()}")
        return f
    if f.is_floating_point() and not torch.equal(f, f.round()):
        raise ValueError("flagged: expected a boolean mask or integer indices, got non-integer values")
    f = f.long()
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= n):
        raise ValueError(f"flagged: indices must lie in [0, {n}), got values from {int(f.min())} to {int(f.max())}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[f] = True
    return mask


def mislabel_detection(scores: Any, flagged: Any, *, top_fraction: float = 0.1) -> dict[str, float]:
    """How many known-flipped points rank in the top ``top_fraction`` by self-influence.

    Args:
        scores: ``[N]`` self-influence of each training point (higher = more suspicious).
        flagged: a boolean ``[N]`` mask or the indices of the points whose labels are known to be wrong.
        top_fraction: the share of the training set inspected, in ``(0, 1]``.

    Returns:
        ``{"inspected", "flagged", "found", "precision", "recall", "random_recall"}``: the number inspected
        (``ceil(top_fraction * N)``), the number flagged, how many flagged are among the inspected, ``found /
        inspected``, ``found / flagged`` (NaN without flagged points) and the recall expected at random.

    Example::

        >>> mislabel_detection([5.0, 0.1, 4.0, 0.2], [0, 3], top_fraction=0.5)
        {'inspected': 2, 'flagged': 2, 'found': 1, 'precision': 0.5, 'recall': 0.5, 'random_recall': 0.5}
    """
    values = _vector(scores, "scores")
    n = values.numel()
    if n == 0:
        raise ValueError("scores: empty; expected one self-influence score per training point")
    if not torch.isfinite(values).all():
        raise ValueError(f"scores: {int((~torch.isfinite(values)).sum())} non-finite values; expected finite scores")
    if not isinstance(top_fraction, (int, float)) or isinstance(top_fraction, bool) or not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction: expected a number in (0, 1], got {top_fraction!r}")
    mask = _flag_mask(flagged, n)
    inspected = max(1, math.ceil(top_fraction * n - 1e-9))
    order = torch.sort(values, descending=True, stable=True).indices
    found = int(mask[order[:inspected]].sum())
    num_flagged = int(mask.sum())
    return {
        "inspected": inspected,
        "flagged": num_flagged,
        "found": found,
        "precision": found / inspected,
        "recall": found / num_flagged if num_flagged else float("nan"),
        "random_recall": inspected / n,
    }


def plot_self_influence(
    scores: Any,
    path: PathLike,
    *,
    flagged: Any = None,
    top_fraction: float = 0.1,
    title: str = "Self-influence of the training points",
) -> Path:
    """Self-influence sorted from high to low, with the known-flipped points marked; high = likely mislabelled.

    With ``flagged``, a second panel shows the share of flipped points found against the share of the training
    set inspected in that order (the diagonal is random inspection), and the title gives how many flipped points
    the top ``top_fraction`` holds.

    Args:
        scores: ``[N]`` self-influence of each training point.
        path: the ``.png`` file to write.
        flagged: a boolean ``[N]`` mask or the indices of the points whose labels are known to be flipped.
        top_fraction: the share of the training set marked as inspected, in ``(0, 1]``.
        title: the figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: for non-finite scores, a mask of another length, indices out of range or a bad fraction.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "self.png"
        >>> plot_self_influence(torch.rand(100), out, flagged=[3, 50, 97]).name
        'self.png'
    """
    path = _png_path(path)
    values = _vector(scores, "scores")
    stats = mislabel_detection(
        values, flagged if flagged is not None else torch.zeros(0, dtype=torch.long), top_fraction=top_fraction
    )
    n, inspected = values.numel(), int(stats["inspected"])
    order = torch.sort(values, descending=True, stable=True).indices
    ranked = values[order]
    mask = _flag_mask(flagged, n)[order] if flagged is not None else torch.zeros(n, dtype=torch.bool)

    fig = _figure((11.0, 4.2) if flagged is not None else (6.5, 4.2))
    axes = fig.subplots(1, 2 if flagged is not None else 1, squeeze=False)[0]
    ax = axes[0]
    rank = torch.arange(1, n + 1)
    ax.plot(rank.tolist(), ranked.tolist(), color=RANDOM_COLOR, lw=1.2, label="training points, sorted")
    if bool(mask.any()):
        ax.scatter(
            rank[mask].tolist(),
            ranked[mask].tolist(),
            s=22,
            color=HARMFUL_COLOR,
            zorder=3,
            marker="x",
            label="known flipped label",
        )
    ax.axvline(inspected + 0.5, color="black", ls="--", lw=1, label=f"top {top_fraction:.0%} ({inspected})")
    positive = bool((ranked > 0).all())
    if positive and float(ranked[0]) / float(ranked[-1]) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("rank by self-influence")
    ax.set_ylabel("self-influence")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if flagged is not None:
        curve = torch.cat([torch.zeros(1), mask.double().cumsum(0) / max(1, int(mask.sum()))])
        share = torch.arange(0, n + 1, dtype=torch.float64) / n
        right = axes[1]
        right.plot(share.tolist(), curve.tolist(), color=HARMFUL_COLOR, lw=2, label="by self-influence")
        right.plot([0, 1], [0, 1], color=RANDOM_COLOR, ls="--", label="random order")
        right.axvline(inspected / n, color="black", ls="--", lw=1)
        right.set_xlabel("share of training points inspected")
        right.set_ylabel("share of flipped labels found")
        right.set_xlim(0, 1)
        right.set_ylim(0, 1.02)
        right.legend(fontsize=8, loc="lower right")
        right.grid(alpha=0.3)
        summary = (
            f"the top {top_fraction:.0%} by self-influence ({inspected} points) hold {stats['found']} flipped labels "
            f"({stats['precision']:.0%} of them)"
            + (
                f": {stats['recall']:.0%} of the {stats['flagged']} flipped, random inspection finds "
                f"{stats['random_recall']:.0%}"
                if stats["flagged"]
                else ""
            )
        )
    else:
        summary = f"{n} training points; high self-influence = likely mislabelled"
    fig.suptitle(f"{title}\n{summary}", fontsize=11)
    return _save(fig, path)


def _series(value: Any, name: str, length: int) -> dict[str, Tensor]:
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{name}: empty mapping; expected at least one series")
        return {str(k): _vector(v, f"{name}[{k!r}]", length) for k, v in value.items()}
    return {"": _vector(value, name, length)}


def plot_recall_curve(
    ks: Sequence[int],
    recalls: Any,
    path: PathLike,
    *,
    random_baseline: Any = None,
    spread: Any = None,
    top: int = 10,
    title: str = "Recall of the full-influence top points among the k nearest neighbours",
) -> Path:
    """Recall of the full-influence top-``top`` helpful points among the ``k`` nearest candidates, against ``k``.

    Args:
        ks: candidate counts (positive, the x axis, log scale).
        recalls: recall at each ``k`` (in ``[0, 1]``), or a mapping name -> recalls for several curves.
        path: the ``.png`` file to write.
        random_baseline: the number of training points ``N`` (a random ``k``-subset recalls ``k / N``), or a
            sequence of baseline recalls, one per ``k``.
        spread: optional spread of ``recalls`` (same structure), drawn as a band.
        top: the size of the full-influence top set (for the labels).
        title: the figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: if ``ks`` is empty or not positive, or a sequence does not have one value per ``k``.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "recall.png"
        >>> plot_recall_curve([10, 100, 1000], [0.3, 0.7, 1.0], out, random_baseline=1000).name
        'recall.png'
    """
    path = _png_path(path)
    k = _vector(ks, "ks")
    if k.numel() == 0 or bool((k <= 0).any()):
        raise ValueError(f"ks: expected positive candidate counts, got {k.tolist()}")
    n = k.numel()
    curves = _series(recalls, "recalls", n)
    bands = _series(spread, "spread", n) if spread is not None else {}
    if bands and set(bands) != set(curves):
        raise ValueError(f"spread: expected the same series as recalls {sorted(curves)}, got {sorted(bands)}")
    if random_baseline is None:
        baseline = None
    elif isinstance(random_baseline, (int, float)) and not isinstance(random_baseline, bool):
        if random_baseline <= 0:
            raise ValueError(f"random_baseline: expected the number of training points (> 0), got {random_baseline}")
        baseline = (k / float(random_baseline)).clamp(max=1.0)
    else:
        baseline = _vector(random_baseline, "random_baseline", n)

    fig = _figure((6.5, 4.3))
    ax = fig.add_subplot()
    palette = [HELPFUL_COLOR, "#009E73", "#CC79A7", "#E6C229", "#56B4E9", "#8C564B"]
    for i, (name, r) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        ax.plot(k.tolist(), r.tolist(), "o-", color=color, lw=2, label=name or "kNN candidates")
        if name in bands:
            ax.fill_between(
                k.tolist(),
                (r - bands[name]).clamp(0, 1).tolist(),
                (r + bands[name]).clamp(0, 1).tolist(),
                color=color,
                alpha=0.2,
                lw=0,
            )
    if baseline is not None:
        ax.plot(k.tolist(), baseline.tolist(), "--", color=RANDOM_COLOR, label="random candidates")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("k (candidates from the nearest neighbours)")
    ax.set_ylabel(f"recall of the top {top}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _gap_label(name: str, x: Tensor, y: Tensor) -> str:
    missing = ~torch.isfinite(y)
    if not bool(missing.any()):
        return name
    return f"{name} (no value at {', '.join(f'{v:g}' for v in x[missing].tolist())})"


def plot_sweep(
    xs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: PathLike,
    *,
    xlabel: str,
    ylabel: str,
    logx: bool = True,
    logy: bool = False,
    secondary: Mapping[str, Sequence[float]] | None = None,
    secondary_label: str = "",
    title: str | None = None,
) -> Path:
    """One or more quantities against a setting, e.g. LiSSA's error and time against damping or depth.

    Non-finite values (a diverged run) leave a gap in their line.

    Args:
        xs: the setting's values (positive when ``logx``).
        series: name -> values, one per ``x``, on the left axis.
        path: the ``.png`` file to write.
        xlabel: the x axis label.
        ylabel: the left axis label.
        logx: log scale on x.
        logy: log scale on the left axis.
        secondary: optional name -> values on a right axis (dashed), e.g. seconds.
        secondary_label: the right axis label.
        title: optional figure title.

    Returns:
        ``path``.

    Raises:
        ValueError: if ``series`` is empty, a series does not have one value per ``x`` (the message names it) or
            ``logx`` meets a non-positive ``x``.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "sweep.png"
        >>> plot_sweep([1e-3, 1e-2, 1e-1], {"relative error": [0.5, 0.1, 0.3]}, out, xlabel="damping",
        ...            ylabel="error", secondary={"seconds": [3.0, 2.0, 1.0]}, secondary_label="s").name
        'sweep.png'
    """
    path = _png_path(path)
    x = _vector(xs, "xs")
    if x.numel() == 0:
        raise ValueError("xs: empty; expected at least one value")
    if logx and bool((x <= 0).any()):
        raise ValueError(f"xs: logx=True needs positive values, got {x.tolist()}; pass logx=False")
    if not isinstance(series, Mapping) or not series:
        raise ValueError("series: expected a non-empty mapping name -> values")
    left = _series(series, "series", x.numel())
    right = _series(secondary, "secondary", x.numel()) if secondary else {}

    fig = _figure((6.5, 4.3))
    ax = fig.add_subplot()
    palette = [HELPFUL_COLOR, HARMFUL_COLOR, "#009E73", "#CC79A7", "#E6C229", "#56B4E9"]
    handles = []
    for i, (name, y) in enumerate(left.items()):
        clean = torch.where(torch.isfinite(y), y, torch.full_like(y, float("nan")))
        (line,) = ax.plot(
            x.tolist(), clean.tolist(), "o-", color=palette[i % len(palette)], lw=2, label=_gap_label(name, x, y)
        )
        handles.append(line)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if right:
        twin = ax.twinx()
        for i, (name, y) in enumerate(right.items()):
            clean = torch.where(torch.isfinite(y), y, torch.full_like(y, float("nan")))
            color = palette[(len(left) + i) % len(palette)] if len(left) + len(right) > 1 else RANDOM_COLOR
            (line,) = twin.plot(x.tolist(), clean.tolist(), "s--", color=color, lw=1.5, label=_gap_label(name, x, y))
            handles.append(line)
        twin.set_ylabel(secondary_label)
    # Below the axes: "best" placement ignores the twin axis, so a legend inside could hide its points.
    ax.legend(
        handles=handles,
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        ncol=min(3, len(handles)),
        frameon=False,
    )
    if title:
        ax.set_title(title, fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# Text explanations
# ---------------------------------------------------------------------------------------------------------------------

_TAG = re.compile(r"<\s*br\s*/?\s*>|<\s*/?\s*(p|i|b|em|strong)\s*>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


def shorten_text(text: Any, max_chars: int = 300) -> str:
    """Clean a text for display (HTML entities decoded, ``<br />`` tags and runs of whitespace collapsed) and cut
    it at a word boundary to at most ``max_chars`` characters, ending with ``…`` when cut.

    Example::

        >>> shorten_text("A &quot;great&quot; film.<br /><br />Truly   great, and long.", 30)
        'A "great" film. Truly great…'
    """
    max_chars = _positive_int(max_chars, "max_chars")
    clean = _SPACE.sub(" ", _TAG.sub(" ", html.unescape(str(text)))).strip()
    if len(clean) <= max_chars:
        return clean
    cut = clean[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= max_chars // 2:  # a word boundary not too far back; otherwise cut inside the (very long) word
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + "…"


def _examples(value: Any, name: str) -> list[tuple[str, Any, float, int | None]]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a list of (text, label, score) or (text, label, score, index) tuples")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) not in (3, 4):
            raise ValueError(
                f"{name}[{i}]: expected (text, label, score) or (text, label, score, index), got {item!r:.80}"
            )
        score = item[2].item() if isinstance(item[2], Tensor) else item[2]
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            raise ValueError(f"{name}[{i}]: the score (third entry) must be a number, got {score!r}")
        index = item[3] if len(item) == 4 else None
        index = int(index.item() if isinstance(index, Tensor) else index) if index is not None else None
        out.append((str(item[0]), item[1], float(score), index))
    return out


def _label_text(label: Any) -> str:
    return str(label.item() if isinstance(label, Tensor) and label.numel() == 1 else label)


def text_explanation_blocks(
    test_text: str,
    test_label: Any,
    predicted: Any,
    helpful: Sequence[Sequence[Any]],
    harmful: Sequence[Sequence[Any]],
    *,
    heading: str | None = None,
    level: int = 3,
    max_chars: int = 300,
) -> list[Block]:
    """The blocks of :func:`format_text_explanation`, to add to a :class:`~lightning_fastif.app.report.Report`.

    Example::

        >>> from lightning_fastif.app.report import Report
        >>> import tempfile
        >>> blocks = text_explanation_blocks("Dull.", "neg", "pos", [("Dull plot.", "neg", 0.4)], [])
        >>> Report(tempfile.mkdtemp(), "Text").add_blocks(blocks).write().name
        'report.md'
    """
    helpful_rows, harmful_rows = _examples(helpful, "helpful"), _examples(harmful, "harmful")
    max_chars = _positive_int(max_chars, "max_chars")
    verdict = "correct" if _label_text(test_label) == _label_text(predicted) else "misclassified"
    blocks: list[Block] = [
        Heading(heading or "Test example", level),
        Paragraph(f"True label: {_label_text(test_label)}; predicted: {_label_text(predicted)} ({verdict})."),
        # The test text is what the reader judges, so it may run twice as long as a training example.
        Quote(shorten_text(test_text, 2 * max_chars)),
    ]
    for kind, rows, meaning in (
        ("helpful", helpful_rows, "positive score: they lowered this example's loss"),
        ("harmful", harmful_rows, "negative score: they raised this example's loss"),
    ):
        blocks.append(Paragraph(f"Most {kind} training examples ({meaning}):"))
        if not rows:
            blocks.append(Paragraph(f"No {kind} training example among the candidates."))
            continue
        with_index = any(index is not None for *_, index in rows)
        columns = ["rank", "influence", "label", *(["train index"] if with_index else []), "text"]
        table = [
            [
                rank,
                _fmt_score(score),
                _label_text(label),
                *([index] if with_index else []),
                shorten_text(text, max_chars),
            ]
            for rank, (text, label, score, index) in enumerate(rows, start=1)
        ]
        blocks.append(Table(columns, table))
    return blocks


def format_text_explanation(
    test_text: str,
    test_label: Any,
    predicted: Any,
    helpful: Sequence[Sequence[Any]],
    harmful: Sequence[Sequence[Any]],
    *,
    heading: str | None = None,
    level: int = 3,
    max_chars: int = 300,
) -> str:
    """A text example and its most helpful and harmful training examples, as Markdown.

    Texts are cleaned and cut to ``max_chars`` at a word boundary (the test text to twice that), and escaped so
    a ``|`` or ``*`` in a review cannot break the tables.

    Args:
        test_text: the test example's text.
        test_label: its true label (shown as given, e.g. a class name).
        predicted: the model's prediction.
        helpful: ``(text, label, score)`` or ``(text, label, score, train_index)`` tuples, most helpful first.
        harmful: the same for the most harmful, most harmful first.
        heading: the section heading (default ``"Test example"``).
        level: the heading level (1 to 6).
        max_chars: the longest training text shown.

    Returns:
        Markdown: a heading, the labels, the test text quoted, and one table per kind.

    Raises:
        ValueError: if an entry is not a 3- or 4-tuple with a numeric score, or ``max_chars`` is not positive.

    Example::

        >>> md = format_text_explanation("A | dull film", "negative", "positive",
        ...                              [("Dull, slow.", "negative", 0.42, 17)], [("Loved it!", "positive", -0.3)])
        >>> print(md.splitlines()[8])
        | rank | influence | label | train index | text |
        >>> "A \\\\| dull film" in md
        True
    """
    blocks = text_explanation_blocks(
        test_text, test_label, predicted, helpful, harmful, heading=heading, level=level, max_chars=max_chars
    )
    return render_markdown(blocks)
