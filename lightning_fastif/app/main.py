"""The Hydra application: ``python -m lightning_fastif`` (or ``fastif``) runs the whole story on its built-in default.

1. Train a model (digits CNN by default) with ``FeatureSnapshot``, ``CheckpointSnapshot`` and ``ErrorCorrection``.
2. Explain the misclassified examples of ``splits.explain`` (the test split): their most helpful and most harmful
   training points (FastIF: kNN candidates + LiSSA + JVP scoring, through ``trainer.predict(InfluenceModule(...))``).
3. Find likely mislabelled training points by self-influence (the default data flips 5% of training labels).
4. Check the estimator against exact influence on a small slice of the model (``report.verify``).
5. Write a report directory: ``report.md``/``index.html``, PNG plots and the result files.

The configuration is the YAML shipped in ``lightning_fastif/app/configs`` (``pkg://lightning_fastif.app.configs``);
every object is built from its node by :func:`~lightning_fastif.app.config.build`, after the whole config, the model
and the datamodule are checked (:mod:`lightning_fastif.app.validate`). Your own model and data: docs/APP.md.

Examples::

    python -m lightning_fastif                                   # digits, a few minutes on 2 CPU cores
    python -m lightning_fastif experiment=smoke                  # tiny settings (CI)
    python -m lightning_fastif experiment=correction             # error correction on a planted cue
    python -m lightning_fastif experiment=augmentation           # influence-chosen vs random unseen pool examples
    python -m lightning_fastif influence/ihvp=cg influence.num_candidates=50
    python -m lightning_fastif trainer.devices=2 trainer.strategy=ddp
    python -m lightning_fastif -m influence.ihvp.damping=0.001,0.01,0.1
    python -m lightning_fastif hydra.searchpath=[file:///abs/my_configs] data=mine model=mine

The library never reads Hydra's working directory: this app passes ``output_dir`` (Hydra's run directory by
default) to the Trainer as ``default_root_dir``, and every rank of a DDP run shares it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from lightning_fastif.app.config import CONFIG_NAME, CONFIG_PATH, build, locate
from lightning_fastif.app.data.labels import dataset_labels
from lightning_fastif.app.validate import check_datamodule, check_model, validate_config
from lightning_fastif.errors import ArgumentError

log = logging.getLogger("lightning_fastif")


def run(cfg: Any) -> dict[str, Any]:
    """Run the main job for a composed config; returns a summary (also written to ``summary.json``).

    Args:
        cfg: the composed config (``compose("fastif", ...)`` of ``lightning_fastif.app.configs``).

    Returns:
        The summary on rank 0 (test accuracy, explained indices, timings, the report's path); ``{}`` on other ranks.

    Raises:
        ArgumentError: a bad config value, or a model or datamodule lacking what the app needs, before training.

    Example::

        >>> from hydra import compose, initialize_config_module  # doctest: +SKIP
        >>> from lightning_fastif.app.config import CONFIG_MODULE
        >>> with initialize_config_module(CONFIG_MODULE, version_base=None):  # doctest: +SKIP
        ...     summary = run(compose("fastif", overrides=["experiment=smoke", "output_dir=runs/smoke"]))
    """
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_fastif.io.results import InfluenceResult
    from lightning_fastif.lightning.correction import accuracy, misclassified_indices

    started = time.perf_counter()
    out = _output_dir(cfg)
    validate_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    model = build(cfg.model)
    datasets = check_datamodule(datamodule, cfg)
    collate = _collate_of(datamodule)
    check_model(model, datasets, cfg, collate)
    callbacks = _callbacks(cfg, out, datasets)
    snapshot = _snapshot_dir(cfg, callbacks)
    correction = None
    if cfg.get("correction") is not None:
        runtime = {"eval_dataset": datasets["eval"], **_unset(cfg.correction, dirpath=str(out / "correction"))}
        if "anchors" in datasets:
            runtime["anchors"] = datasets["anchors"]
        correction = build(cfg.correction, **runtime)
        callbacks.append(correction)
    logger = build(cfg.logger, save_dir=str(out)) if cfg.get("logger") is not None else False
    trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(out))
    trainer.fit(model, datamodule=datamodule)
    if cfg.mode == "verify":
        return _verify_only(cfg, trainer, model, datasets, collate, out)

    # Explain the misclassified examples with FastIF's influence, under the same Trainer (and strategy).
    explain = datasets["explain"]
    wrong = misclassified_indices(model, explain)
    explained = wrong[: cfg.report.max_test_points]
    if explained.numel() == 0:  # a perfect model: explain the first examples instead
        explained = torch.arange(min(cfg.report.max_test_points, len(explain)))
    influence_dir = Path(cfg.influence.output_dir or out / "influence")
    influence = build(
        cfg.influence,
        model=model,
        train_dataset=datasets["train"],
        **_unset(cfg.influence, snapshot=snapshot, output_dir=str(influence_dir)),
    )
    loader = DataLoader(_IndexedSubset(explain, explained.tolist()), batch_size=4, collate_fn=collate)
    trainer.predict(influence, loader, return_predictions=False)
    if not trainer.is_global_zero:
        return {}

    result = InfluenceResult.load(influence_dir)
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "test_accuracy": accuracy(model, explain),
        "num_misclassified": int(wrong.numel()),
        "explained_test_indices": explained[result.test_indices].tolist(),
        "ihvp": cfg.influence.ihvp._target_,
        "num_candidates": cfg.influence.num_candidates,
        "influence_seconds": result.manifest.get("timings", {}),
    }
    history = correction.history if correction is not None else []
    if history:
        summary["correction"] = [
            {
                **{k: h.get(k) for k in ("moment", "selection", "accuracy_before", "accuracy_after", "gain", "kept")},
                **(
                    {"compared": h["comparison"]["selection"], "compared_gain": h["comparison"]["gain"]}
                    if h.get("comparison")
                    else {}
                ),
                "seconds": h.get("seconds"),
            }
            for h in history
        ]
    if cfg.get("augmentation") is not None:
        from lightning_fastif.app.augmentation import run_augmentation

        summary["augmentation"] = run_augmentation(cfg, model, datamodule, datasets["train"], snapshot, out)
    self_scores = _self_influence(cfg, model, datasets["train"])
    flipped = getattr(datamodule, "flipped_indices", None)
    if self_scores is not None and flipped is not None and len(flipped):
        top = self_scores.argsort(descending=True)[: max(1, len(self_scores) // 10)]
        flipped_set = set(torch.as_tensor(flipped).tolist())
        summary["mislabel_top10_fraction"] = sum(int(i) in flipped_set for i in top.tolist()) / len(top)
        summary["mislabel_random_fraction"] = len(flipped_set) / len(self_scores)

    verify_report = None
    if cfg.report.verify:
        from lightning_fastif.core.verify import verify

        verify_report = verify(
            model,
            _loss_fn(cfg),
            datasets["train"],
            collate([explain[i] for i in explained[:4].tolist()]),
            ihvp=build(cfg.influence.ihvp),
            num_train=cfg.report.verify_num_train,
            loo=cfg.report.verify_loo,
        )
        summary["verify"] = verify_report.to_dict()

    if cfg.report.enabled:
        summary["report"] = str(
            _write_report(
                out / "report",
                cfg=cfg,
                datamodule=datamodule,
                datasets=datasets,
                model=model,
                result=result,
                explained=explained,
                self_scores=self_scores,
                flipped=flipped,
                correction_history=history,
                verify_report=verify_report,
                summary=summary,
            )
        )
    summary["seconds"] = time.perf_counter() - started
    from lightning_fastif.io.atomic import atomic_write_bytes
    from lightning_fastif.io.results import jsonable

    atomic_write_bytes(out / "summary.json", json.dumps(jsonable(summary), indent=2).encode())
    log.info("results written to %s", out)
    return summary


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _correction_rows(entry: dict[str, Any]) -> list[list[Any]]:
    """The report's rows for one correction moment: the correction, then its comparison when one ran."""
    rows = []
    for h in (entry, entry.get("comparison")):
        if not h:
            continue
        held = f"{h['holdout_before']:.3f} → {h['holdout_after']:.3f}" if h.get("holdout_before") is not None else "n/a"
        rows.append(
            [
                entry["moment"],
                f"{h['selection']} ({sum(len(step['chosen_indices']) for step in h['steps'])})",
                h.get("metric_before"),
                h.get("metric_after"),
                _signed(h.get("gain")),
                held,
                h.get("kept"),
                h.get("lr"),
            ]
        )
    return rows


def _output_dir(cfg: Any) -> Path:
    """``output_dir``, else Hydra's run directory (under ``hydra.main``), else the working directory."""
    if cfg.output_dir is not None:
        return Path(cfg.output_dir).absolute()
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).absolute()
    return Path(os.getcwd()).absolute()


def _unset(node: Any, **values: Any) -> dict[str, Any]:
    """The ``values`` whose key the node leaves null: run-time defaults never override what the config sets."""
    return {key: value for key, value in values.items() if node.get(key) is None}


def _callbacks(cfg: Any, out: Path, datasets: dict[str, Any]) -> list[Any]:
    """The Trainer's callbacks from ``cfg.callbacks``; snapshots get ``<output_dir>/snapshot`` unless set."""
    from lightning_fastif.lightning.snapshots import CheckpointSnapshot, FeatureSnapshot

    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        runtime: dict[str, Any] = {}
        target = locate(node._target_, f"callbacks.{name}")
        if isinstance(target, type) and issubclass(target, (FeatureSnapshot, CheckpointSnapshot)):
            runtime.update(_unset(node, dirpath=str(out / "snapshot")))
        if isinstance(target, type) and issubclass(target, FeatureSnapshot) and node.get("datasets") is None:
            runtime["datasets"] = {cfg.splits.explain: datasets["explain"]}
        callbacks.append(build(node, **runtime))
    return callbacks


def _snapshot_dir(cfg: Any, callbacks: list[Any]) -> str | None:
    """The FeatureSnapshot's directory, which the influence module searches for candidates."""
    from lightning_fastif.lightning.snapshots import FeatureSnapshot

    dirs = [str(cb.dirpath) for cb in callbacks if isinstance(cb, FeatureSnapshot) and cb.dirpath is not None]
    needed = cfg.influence.num_candidates is not None or cfg.influence.checkpoints is not None
    if not dirs and cfg.influence.snapshot is None and needed:
        raise ArgumentError(
            f"influence.num_candidates: expected null (score every training point) when callbacks has no "
            f"FeatureSnapshot and influence.snapshot is null, got {cfg.influence.num_candidates!r}; keep "
            f"callbacks.feature_snapshot or set influence.snapshot"
        )
    return dirs[0] if dirs else None


def _loss_fn(cfg: Any) -> Any:
    node = cfg.influence.get("loss_fn")
    return None if node is None else build(node)


def _params(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    params = cfg.influence.params
    return OmegaConf.to_container(params) if OmegaConf.is_config(params) else params


def _self_influence(cfg: Any, model: torch.nn.Module, train: Any) -> torch.Tensor | None:
    """Self-influence of every training point (``report.self_influence``: identity, same or null to skip)."""
    from lightning_fastif.core.ihvp import Identity
    from lightning_fastif.core.influence import self_influence

    how = cfg.report.self_influence
    if how is None:
        return None
    ihvp = Identity() if how == "identity" else build(cfg.influence.ihvp)
    return self_influence(model, _loss_fn(cfg), train, ihvp=ihvp, params=_params(cfg))


def _verify_only(
    cfg: Any, trainer: Any, model: torch.nn.Module, datasets: dict[str, Any], collate: Any, out: Path
) -> dict[str, Any]:
    """``mode=verify``: check the configured estimator against exact influence on a slice of the trained model.

    Writes ``verify.json`` and prints the table; with ``-m influence.ihvp.damping=...`` each run of the sweep has its
    own ``verify.json`` (Pearson, Spearman, top-10 overlap, residual against damping).
    """
    from omegaconf import OmegaConf

    from lightning_fastif.core.verify import verify
    from lightning_fastif.io.atomic import atomic_write_bytes
    from lightning_fastif.io.results import jsonable

    if not trainer.is_global_zero:
        return {}
    explain = datasets["explain"]
    report = verify(
        model,
        _loss_fn(cfg),
        datasets["train"],
        collate([explain[i] for i in range(min(8, len(explain)))]),
        ihvp=build(cfg.influence.ihvp),
        params=_params(cfg),
        num_train=cfg.report.verify_num_train,
        loo=cfg.report.verify_loo,
        seed=cfg.seed,
    )
    print(report)
    summary = {"mode": "verify", "ihvp": OmegaConf.to_container(cfg.influence.ihvp), "verify": report.to_dict()}
    atomic_write_bytes(out / "verify.json", json.dumps(jsonable(summary), indent=2).encode())
    return summary


def render_mode(datamodule: Any) -> str:
    """How the report shows examples: ``"images"`` (``images_of``), ``"text"`` (``texts_of``) or ``"table"``.

    Example::

        >>> render_mode(object())
        'table'
    """
    if callable(getattr(datamodule, "images_of", None)):
        return "images"
    if callable(getattr(datamodule, "texts_of", None)):
        return "text"
    return "table"


def _write_report(
    dirpath: Path,
    *,
    cfg: Any,
    datamodule: Any,
    datasets: dict[str, Any],
    model: torch.nn.Module,
    result: Any,
    explained: torch.Tensor,
    self_scores: torch.Tensor | None,
    flipped: Any,
    correction_history: list[dict[str, Any]],
    verify_report: Any,
    summary: dict[str, Any],
) -> Path:
    """The report directory: ``report.md`` and ``index.html`` with the plots and a table per question."""
    from lightning_fastif.app import plots
    from lightning_fastif.app.report import Report

    dirpath.mkdir(parents=True, exist_ok=True)
    split = cfg.splits.explain
    train_labels = dataset_labels(datasets["train"])
    explain_labels = dataset_labels(datasets["explain"])
    test_ids = explained[result.test_indices].tolist()  # predict positions -> indices of the explained split
    report = Report(dirpath, "lightning_fastif: what the model learned from which training points")
    report.add_paragraph(
        "Scores are influence estimates `g_testᵀ (H + λI)⁻¹ g_train`; **positive = helpful** (removing the training "
        "point would raise the test loss by about score/n), negative = harmful."
    )
    report.add_metrics(
        {
            f"{split} accuracy": summary["test_accuracy"],
            f"misclassified {split} examples": summary["num_misclassified"],
            "kNN candidates per example": cfg.influence.num_candidates,
            "estimator": summary["ihvp"],
            "training points": len(datasets["train"]),
        },
        title="Run",
    )
    if correction_history:
        report.add_heading("Error correction during training", level=2)
        path = plots.plot_accuracy_history(correction_history, dirpath / "correction_accuracy.png")
        report.add_image(path, "Accuracy before and after each ErrorCorrection")
        report.add_table(
            ["moment", "points", "metric before", "metric after", "gain", "held-out before → after", "kept", "lr"],
            [row for h in correction_history for row in _correction_rows(h)],
        )
        compared = [h for h in correction_history if h.get("comparison") and h.get("gain") is not None]
        if compared:
            last = compared[-1]
            other = last["comparison"]
            report.add_paragraph(
                f"At {last['moment']}, the {last['selection']} training points changed the {last['metric']} on the "
                f"evaluation split by {_signed(last['gain'])}; as many {other['selection']} points, with the same "
                f"settings from the same weights, by {_signed(other['gain'])} (the comparison is undone; the fit "
                "goes on with the correction's weights). A correction that lowered the held-out metric is rolled "
                "back (kept = False) and its gain is then 0."
            )

    if summary.get("augmentation"):
        from lightning_fastif.app.augmentation import augmentation_section

        augmentation_section(report, summary["augmentation"])
    report.add_heading(f"Why were these {split} examples misclassified?", level=2)
    graph = plots.plot_influence_graph(
        test_ids,
        result.candidate_indices,
        result.scores,
        dirpath / "influence_graph.png",
        test_groups=[int(explain_labels[i]) for i in test_ids],
        train_groups=train_labels,
        top_n=cfg.report.top_n,
    )
    report.add_image(
        graph,
        f"Training points (inside) and the misclassified {split} examples they influence (circle, by true class); "
        "blue edges helpful, orange harmful, width ∝ |influence|",
    )
    _explanations(report, dirpath, cfg, datamodule, model, result, test_ids, datasets, train_labels, explain_labels)
    if self_scores is not None:
        _self_influence_section(report, dirpath, cfg, datamodule, self_scores, flipped, train_labels)
    if verify_report is not None:
        report.add_heading("Can these numbers be trusted? (verify against exact influence)", level=2)
        report.add_code(str(verify_report))

    report.add_heading("Files", level=2)
    out = dirpath.parent
    report.add_files(
        {
            out / "influence" / "result.safetensors": "influence result (safetensors; InfluenceResult.load)",
            out / "influence" / "manifest.json": "influence settings, timings and estimator diagnostics",
            out / "snapshot" / "manifest.json": "feature and checkpoint snapshots",
        }
    )
    return report.write()


def _explanations(
    report: Any,
    dirpath: Path,
    cfg: Any,
    datamodule: Any,
    model: torch.nn.Module,
    result: Any,
    test_ids: list[int],
    datasets: dict[str, Any],
    train_labels: torch.Tensor,
    explain_labels: torch.Tensor,
) -> None:
    """One block per explained example: images, texts or a table of training indices, labels and scores."""
    from lightning_fastif.app import plots
    from lightning_fastif.app.text_explanations import text_explanation_blocks
    from lightning_fastif.core.batches import move_batch
    from lightning_fastif.lightning.correction import predicted_labels

    split, mode = cfg.splits.explain, render_mode(datamodule)
    device = next(model.parameters()).device
    collate = _collate_of(datamodule)
    for row, test_index in list(enumerate(test_ids))[: cfg.report.num_explained]:
        position = int(result.test_indices[row])
        helpful = result.top_helpful(position, cfg.report.top_n)
        harmful = result.top_harmful(position, cfg.report.top_n)
        with torch.no_grad():
            batch = move_batch(collate([datasets["explain"][test_index]]), device)
            predicted = int(predicted_labels(model.eval(), batch)[0])
        label = int(explain_labels[test_index])
        if mode == "images":
            path = plots.plot_explanation(
                datamodule.images_of(split, [test_index])[0],
                f"{split} {test_index}: label {label}, predicted {predicted}",
                datamodule.images_of("train", helpful.indices),
                helpful.scores,
                datamodule.images_of("train", harmful.indices),
                harmful.scores,
                dirpath / f"explain_test_{test_index}.png",
                helpful_titles=[f"#{i} y={int(train_labels[i])}" for i in helpful.indices.tolist()],
                harmful_titles=[f"#{i} y={int(train_labels[i])}" for i in harmful.indices.tolist()],
            )
            report.add_image(
                path,
                f"{split} example {test_index} (label {label}, predicted {predicted}): most helpful (top row) and "
                "most harmful (bottom row) training points",
            )
        elif mode == "text":

            def entries(ranked: Any) -> list[tuple[str, int, float, int]]:
                texts = datamodule.texts_of("train", ranked.indices)
                return [
                    (t, int(train_labels[i]), float(s), int(i))
                    for t, i, s in zip(texts, ranked.indices.tolist(), ranked.scores.tolist(), strict=True)
                ]

            report.add_blocks(
                text_explanation_blocks(
                    datamodule.texts_of(split, [test_index])[0],
                    label,
                    predicted,
                    entries(helpful),
                    entries(harmful),
                    heading=f"{split} example {test_index}",
                )
            )
        else:
            report.add_heading(f"{split} example {test_index}: label {label}, predicted {predicted}", level=3)
            report.add_table(
                ["", "train index", "label", "influence"],
                [
                    [kind, int(i), int(train_labels[i]), float(s)]
                    for kind, ranked in (("helpful", helpful), ("harmful", harmful))
                    for i, s in zip(ranked.indices.tolist(), ranked.scores.tolist(), strict=True)
                ],
            )


def _self_influence_section(
    report: Any,
    dirpath: Path,
    cfg: Any,
    datamodule: Any,
    self_scores: torch.Tensor,
    flipped: Any,
    train_labels: torch.Tensor,
) -> None:
    from lightning_fastif.app import plots
    from lightning_fastif.metrics import mislabel_detection

    report.add_heading("Likely mislabelled training points (self-influence)", level=2)
    top = self_scores.argsort(descending=True)[: cfg.report.top_n * 2]
    flagged = None if flipped is None or len(flipped) == 0 else torch.as_tensor(flipped)
    path = plots.plot_self_influence(self_scores, dirpath / "self_influence.png", flagged=flagged)
    marked = "; known flipped labels marked" if flagged is not None else ""
    report.add_image(path, f"Training points sorted by self-influence{marked}")
    if flagged is not None:
        found = mislabel_detection(self_scores, flagged)
        report.add_paragraph(
            f"{len(flagged)} training labels were flipped on purpose (`data.label_noise`). Inspecting the top 10% by "
            f"self-influence finds {found['found']} of them: precision {found['precision']:.2f} against "
            f"{len(flagged) / len(self_scores):.2f} for a random 10%."
        )
    if render_mode(datamodule) == "images":
        path = plots.plot_examples_grid(
            datamodule.images_of("train", top),
            dirpath / "self_influence_top.png",
            titles=[f"#{i} y={int(train_labels[i])}" for i in top.tolist()],
        )
        report.add_image(
            path, "The training points with the highest self-influence, with their (possibly wrong) labels"
        )
    flipped_set = set() if flagged is None else set(flagged.tolist())
    report.add_table(
        ["train index", "label", "self-influence", "label flipped on purpose"],
        [[int(i), int(train_labels[i]), float(self_scores[i]), int(i) in flipped_set] for i in top.tolist()],
    )


class _IndexedSubset(torch.utils.data.Dataset):
    """A subset whose items are the dataset's items; its order maps predict indices back to dataset indices."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def _collate_of(datamodule: Any) -> Any:
    from torch.utils.data import default_collate

    return getattr(datamodule, "collate_fn", None) or default_collate


def main() -> None:
    """Console entry point (``fastif`` / ``python -m lightning_fastif``): the packaged configs, composed by Hydra."""
    import hydra

    @hydra.main(version_base=None, config_path=CONFIG_PATH, config_name=CONFIG_NAME)
    def _app(cfg: Any) -> None:
        run(cfg)

    _app()


if __name__ == "__main__":
    main()
