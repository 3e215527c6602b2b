"""FastIF's visualisation: a bipartite graph from training points to the test points they influence."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_fastif.app.plots.figure import (
    HARMFUL_COLOR,
    HELPFUL_COLOR,
    UNGROUPED_COLOR,
    count_label,
    group_colors,
    new_figure,
    png_path,
    save_png,
)
from lightning_fastif.app.plots.inputs import as_labels, as_tensor, sorted_labels
from lightning_fastif.errors import ArgumentError, check_choice, check_int
from lightning_fastif.io.atomic import PathLike

_MAX_LEGEND_GROUPS = 16


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
    order_groups = sorted_labels(groups)
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
        raise ArgumentError(
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
    raise ArgumentError(
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
        ArgumentError: if shapes disagree (the message names the argument), ``top_n`` is not positive, ``normalize``
            is unknown or ``path`` does not end in ``.png``.
        ImportError: if matplotlib is not installed.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "graph.png"
        >>> plot_influence_graph([10, 11], [[0, 1, 2], [1, 2, 3]], [[0.5, -0.2, 0.1], [0.3, 0.4, -0.9]], out,
        ...                      test_groups=[0, 1], train_groups=[0, 1, 1, 0]).name
        'graph.png'
    """
    path = png_path(path)
    cand, sc = as_tensor(candidate_indices, "candidate_indices"), as_tensor(scores, "scores")
    if cand.dim() == 1:
        cand = cand.unsqueeze(0)
    if sc.dim() == 1:
        sc = sc.unsqueeze(0)
    if cand.dim() != 2:
        raise ArgumentError(f"candidate_indices: expected a [T, K] tensor, got shape {tuple(cand.shape)}")
    if cand.is_floating_point() and not torch.equal(cand, cand.round()):
        raise ArgumentError("candidate_indices: expected integer training indices, got non-integer values")
    if sc.shape != cand.shape:
        raise ArgumentError(
            f"scores: expected the shape of candidate_indices {tuple(cand.shape)}, got {tuple(sc.shape)}"
        )
    tests = as_tensor(test_indices, "test_indices").reshape(-1).long().tolist()
    num_test = cand.shape[0]
    if len(tests) != num_test:
        raise ArgumentError(
            f"test_indices: expected {num_test} entries (one per row of candidate_indices), got {len(tests)}"
        )
    if num_test == 0:
        raise ArgumentError("test_indices: empty; there is nothing to plot")
    top_n = check_int("top_n", top_n)
    check_choice("normalize", normalize, ("per_test", "global"))
    groups = as_labels(test_groups, "test_groups", num_test) if test_groups is not None else [None] * num_test
    train_labels = _normalize_train_groups(train_groups)

    edges = _graph_edges(cand.long(), sc.double(), top_n, normalize)
    test_xy, group_angle = _circle_layout(groups, tests)
    if num_test == 1:
        test_xy = torch.zeros(1, 2, dtype=torch.float64)
        group_angle = dict.fromkeys(group_angle, math.pi / 2)
    nodes, train_xy, node_weight = _train_layout(edges, test_xy) if edges else ([], torch.zeros(0, 2), torch.zeros(0))
    node_groups = [_train_group(train_labels, j) for j in nodes]
    colors = group_colors(groups + node_groups)

    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D

    fig = new_figure((10.5, 8.0))
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
        Line2D([0], [0], marker="o", ls="", mfc=UNGROUPED_COLOR, mec="white", ms=6, label="training point"),
    ]
    shown = [g for g in sorted_labels(groups + node_groups) if g is not None]
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
        f"{count_label(num_test, 'test point')}, {count_label(len(nodes), 'training point')}, "
        f"{count_label(len(edges), 'edge')} "
        f"(top {top_n} helpful and harmful each; width ~ |score|, {normalize.replace('_', ' ')} scale)",
        fontsize=9,
    )
    return save_png(fig, path)
