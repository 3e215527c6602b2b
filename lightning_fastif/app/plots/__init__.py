"""Plots of influence results. **Positive score = helpful** (it lowered the test loss).

Every plot function takes plain tensors, arrays or lists (no Lightning object), writes one PNG atomically (a
temporary file in the same directory, then ``os.replace``) and returns its path. One colour code throughout:
helpful in blue, harmful in vermillion (the Okabe-Ito pair, readable with the common colour-vision deficiencies),
random baselines in grey.

* :func:`plot_influence_graph` (:mod:`.graph`): FastIF's visualisation, a bipartite graph from training points
  to test points.
* :func:`plot_examples_grid`, :func:`plot_explanation` (:mod:`.examples`): examples shown as what they are (images).
* :mod:`.curves`: :func:`plot_accuracy_bars`, :func:`plot_accuracy_history` (accuracy before and after error
  correction), :func:`plot_self_influence` (finding flipped labels; the numbers are
  :func:`lightning_fastif.metrics.mislabel_detection`), :func:`plot_recall_curve` (recall of the full-influence top
  points among the k nearest neighbours), :func:`plot_sweep` (a quantity against a setting: damping, depth ...).

Text examples are shown as Markdown instead: :mod:`lightning_fastif.app.text_explanations`.

matplotlib is an optional dependency (``pip install matplotlib``, part of the ``app`` extra). It is imported inside
each plot function, and figures are built on :class:`matplotlib.figure.Figure` (:mod:`.figure`), which renders with
Agg and touches no pyplot global state: plotting works headless, on any rank, and never changes the user's backend.
"""

from lightning_fastif.app.plots.curves import (
    plot_accuracy_bars,
    plot_accuracy_history,
    plot_recall_curve,
    plot_self_influence,
    plot_sweep,
)
from lightning_fastif.app.plots.examples import plot_examples_grid, plot_explanation
from lightning_fastif.app.plots.figure import HARMFUL_COLOR, HELPFUL_COLOR, RANDOM_COLOR
from lightning_fastif.app.plots.graph import plot_influence_graph

__all__ = [
    "HARMFUL_COLOR",
    "HELPFUL_COLOR",
    "RANDOM_COLOR",
    "plot_accuracy_bars",
    "plot_accuracy_history",
    "plot_examples_grid",
    "plot_explanation",
    "plot_influence_graph",
    "plot_recall_curve",
    "plot_self_influence",
    "plot_sweep",
]
