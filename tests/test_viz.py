"""Plots write readable PNGs atomically from plain tensors; bad input names its argument; text explanations escape."""

from __future__ import annotations

import sys

import pytest
import torch

from lightning_fastif.app import viz

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
    edges = viz._graph_edges(candidates, scores, top_n=1, normalize="per_test")
    # Row 0: top helpful is 0 (3.0), top harmful is 3 (-4.0); the zero score is neither.
    # Row 1: the NaN and the padded -1 are skipped; top helpful 5 (1.0), top harmful 7 (-0.5).
    assert [(t, j, s) for t, j, s, _ in edges] == [(0, 0, 3.0), (0, 3, -4.0), (1, 5, 1.0), (1, 7, -0.5)]
    assert [w for *_, w in edges] == pytest.approx([0.75, 1.0, 1.0, 0.5])
    glob = viz._graph_edges(candidates, scores, top_n=1, normalize="global")
    assert [w for *_, w in glob] == pytest.approx([0.75, 1.0, 0.25, 0.125])
    # K < top_n: every candidate of a sign is kept.
    assert len(viz._graph_edges(candidates, scores, top_n=10, normalize="global")) == 4 + 3


def test_training_point_sits_between_the_test_points_it_influences():
    test_xy = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # Point 7 influences test points 0 and 1 equally (opposite on the circle), point 9 only test point 2.
    edges = [(0, 7, 1.0, 1.0), (1, 7, -1.0, 1.0), (2, 9, 0.5, 1.0)]
    nodes, xy, weight = viz._train_layout(edges, test_xy)
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
    written = viz.plot_influence_graph(
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
    written = viz.plot_influence_graph(list(range(rows)), candidates, scores, path, train_groups=groups, top_n=5)
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
        viz.plot_influence_graph(
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
    assert_png(viz.plot_examples_grid(images, path, titles=[f"#{i}" for i in range(n)], title="top helpful"), path)


def test_examples_grid_rows_and_errors(out, tmp_path):
    path = out("rows")
    assert_png(viz.plot_examples_grid(torch.rand(7, 8, 8), path, rows=3), path)
    with pytest.raises(ValueError, match="titles"):
        viz.plot_examples_grid(torch.rand(3, 8, 8), tmp_path / "x.png", titles=["a"])
    with pytest.raises(ValueError, match="images"):
        viz.plot_examples_grid(torch.rand(3, 10), tmp_path / "x.png")  # 10 is not a square
    with pytest.raises(ValueError, match="images"):
        viz.plot_examples_grid([torch.rand(8, 8), torch.rand(4, 4)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="rows"):
        viz.plot_examples_grid(torch.rand(3, 8, 8), tmp_path / "x.png", rows=0)


def test_explanation_on_digits(out):
    path = out("explanation")
    written = viz.plot_explanation(
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
    assert_png(viz.plot_explanation(torch.rand(8, 8), "test", torch.rand(2, 8, 8), [0.2, 0.1], [], [], path), path)


def test_explanation_errors(tmp_path):
    with pytest.raises(ValueError, match="helpful_scores"):
        viz.plot_explanation(torch.rand(8, 8), "t", torch.rand(2, 8, 8), [0.1], [], [], tmp_path / "x.png")
    with pytest.raises(ValueError, match="harmful_images"):
        viz.plot_explanation(torch.rand(8, 8), "t", [], [], torch.rand(1, 4, 4), [-0.1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="harmful_titles"):
        viz.plot_explanation(
            torch.rand(8, 8), "t", [], [], torch.rand(1, 8, 8), [-0.1], tmp_path / "x.png", harmful_titles=[]
        )
    with pytest.raises(ValueError, match="test_image"):
        viz.plot_explanation(torch.rand(1, 1, 8, 8), "t", [], [], [], [], tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------------------------------
# Correction, self-influence, recall, sweeps
# ---------------------------------------------------------------------------------------------------------------------


def test_accuracy_bars(out, tmp_path):
    path = out("bars")
    written = viz.plot_accuracy_bars(
        ["helpful", "harmful", "random"], 0.81, [0.83, 0.79, 0.815], path, errors=[0.01, 0.02, 0.005]
    )
    assert_png(written, path)
    path = out("bars_percent")
    assert_png(viz.plot_accuracy_bars(["a"], [80.0], [82.5], path, errors_before=[0.5]), path)
    with pytest.raises(ValueError, match="after"):
        viz.plot_accuracy_bars(["helpful", "random"], 0.8, [0.8], tmp_path / "x.png")
    with pytest.raises(ValueError, match="before"):
        viz.plot_accuracy_bars(["helpful", "random"], [0.8, 0.8, 0.8], [0.8, 0.8], tmp_path / "x.png")
    with pytest.raises(ValueError, match="errors"):
        viz.plot_accuracy_bars(["helpful"], 0.8, [0.8], tmp_path / "x.png", errors=[0.1, 0.2])


def test_accuracy_history(out, tmp_path):
    history = [
        {"moment": "epoch_end", "selection": "helpful", "epoch": 1, "accuracy_before": 0.90, "accuracy_after": 0.93},
        {"moment": "epoch_end", "selection": "helpful", "epoch": 2, "accuracy_before": None, "accuracy_after": None},
        {"moment": "fit_end", "selection": "helpful", "epoch": None, "accuracy_before": 0.95, "accuracy_after": 0.94},
    ]
    path = out("history")
    assert_png(viz.plot_accuracy_history(history, path), path)
    path = out("history_single")
    assert_png(viz.plot_accuracy_history(history[:1], path), path)
    with pytest.raises(ValueError, match="history"):
        viz.plot_accuracy_history(history[1:2], tmp_path / "x.png")
    with pytest.raises(TypeError, match="history"):
        viz.plot_accuracy_history({"accuracy_before": 0.5}, tmp_path / "x.png")


def test_mislabel_detection_counts():
    scores = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 0.5, 0.1, 0.2, 0.3])
    flipped = [0, 2, 7]  # two of them rank first and second; 7 ranks last
    stats = viz.mislabel_detection(scores, flipped, top_fraction=0.3)
    assert stats == {
        "inspected": 3,
        "flagged": 3,
        "found": 2,
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "random_recall": pytest.approx(0.3),
    }
    mask = torch.zeros(10, dtype=torch.bool)
    mask[flipped] = True
    assert viz.mislabel_detection(scores, mask, top_fraction=0.3) == stats
    with pytest.raises(ValueError, match="flagged"):
        viz.mislabel_detection(scores, [10])
    with pytest.raises(ValueError, match="flagged"):
        viz.mislabel_detection(scores, torch.ones(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="top_fraction"):
        viz.mislabel_detection(scores, flipped, top_fraction=0)
    with pytest.raises(ValueError, match="scores"):
        viz.mislabel_detection(torch.tensor([1.0, float("nan")]), [0])


@pytest.mark.parametrize("flagged", [None, [1, 5, 40], "mask"])
def test_self_influence(out, flagged):
    scores = torch.rand(80, generator=torch.Generator().manual_seed(0)) ** 3 * 50
    if flagged == "mask":
        flagged = scores > 30
    path = out(f"self_{'none' if flagged is None else len(flagged)}")
    assert_png(viz.plot_self_influence(scores, path, flagged=flagged, top_fraction=0.2), path)


def test_self_influence_with_negative_scores(out):
    path = out("self_signed")
    assert_png(viz.plot_self_influence(torch.linspace(-1, 1, 20), path, flagged=torch.tensor([0, 19])), path)


def test_recall_curve(out, tmp_path):
    path = out("recall")
    written = viz.plot_recall_curve(
        [10, 100, 1000], [0.3, 0.8, 1.0], path, random_baseline=1000, spread=[0.1, 0.05, 0.0]
    )
    assert_png(written, path)
    path = out("recall_many")
    curves = {"text model": [0.2, 0.6, 1.0], "digits model": [0.4, 0.9, 1.0]}
    assert_png(viz.plot_recall_curve([10, 100, 1000], curves, path, random_baseline=[0.01, 0.1, 1.0]), path)
    with pytest.raises(ValueError, match="ks"):
        viz.plot_recall_curve([0, 10], [0.1, 0.2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="recalls"):
        viz.plot_recall_curve([1, 10], [0.1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="random_baseline"):
        viz.plot_recall_curve([1, 10], [0.1, 0.2], tmp_path / "x.png", random_baseline=[0.1])


def test_sweep(out, tmp_path):
    path = out("sweep")
    written = viz.plot_sweep(
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
    assert_png(viz.plot_sweep([0, 1, 2], {"a": [1, 2, 3]}, path, xlabel="x", ylabel="y", logx=False, logy=True), path)
    with pytest.raises(ValueError, match="xs"):
        viz.plot_sweep([0, 1], {"a": [1, 2]}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match=r"series\['b'\]"):
        viz.plot_sweep([1, 2], {"a": [1, 2], "b": [1]}, tmp_path / "x.png", xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="series"):
        viz.plot_sweep([1, 2], {}, tmp_path / "x.png", xlabel="x", ylabel="y")


def test_missing_matplotlib_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        viz.plot_examples_grid(torch.rand(2, 8, 8), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic_and_readable(out):
    path = out("again")
    viz.plot_examples_grid(torch.rand(2, 8, 8), path)
    first = path.read_bytes()
    viz.plot_examples_grid(torch.rand(3, 8, 8), path)
    assert path.read_bytes() != first
    assert_png(path, path)
    assert path.stat().st_mode & 0o044 == 0o044  # readable by others, unlike mkstemp's 0600


# ---------------------------------------------------------------------------------------------------------------------
# Text explanations
# ---------------------------------------------------------------------------------------------------------------------


def test_shorten_text():
    assert viz.shorten_text("short", 10) == "short"
    long = "word " * 100
    cut = viz.shorten_text(long, 50)
    assert len(cut) <= 50
    assert cut.endswith("word…")
    assert viz.shorten_text("x" * 80, 20) == "x" * 19 + "…"  # one long token: cut inside it
    assert viz.shorten_text("It&#039;s<br /><br />fine", 50) == "It's fine"
    with pytest.raises(ValueError, match="max_chars"):
        viz.shorten_text("a", 0)


def test_format_text_explanation_escapes_and_truncates():
    helpful = [("Slow | dull *plot*", "negative", 0.42, 17), ("Boring.\nVery.", "negative", torch.tensor(0.1), 3)]
    harmful = [("Great <b>acting</b> " * 40, "positive", -0.25, 99)]
    md = viz.format_text_explanation("A | bad_film", 0, 1, helpful, harmful, heading="Review 12", max_chars=60)
    lines = md.splitlines()
    assert lines[0] == "### Review 12"
    assert "> A \\| bad\\_film" in lines
    assert "| rank | influence | label | train index | text |" in lines
    assert "| 1 | +0.42 | negative | 17 | Slow \\| dull \\*plot\\* |" in lines
    assert "| 2 | +0.1 | negative | 3 | Boring. Very. |" in lines
    # Every table row has exactly the columns' cells: no unescaped | inside a cell.
    for line in lines:
        if line.startswith("|"):
            assert line.replace("\\|", "").count("|") == 6
    harmful_row = next(line for line in lines if "| -0.25 |" in line)
    assert "…" in harmful_row
    assert len(harmful_row) < 120
    assert "(misclassified)" in md


def test_text_explanation_without_candidates_and_bad_entries():
    md = viz.format_text_explanation("fine", "pos", "pos", [], [])
    assert "No helpful training example" in md
    assert "(correct)" in md
    with pytest.raises(ValueError, match=r"helpful\[0\]"):
        viz.format_text_explanation("t", 0, 0, [("text", 0)], [])
    with pytest.raises(ValueError, match=r"harmful\[1\]"):
        viz.format_text_explanation("t", 0, 0, [], [("a", 0, -1.0), ("b", 0, "high")])
