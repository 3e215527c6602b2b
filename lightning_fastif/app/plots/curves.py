"""Curves and bars of influence experiments: accuracy before and after error correction, self-influence against
known-flipped labels, recall of the full-influence top points among the k nearest neighbours, and sweeps of a
setting (damping, LiSSA depth ...)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.app.plots.figure import (
    BEFORE_COLOR,
    HARMFUL_COLOR,
    HELPFUL_COLOR,
    KIND_COLORS,
    RANDOM_COLOR,
    legend_patch,
    new_figure,
    png_path,
    save_png,
)
from lightning_fastif.app.plots.inputs import as_series, as_vector
from lightning_fastif.errors import ArgumentError
from lightning_fastif.io.atomic import PathLike
from lightning_fastif.metrics import flagged_mask, mislabel_detection


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
        ArgumentError: if a value sequence does not have one entry per label.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "acc.png"
        >>> plot_accuracy_bars(["helpful", "harmful", "random"], 0.80, [0.83, 0.76, 0.80], out,
        ...                    errors=[0.01, 0.02, 0.01]).name
        'acc.png'
    """
    path = png_path(path)
    if isinstance(labels, str) or len(labels) == 0:
        raise ArgumentError(f"labels: expected a non-empty sequence of setting names, got {labels!r}")
    n = len(labels)
    after_v = as_vector(after, "after", n)
    before_v = as_vector(before, "before")
    if before_v.numel() == 1:
        before_v = before_v.expand(n)
    elif before_v.numel() != n:
        raise ArgumentError(f"before: expected {n} values (one per label) or a single value, got {before_v.numel()}")
    err_after = as_vector(errors, "errors", n) if errors is not None else None
    err_before = as_vector(errors_before, "errors_before", n) if errors_before is not None else None

    fig = new_figure((max(4.5, 1.6 * n + 2.0), 4.2))
    ax = fig.add_subplot()
    x = torch.arange(n, dtype=torch.float64)
    width = 0.38
    after_colors = [KIND_COLORS.get(str(lab).lower(), HELPFUL_COLOR) for lab in labels]
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
            legend_patch(BEFORE_COLOR, "before"),
            legend_patch(after_colors[0], "after")
            if len(set(after_colors)) == 1
            else legend_patch("#FFFFFF", "after (coloured)"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.09),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    ax.grid(axis="y", alpha=0.3)
    return save_png(fig, path)


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
        ArgumentError: if ``history`` holds no entry with both accuracies.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "history.png"
        >>> plot_accuracy_history([{"epoch": 0, "accuracy_before": 0.8, "accuracy_after": 0.82},
        ...                        {"epoch": 1, "accuracy_before": 0.85, "accuracy_after": 0.86}], out).name
        'history.png'
    """
    path = png_path(path)
    if isinstance(history, Mapping) or not isinstance(history, Sequence):
        raise ArgumentError(f"history: expected a list of dicts, got {type(history).__name__}")
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping):
            raise ArgumentError(
                f"history[{i}]: expected a dict with accuracy_before/accuracy_after, got {type(entry).__name__}"
            )
    kept = [e for e in history if e.get("accuracy_before") is not None and e.get("accuracy_after") is not None]
    if not kept:
        raise ArgumentError(
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

    fig = new_figure((max(4.5, 0.9 * len(kept) + 2.5), 4.0))
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
    return save_png(fig, path)


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
        ArgumentError: for non-finite scores, a mask of another length, indices out of range or a bad fraction.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "self.png"
        >>> plot_self_influence(torch.rand(100), out, flagged=[3, 50, 97]).name
        'self.png'
    """
    path = png_path(path)
    values = as_vector(scores, "scores")
    stats = mislabel_detection(
        values, flagged if flagged is not None else torch.zeros(0, dtype=torch.long), top_fraction=top_fraction
    )
    n, inspected = values.numel(), int(stats["inspected"])
    order = torch.sort(values, descending=True, stable=True).indices
    ranked = values[order]
    mask = flagged_mask(flagged, n)[order] if flagged is not None else torch.zeros(n, dtype=torch.bool)

    fig = new_figure((11.0, 4.2) if flagged is not None else (6.5, 4.2))
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
    return save_png(fig, path)


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
        ArgumentError: if ``ks`` is empty or not positive, or a sequence does not have one value per ``k``.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "recall.png"
        >>> plot_recall_curve([10, 100, 1000], [0.3, 0.7, 1.0], out, random_baseline=1000).name
        'recall.png'
    """
    path = png_path(path)
    k = as_vector(ks, "ks")
    if k.numel() == 0 or bool((k <= 0).any()):
        raise ArgumentError(f"ks: expected positive candidate counts, got {k.tolist()}")
    n = k.numel()
    curves = as_series(recalls, "recalls", n)
    bands = as_series(spread, "spread", n) if spread is not None else {}
    if bands and set(bands) != set(curves):
        raise ArgumentError(f"spread: expected the same series as recalls {sorted(curves)}, got {sorted(bands)}")
    if random_baseline is None:
        baseline = None
    elif isinstance(random_baseline, (int, float)) and not isinstance(random_baseline, bool):
        if random_baseline <= 0:
            raise ArgumentError(f"random_baseline: expected the number of training points (> 0), got {random_baseline}")
        baseline = (k / float(random_baseline)).clamp(max=1.0)
    else:
        baseline = as_vector(random_baseline, "random_baseline", n)

    fig = new_figure((6.5, 4.3))
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
    return save_png(fig, path)


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
        ArgumentError: if ``series`` is empty, a series does not have one value per ``x`` (the message names it) or
            ``logx`` meets a non-positive ``x``.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "sweep.png"
        >>> plot_sweep([1e-3, 1e-2, 1e-1], {"relative error": [0.5, 0.1, 0.3]}, out, xlabel="damping",
        ...            ylabel="error", secondary={"seconds": [3.0, 2.0, 1.0]}, secondary_label="s").name
        'sweep.png'
    """
    path = png_path(path)
    x = as_vector(xs, "xs")
    if x.numel() == 0:
        raise ArgumentError("xs: empty; expected at least one value")
    if logx and bool((x <= 0).any()):
        raise ArgumentError(f"xs: logx=True needs positive values, got {x.tolist()}; pass logx=False")
    if not isinstance(series, Mapping) or not series:
        raise ArgumentError("series: expected a non-empty mapping name -> values")
    left = as_series(series, "series", x.numel())
    right = as_series(secondary, "secondary", x.numel()) if secondary else {}

    fig = new_figure((6.5, 4.3))
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
    return save_png(fig, path)
