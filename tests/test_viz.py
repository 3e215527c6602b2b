"""Plots write readable PNGs atomically from plain tensors; bad input names its argument."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from lightning_fastif.app import plots
from lightning_fastif.app.plots import graph

matplotlib = pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, expected):
    """A non-empty PNG that matplotlib reads back, and nothing else (no temporary file) in its directory."""
    assert path == expected
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    from matplotlib.image import imread

    image = imread(path)
    assert image.ndim == 3
    assert image.shape[0] > 50
    assert image.shape[1] > 50
    # Not a blank canvas: the plot drew something.
    assert float(image[..., :3].std()) > 0.01
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.fixture
def out(tmp_path):
    def make(name):
        d = tmp_path / name
        d.mkdir()
        return d / f"{name}.png"

    return make


# ---------------------------------------------------------------------------------------------------------------------
# Influence graph
# ---------------------------------------------------------------------------------------------------------------------


def test_graph_edges_keep_top_n_of_each_sign_and_normalise_per_test():
    candidates = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, -1, 8]])
    scores = torch.tensor([[3.0, -1.0, 2.0, -4.0, 0.0], [1.0, float("nan"), -0.5, 9.0, 0.25]])
    edges = graph._graph_edges(candidates, scores, top_n=1, normalize="per_test")
    # Row 0: top helpful is 0 (3.0), top harmful is 3 (-4.0); the zero score is neither.
    # Row 1: the NaN and the padded -1 are skipped; top helpful 5 (1.0), top harmful 7 (-0.5).
    assert [(t, j, s) for t, j, s, _ in edges] == [(0, 0, 3.0), (0, 3, -4.0), (1, 5, 1.0), (1, 7, -0.5)]
    assert [w for *_, w in edges] == pytest.approx([0.75, 1.0, 1.0, 0.5])
    glob = graph._graph_edges(candidates, scores, top_n=1, normalize="global")
    assert [w for *_, w in glob] == pytest.approx([0.75, 1.0, 0.25, 0.125])
    # K < top_n: every candidate of a sign is kept.
    assert len(graph._graph_edges(candidates, scores, top_n=10, normalize="global")) == 4 + 3


def test_training_point_sits_between_the_test_points_it_influences():
    test_xy = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # Point 7 influences test points 0 and 1 equally (opposite on the circle), point 9 only test point 2.
    edges = [(0, 7, 1.0, 1.0), (1, 7, -1.0, 1.0), (2, 9, 0.5, 1.0)]
    nodes, xy, weight = graph._train_layout(edges, test_xy)
    assert nodes == [7, 9]
    assert weight.tolist() == [2.0, 1.0]
    assert float(xy[0].norm()) < 1e-9  # the weighted mean of two opposite points is the centre
    assert 0.3 < float(xy[1].norm()) < 0.9  # inside the circle, towards its single test point
    assert float(xy[1] @ test_xy[2]) / float(xy[1].norm()) > 0.9


def test_influence_graph_with_groups(out):
    g = torch.Generator().manual_seed(0)
    candidates = torch.stack([torch.randperm(60, generator=g)[:12] for _ in range(8)])
    scores = torch.randn(8, 12, generator=g)
    path = out("graph")
    written = plots.plot_influence_graph(
        torch.arange(100, 108), candidates, scores, path, test_groups=[0, 1] * 4, train_groups=torch.arange(60) % 3
    )
    assert_png(written, path)


@pytest.mark.parametrize(
    ("case", "candidates", "scores"),
    [
        ("single_test_point", [[4, 2, 9]], [[0.3, -0.1, 0.02]]),
        ("one_dimensional_row", [4, 2, 9], [0.3, -0.1, 0.02]),
        ("all_positive", [[0, 1, 2], [2, 3, 4]], [[0.1, 0.2, 0.3], [1.0, 2.0, 3.0]]),
        ("k_below_top_n", [[0], [1]], [[0.5], [-0.5]]),
        ("no_edges", [[0, 1], [2, 3]], [[0.0, float("nan")], [0.0, 0.0]]),
    ],
)
def test_influence_graph_edge_cases(out, case, candidates, scores):
    rows = len(candidates) if isinstance(candidates[0], list) else 1
    path = out(case)
    groups = {i: f"class {i % 2}" for i in range(10)}
    written = plots.plot_influence_graph(list(range(rows)), candidates, scores, path, train_groups=groups, top_n=5)
    assert_png(written, path)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"scores": torch.zeros(2, 4)}, "scores"),
        ({"test_indices": [0, 1, 2]}, "test_indices"),
        ({"test_groups": [0]}, "test_groups"),
        ({"train_groups": [0, 1]}, "train_groups"),
        ({"top_n": 0}, "top_n"),
        ({"normalize": "row"}, "normalize"),
        ({"path": "graph.pdf"}, "path"),
        ({"candidate_indices": torch.zeros(2, 3, 1)}, "candidate_indices"),
    ],
)
def test_influence_graph_errors_name_the_argument(tmp_path, kwargs, argument):
    args = {
        "test_indices": [0, 1],
        "candidate_indices": torch.tensor([[0, 5, 9], [1, 2, 3]]),
        "scores": torch.tensor([[1.0, -1.0, 0.5], [0.2, -0.3, 0.1]]),
        "path": tmp_path / "graph.png",
    }
    args.update(kwargs)
    path = args.pop("path")
    with pytest.raises(ValueError, match=argument):
        plots.plot_influence_graph(
            args.pop("test_indices"), args.pop("candidate_indices"), args.pop("scores"), path, **args
        )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "images"),
    [
        ("nhw", torch.rand(5, 8, 8)),
        ("n1hw", torch.rand(3, 1, 8, 8)),
        ("flat_digits", torch.rand(12, 64) * 16),
        ("rgb", torch.rand(4, 3, 6, 6)),
        ("list", [torch.rand(8, 8) for _ in range(2)]),
        ("single", torch.rand(1, 8, 8)),
    ],
)
def test_examples_grid(out, case, images):
    path = out(case)
    n = len(images)
    assert_png(plots.plot_examples_grid(images, path, titles=[f"#{i}" for i in range(n)], title="top helpful"), path)


def test_examples_grid_rows_and_errors(out, tmp_path):
    path = out("rows")
    assert_png(plots.plot_examples_grid(torch.rand(7, 8, 8), path, rows=3), path)
    with pytest.raises(ValueError, match="titles"):
        plots.plot_examples_grid(torch.rand(3, 8, 8), tmp_path / "x.png", titles=["a"])
    with pytest.raises(ValueError, match="images"):
        plots.plot_examples_grid(torch.rand(3, 10), tmp_path / "x.png")  # 10 is not a square
    with pytest.raises(ValueError, match="images"):
        plots.plot_examples_grid([torch.rand(8, 8), torch.rand(4, 4)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="rows"):
        plots.plot_examples_grid(torch.rand(3, 8, 8), tmp_path / "x.png", rows=0)


def test_explanation_on_digits(out):
    path = out("explanation")
    written = plots.plot_explanation(
        torch.rand(64) * 16,
        "test #5: label 3, predicted 8",
        torch.rand(5, 64) * 16,
        torch.tensor([0.9, 0.5, 0.3, 0.2, 0.1]),
        torch.rand(2, 8, 8) * 16,
        [-0.7, -0.4],
        path,
        helpful_titles=[f"#{i} y=3" for i in range(5)],
        harmful_titles=["#8 y=8", "#9 y=8"],
    )
    assert_png(written, path)


def test_explanation_without_harmful_points(out):
    path = out("no_harmful")
    assert_png(plots.plot_explanation(torch.rand(8, 8), "test", torch.rand(2, 8, 8), [0.2, 0.1], [], [], path), path)


def test_explanation_errors(tmp_path):
    with pytest.raises(ValueError, match="helpful_scores"):
        plots.plot_explanation(torch.rand(8, 8), "t", torch.rand(2, 8, 8), [0.1], [], [], tmp_path / "x.png")
    with pytest.raises(ValueError, match="harmful_images"):
        plots.plot_explanation(torch.rand(8, 8), "t", [], [], torch.rand(1, 4, 4), [-0.1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="harmful_titles"):
        plots.plot_explanation(
            torch.rand(8, 8), "t", [], [], torch.rand(1, 8, 8), [-0.1], tmp_path / "x.png", harmful_titles=[]
        )
    with pytest.raises(ValueError, match="test_image"):
        plots.plot_explanation(torch.rand(1, 1, 8, 8), "t", [], [], [], [], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------------------------------
# Correction, self-influence, recall, sweeps
# ---------------------------------------------------------------------------------------------------------------------


def test_accuracy_bars(out, tmp_path):
    path = out("bars")
    written = plots.plot_accuracy_bars(
        ["helpful", "harmful", "random"], 0.81, [0.83, 0.79, 0.815], path, errors=[0.01, 0.02, 0.005]
    )
    assert_png(written, path)
    path = out("bars_percent")
    assert_png(plots.plot_accuracy_bars(["a"], [80.0], [82.5], path, errors_before=[0.5]), path)
    with pytest.raises(ValueError, match="after"):
        plots.plot_accuracy_bars(["helpful", "random"], 0.8, [0.8], tmp_path / "x.png")
    with pytest.raises(ValueError, match="before"):
        plots.plot_accuracy_bars(["helpful", "random"], [0.8, 0.8, 0.8], [0.8, 0.8], tmp_path / "x.png")
    with pytest.raises(ValueError, match="errors"):
        plots.plot_accuracy_bars(["helpful"], 0.8, [0.8], tmp_path / "x.png", errors=[0.1, 0.2])


def test_accuracy_history(out, tmp_path):
    history = [
        {"moment": "epoch_end", "selection": "helpful", "epoch": 1, "accuracy_before": 0.90, "accuracy_after": 0.93},
        {"moment": "epoch_end", "selection": "helpful", "epoch": 2, "accuracy_before": None, "accuracy_after": None},
        {"moment": "fit_end", "selection": "helpful", "epoch": None, "accuracy_before": 0.95, "accuracy_after": 0.94},
    ]
    path = out("history")
    assert_png(plots.plot_accuracy_history(history, path), path)
    path = out("history_single")
    assert_png(plots.plot_accuracy_history(history[:1], path), path)
    with pytest.raises(ValueError, match="history"):
        plots.plot_accuracy_history(history[1:2], tmp_path / "x.png")
    with pytest.raises(TypeError, match="history"):
        plots.plot_accuracy_history({"accuracy_before": 0.5}, tmp_path / "x.png")


@pytest.mark.parametrize("flagged", [None, [1, 5, 40], "mask"])
def test_self_influence(out, flagged):
    scores = torch.rand(80, generator=torch.Generator().manual_seed(0)) ** 3 * 50
    if flagged == "mask":
        flagged = scores > 30
    path = out(f"self_{'none' if flagged is None else len(flagged)}")
    assert_png(plots.plot_self_influence(scores, path, flagged=flagged, top_fraction=0.2), path)


def test_self_influence_with_negative_scores(out):
    path = out("self_signed")
    assert_png(plots.plot_self_influence(torch.linspace(-1, 1, 20), path, flagged=torch.tensor([0, 19])), path)


def test_recall_curve(out, tmp_path):
    path = out("recall")
    written = plots.plot_recall_curve(
        [10, 100, 1000], [0.3, 0.8, 1.0], path, random_baseline=1000, spread=[0.1, 0.05, 0.0]
    )
    assert_png(written, path)
    path = out("recall_many")
    curves = {"text model": [0.2, 0.6, 1.0], "digits model": [0.4, 0.9, 1.0]}
    assert_png(plots.plot_recall_curve([10, 100, 1000], curves, path, random_baseline=[0.01, 0.1, 1.0]), path)
    with pytest.raises(ValueError, match="ks"):
        plots.plot_recall_curve([0, 10], [0.1, 0.2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="recalls"):
        plots.plot_recall_curve([1, 10], [0.1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="random_baseline"):
        plots.plot_recall_curve([1, 10], [0.1, 0.2], tmp_path / "x.png", random_baseline=[0.1])


def test_sweep(out, tmp_path):
    path = out("sweep")
    written = plots.plot_sweep(
        [1e-4, 1e-3, 1e-2],
        {"relative error": [float("inf"), 0.2, 0.05], "spearman": [0.2, 0.9, 0.95]},
        path,
        xlabel="damping",
        ylabel="value",
        secondary={"seconds": [3.0, 2.0, 1.0]},
        secondary_label="seconds",
        title="damping sweep",
    )
    assert_png(written, path)
    path = out("sweep_linear")
    assert_png(plots.plot_sweep([0, 1, 2], {"a": [1, 2, 3]}, path, xlabel="x", ylabel="y", logx=False, logy=True), path)
    with pytest.raises(ValueError, match="xs"):
        plots.plot_sweep([0, 1], {"a": [1, 2]}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match=r"series\['b'\]"):
        plots.plot_sweep([1, 2], {"a": [1, 2], "b": [1]}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="series"):
        plots.plot_sweep([1, 2], {}, tmp_path / "x.png", xlabel="x", ylabel="y")


def test_missing_matplotlib_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_examples_grid(torch.rand(2, 8, 8), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic_and_readable(out):
    path = out("again")
    plots.plot_examples_grid(torch.rand(2, 8, 8), path)
    first = path.read_bytes()
    plots.plot_examples_grid(torch.rand(3, 8, 8), path)
    assert path.read_bytes() != first
    assert_png(path, path)
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, unlike mkstemp's 0600


# ---------------------------------------------------------------------------------------------------------------------
# Every public plot function
# ---------------------------------------------------------------------------------------------------------------------

# One small call per public plot function; the test below it fails when a plot function is added without a case.
PLOT_CASES = {
    "plot_influence_graph": lambda p: plots.plot_influence_graph(
        [0, 1], [[0, 1, 2], [1, 2, 3]], [[0.5, -0.2, 0.1], [0.3, 0.4, -0.9]], p
    ),
    "plot_examples_grid": lambda p: plots.plot_examples_grid(torch.rand(4, 8, 8), p),
    "plot_explanation": lambda p: plots.plot_explanation(
        torch.rand(8, 8), "test", torch.rand(2, 8, 8), [0.2, 0.1], torch.rand(1, 8, 8), [-0.3], p
    ),
    "plot_accuracy_bars": lambda p: plots.plot_accuracy_bars(["helpful", "random"], 0.8, [0.85, 0.79], p),
    "plot_accuracy_history": lambda p: plots.plot_accuracy_history(
        [{"epoch": 0, "accuracy_before": 0.8, "accuracy_after": 0.82}], p
    ),
    "plot_self_influence": lambda p: plots.plot_self_influence(torch.arange(10.0), p, flagged=[9]),
    "plot_recall_curve": lambda p: plots.plot_recall_curve([1, 10], [0.4, 0.9], p, random_baseline=10),
    "plot_sweep": lambda p: plots.plot_sweep([0.1, 1.0], {"error": [0.3, 0.1]}, p, xlabel="damping", ylabel="error"),
}


def test_every_public_plot_function_has_a_case():
    public = {name for name in plots.__all__ if callable(getattr(plots, name))}
    assert public == set(PLOT_CASES)


@pytest.mark.parametrize("name", sorted(PLOT_CASES))
def test_every_public_plot_writes_a_png_that_loads(out, name):
    path = out(name)
    assert_png(PLOT_CASES[name](path), path)
    assert path.stat().st_size > 0


def test_old_viz_module_still_imports_every_name():
    import sys

    from lightning_fastif.app import text_explanations
    from lightning_fastif.metrics import mislabel_detection

    sys.modules.pop("lightning_fastif.viz", None)
    with pytest.warns(DeprecationWarning, match="lightning_fastif.viz moved"):
        viz = importlib.import_module("lightning_fastif.viz")

    assert viz.plot_influence_graph is plots.plot_influence_graph
    assert viz.text_explanation_blocks is text_explanations.text_explanation_blocks
    assert viz.mislabel_detection is mislabel_detection
    assert set(plots.__all__) | set(text_explanations.__all__) <= set(dir(viz))
