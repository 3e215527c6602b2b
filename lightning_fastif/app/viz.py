"""The old home of the plots and text explanations; every name still imports from here.

The module was split by concept: plots are in :mod:`lightning_fastif.app.plots`, text explanations in
:mod:`lightning_fastif.app.text_explanations` and :func:`mislabel_detection` in :mod:`lightning_fastif.metrics`.
``lightning_fastif.viz`` (the path before the layer folders) points here too.
"""

from lightning_fastif.app.plots import (
    HARMFUL_COLOR,
    HELPFUL_COLOR,
    RANDOM_COLOR,
    plot_accuracy_bars,
    plot_accuracy_history,
    plot_examples_grid,
    plot_explanation,
    plot_influence_graph,
    plot_recall_curve,
    plot_self_influence,
    plot_sweep,
)
from lightning_fastif.app.text_explanations import format_text_explanation, shorten_text, text_explanation_blocks
from lightning_fastif.metrics import mislabel_detection

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
