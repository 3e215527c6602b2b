"""The app's data-augmentation step (``experiment=augmentation``): influence-chosen vs random unseen pool examples.

FastIF's fourth application: after training, fine-tune on examples of a pool the model never trained on, chosen by
influence on anchors of the target distribution, and compare with random pool examples from the same weights
(:func:`~lightning_fastif.lightning.correction.compare_selections` with a
:class:`~lightning_fastif.CandidatePool`). The config node ``augmentation`` names the splits: ``anchors`` and
``eval`` of the job's datamodule, ``pool`` of ``pool_data`` (a datamodule node; null: the job's own). Its pool is
indexed by its features under the trained weights, made as the ``FeatureSnapshot``'s training features were.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_fastif.app.config import build
from lightning_fastif.errors import ArgumentError

__all__ = ["SELECTIONS", "augmentation_section", "run_augmentation"]

SELECTIONS = ("helpful", "random")
"""Influence-chosen pool examples, and random pool examples (the same steps)."""


def _split(datamodule: Any, split: str, key: str) -> Any:
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is None:
        datamodule.setup("test")
        dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ArgumentError(
            f"{key}: expected a split whose non-empty dataset {type(datamodule).__name__} holds after setup() (the "
            f"attribute {split}_dataset), got {split!r}"
        )
    return dataset


def run_augmentation(
    cfg: Any, model: Any, datamodule: Any, train_dataset: Any, snapshot: str | None, out: Path
) -> dict[str, Any]:
    """Compare influence-chosen and random pool examples from ``model``'s weights; write ``augmentation.json``.

    Args:
        cfg: the composed config, with an ``augmentation`` node.
        model: the trained model (not modified: every run starts from a copy).
        datamodule: the job's datamodule (set up).
        train_dataset: the training set influence is taken over.
        snapshot: the FeatureSnapshot directory (kNN candidates), or None with ``influence.num_candidates=null``.
        out: the job's output directory.

    Returns:
        ``{"pool_size", "pool_split", "anchors", "eval", "seeds", "margin", "selections": {name: {...}}}``; a
        selection holds ``before``, ``gain_mean``, ``gain_std``, ``kept_fraction``, ``lrs``, and per seed the pool
        indices trained on (``used_indices``) and why the steps ended early (``stopped``, None when they did not).

    Raises:
        ArgumentError: a split the datamodule does not hold (the message names the ``augmentation`` key).

    Example::

        >>> run_augmentation(cfg, model, dm, dm.train_dataset, "runs/snapshot", Path("runs"))  # doctest: +SKIP
    """
    from lightning_fastif.lightning.candidates import CandidatePool, embed_pool
    from lightning_fastif.lightning.correction import compare_selections

    node = cfg.augmentation
    anchors = _split(datamodule, node.anchors, "augmentation.anchors")
    evaluated = _split(datamodule, node.eval, "augmentation.eval")
    source = datamodule
    if node.get("pool_data") is not None:
        source = build(node.pool_data)
        source.setup("fit")
    pool_data = _split(source, node.pool, "augmentation.pool")

    def make_influence(m: Any) -> Any:
        return build(cfg.influence, model=m, train_dataset=train_dataset, snapshot=snapshot, output_dir=None)

    influence = make_influence(model)
    pool = CandidatePool(pool_data) if influence.num_candidates is None else embed_pool(influence, pool_data)
    table = compare_selections(
        model,
        anchors,
        evaluated,
        make_influence=make_influence,
        selections=SELECTIONS,
        seeds=list(node.seeds),
        steps=build(node.steps),
        keep=node.keep,
        pool=pool,
    )
    selections = {
        name: {
            "metric": row["metric"],
            "before": row["before"],
            "gain_mean": row["gain_mean"],
            "gain_std": row["gain_std"],
            "kept_fraction": row["kept_fraction"],
            "lrs": [run["lr"] for run in row["runs"]],
            "used_indices": [run["used_indices"] for run in row["runs"]],
            "stopped": [run["stopped"] for run in row["runs"]],
        }
        for name, row in table.items()
    }
    summary = {
        "pool_split": node.pool,
        "pool_size": len(pool_data),
        "anchors": node.anchors,
        "eval": node.eval,
        "seeds": list(node.seeds),
        "margin": selections["helpful"]["gain_mean"] - selections["random"]["gain_mean"],
        "selections": selections,
    }
    (out / "augmentation.json").write_text(json.dumps(summary, indent=2))
    return summary


def augmentation_section(report: Any, summary: dict[str, Any]) -> None:
    """The report's section: the held-out gain of influence-chosen and random pool examples.

    Example::

        >>> augmentation_section(report, summary["augmentation"])  # doctest: +SKIP
    """
    rows = summary["selections"]
    report.add_heading("Data augmentation from an unseen pool", level=2)
    report.add_paragraph(
        f"Fine-tuning on {summary['pool_split']!r} examples the model never trained on ({summary['pool_size']} in "
        f"the pool), chosen by influence on anchors of {summary['anchors']!r} or at random, from the trained weights; "
        f"the gain is measured on {summary['eval']!r}. Influence-chosen - random: "
        f"{100 * summary['margin']:+.1f} points over {len(summary['seeds'])} seed(s)."
    )
    report.add_table(
        ["pool examples", f"{rows['helpful']['metric']} before", "held-out gain (mean ± std)", "kept", "lr"],
        [
            [
                "influence-chosen" if name == "helpful" else "random",
                round(row["before"], 4),
                f"{100 * row['gain_mean']:+.1f} ± {100 * row['gain_std']:.1f}",
                f"{100 * row['kept_fraction']:.0f}%",
                ", ".join(f"{lr:g}" for lr in row["lrs"]),
            ]
            for name, row in rows.items()
        ],
    )
