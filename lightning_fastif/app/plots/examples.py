"""Examples shown as what they are (images): a grid of examples, and one test image with its most helpful and
most harmful training images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_fastif.app.plots.figure import HARMFUL_COLOR, HELPFUL_COLOR, format_score, new_figure, png_path, save_png
from lightning_fastif.app.plots.inputs import as_tensor, as_vector
from lightning_fastif.errors import ArgumentError, check_int
from lightning_fastif.io.atomic import PathLike

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _images(value: Any, name: str) -> Tensor:
    """``[N, H, W]`` (grey) or ``[N, H, W, 3]`` (colour) float images from the accepted layouts."""
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float)):
        parts = [as_tensor(v, f"{name}[{i}]") for i, v in enumerate(value)]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) > 1:
            raise ArgumentError(f"{name}: images of different shapes {sorted(shapes)}; expected one shape")
        t = torch.stack(parts)
    else:
        t = as_tensor(value, name)
    t = t.float()
    accepted = "[N, H, W], [N, 1, H, W], [N, 3, H, W], [N, H, W, 3], or [N, D] with D a square (flat images)"
    if t.dim() == 2:
        side = math.isqrt(t.shape[1])
        if side * side != t.shape[1] or side == 0:
            raise ArgumentError(
                f"{name}: got shape {tuple(t.shape)}, whose rows are not square images; expected {accepted}"
            )
        return t.reshape(t.shape[0], side, side)
    if t.dim() == 3:
        return t
    if t.dim() == 4 and t.shape[1] in (1, 3):
        return t[:, 0] if t.shape[1] == 1 else t.permute(0, 2, 3, 1)
    if t.dim() == 4 and t.shape[3] in (1, 3):
        return t[..., 0] if t.shape[3] == 1 else t
    raise ArgumentError(f"{name}: got shape {tuple(t.shape)}; expected {accepted}")


def _single_image(value: Any, name: str) -> Tensor:
    t = as_tensor(value, name)
    if t.dim() not in (1, 2, 3):
        raise ArgumentError(f"{name}: expected one image ([H, W], [C, H, W] or a flat [D]), got shape {tuple(t.shape)}")
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
        ArgumentError: for an unsupported image shape, an empty set, ``titles`` of another length or a bad ``rows``.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "grid.png"
        >>> plot_examples_grid(torch.rand(6, 64), out, titles=[str(i) for i in range(6)], rows=2).name
        'grid.png'
    """
    path = png_path(path)
    stack = _images(images, "images")
    n = stack.shape[0]
    if n == 0:
        raise ArgumentError("images: empty; expected at least one image")
    if titles is not None and len(titles) != n:
        raise ArgumentError(f"titles: expected {n} titles (one per image), got {len(titles)}")
    if rows is None:
        cols = min(n, 10)
        rows = math.ceil(n / cols)
    else:
        rows = check_int("rows", rows)
        cols = math.ceil(n / rows)
    vmin, vmax = _value_range(stack)
    fig = new_figure((1.35 * cols + 0.3, 1.55 * rows + (0.5 if title else 0.15)))
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
    return save_png(fig, path)


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
        ArgumentError: if images and scores (or titles) differ in number, or image shapes differ from the test image.

    Example::

        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "explain.png"
        >>> plot_explanation(torch.rand(64), "test #0", torch.rand(3, 8, 8), [0.3, 0.2, 0.1],
        ...                  torch.rand(2, 8, 8), [-0.5, -0.1], out).name
        'explain.png'
    """
    path = png_path(path)
    test = _single_image(test_image, "test_image")

    def kind(images: Any, scores: Any, titles: Sequence[str] | None, name: str) -> tuple[Tensor, list[str]]:
        empty = images is None or (hasattr(images, "__len__") and len(images) == 0)
        stack = torch.zeros(0, *test.shape) if empty else _images(images, f"{name}_images")
        values = as_vector([] if scores is None else scores, f"{name}_scores", stack.shape[0])
        if stack.shape[1:] != test.shape and stack.shape[0]:
            raise ArgumentError(
                f"{name}_images: image shape {tuple(stack.shape[1:])} differs from test_image's {tuple(test.shape)}"
            )
        if titles is not None and len(titles) != stack.shape[0]:
            raise ArgumentError(f"{name}_titles: expected {stack.shape[0]} titles (one per image), got {len(titles)}")
        labels = [
            (f"{titles[i]}\n" if titles is not None else "") + format_score(float(v)) for i, v in enumerate(values)
        ]
        return stack, labels

    helpful, helpful_labels = kind(helpful_images, helpful_scores, helpful_titles, "helpful")
    harmful, harmful_labels = kind(harmful_images, harmful_scores, harmful_titles, "harmful")
    cols = 1 + max(helpful.shape[0], harmful.shape[0], 1)
    vmin, vmax = _value_range(test, helpful, harmful)
    extra = 0.35 if (helpful_titles or harmful_titles) else 0.0
    fig = new_figure((1.45 * cols + 0.5, 2 * (1.75 + extra) + (0.45 if title else 0.1)))
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
    return save_png(fig, path)
