"""The Hydra application: ``python -m lightning_fastif`` (or ``fastif``) runs the whole story on its built-in default.

1. Train a model (digits CNN by default) with ``FeatureSnapshot``, ``CheckpointSnapshot`` and ``ErrorCorrection``.
2. Explain the misclassified test points: their most helpful and most harmful training points (FastIF: kNN
   candidates + LiSSA + JVP scoring, through ``trainer.predict(InfluenceModule(...))``).
3. Find likely mislabelled training points by self-influence (the default data flips 5% of training labels).
4. Check the estimator against exact influence on a small slice of the model (``verify``).
5. Write a report directory: ``report.md``/``index.html``, PNG plots and the result files.

Examples::

    python -m lightning_fastif                                   # digits, a few minutes on 2 CPU cores
    python -m lightning_fastif experiment=smoke                  # tiny settings (CI)
    python -m lightning_fastif influence/ihvp=cg knn.k=50        # or influence.ihvp=cg
    python -m lightning_fastif trainer.devices=2 trainer.strategy=ddp
    python -m lightning_fastif -m influence.ihvp.damping=0.001,0.01,0.1
    python -m lightning_fastif experiment=text                   # MiniLM on drug reviews (~15 min)

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

from lightning_fastif.app.config import GROUPS, instantiate, register_configs, validate_config

log = logging.getLogger("lightning_fastif")


def _resolve_ihvp_node(cfg: Any) -> Any:
    """``influence.ihvp=cg`` (a name) means the registered ``influence/ihvp`` option of that name."""
    from omegaconf import OmegaConf

    node = cfg.influence.ihvp
    if isinstance(node, str):
        options = GROUPS["influence/ihvp"]
        if node not in options:
            raise ValueError(f"influence.ihvp: {node!r} is not an estimator; accepted: {sorted(options)}")
        return OmegaConf.structured(options[node])
    return node


def _misclassified(model: torch.nn.Module, dataset: Any) -> torch.Tensor:
    from lightning_fastif.lightning.correction import misclassified_indices

    return misclassified_indices(model, dataset)


def run(cfg: Any) -> dict[str, Any]:
    """Run the main job for a composed config; returns a summary (also written to ``summary.json``)."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from lightning_fastif.core.ihvp import Identity
    from lightning_fastif.core.influence import self_influence
    from lightning_fastif.io.results import InfluenceResult
    from lightning_fastif.lightning.correction import ErrorCorrection, accuracy
    from lightning_fastif.lightning.module import InfluenceModule

    started = time.perf_counter()
    out = Path(cfg.output_dir or os.getcwd()).absolute()
    validate_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True)
    ihvp_node = _resolve_ihvp_node(cfg)
    ihvp = instantiate(ihvp_node)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    model = instantiate(cfg.model)

    snapshot_dir = out / "snapshot"
    callbacks: list[pl.Callback] = [
        instantiate(
            cfg.callbacks.feature_snapshot, dirpath=str(snapshot_dir), datasets={"test": datamodule.test_dataset}
        ),
        instantiate(cfg.callbacks.checkpoint_snapshot, dirpath=str(snapshot_dir)),
    ]
    correction_cb = None
    if cfg.correction.enabled:
        correction_cb = ErrorCorrection(
            anchors_from="misclassified",
            eval_dataset=datamodule.val_dataset,
            num_anchors=cfg.correction.num_anchors,
            top_m=cfg.correction.top_m,
            num_steps=cfg.correction.num_steps,
            lr=cfg.correction.lr,
            selection=cfg.correction.selection,
            every_n_epochs=cfg.correction.every_n_epochs,
            on_fit_end=cfg.correction.on_fit_end,
            num_candidates=cfg.correction.num_candidates,
            ihvp=instantiate(ihvp_node),
            params=_params(cfg),
            snapshot_dir=str(snapshot_dir),
            seed=cfg.correction.seed,
            dirpath=str(out / "correction"),
        )
        callbacks.append(correction_cb)
    trainer_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if v is not None}
    trainer_kwargs["default_root_dir"] = str(out)
    trainer: pl.Trainer = instantiate(trainer_kwargs, callbacks=callbacks, logger=_logger(out))
    trainer.fit(model, datamodule=datamodule)
    if cfg.mode == "verify":
        return _verify_only(cfg, trainer, model, datamodule, ihvp_node, out)

    # Explain the misclassified test points with FastIF's influence, under the same Trainer (and strategy).
    test = datamodule.test_dataset
    wrong = _misclassified(model, test)
    explained = wrong[: cfg.influence.max_test_points]
    if explained.numel() == 0:  # a perfect model: explain the first test points instead
        explained = torch.arange(min(cfg.influence.max_test_points, len(test)))
    influence_dir = out / "influence"
    influence = InfluenceModule(
        model,
        train_dataset=datamodule.train_dataset,
        snapshot=str(snapshot_dir),
        ihvp=ihvp,
        params=_params(cfg),
        num_candidates=cfg.knn.k,
        top_k=cfg.influence.top_k,
        parallel=cfg.influence.parallel,
        output_dir=str(influence_dir),
        batch_size=cfg.influence.batch_size,
        hessian_batch_size=cfg.influence.hessian_batch_size,
        max_memory=cfg.influence.max_memory,
        progress=bool(cfg.trainer.enable_progress_bar),
    )
    loader = DataLoader(_IndexedSubset(test, explained.tolist()), batch_size=4, collate_fn=_collate_of(datamodule))
    trainer.predict(influence, loader, return_predictions=False)
    if not trainer.is_global_zero:
        return {}

    result = InfluenceResult.load(influence_dir)
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "test_accuracy": accuracy(model, test),
        "num_misclassified": int(wrong.numel()),
        "explained_test_indices": result.test_indices.tolist(),
        "ihvp": ihvp_node.get("_target_", str(ihvp_node)),
        "knn_k": cfg.knn.k,
        "influence_seconds": result.manifest.get("timings", {}),
    }
    if correction_cb is not None:
        summary["correction"] = [
            {k: h.get(k) for k in ("moment", "accuracy_before", "accuracy_after", "seconds")}
            for h in correction_cb.history
        ]

    # Likely mislabelled training points: the largest self-influence.
    si_ihvp = Identity() if cfg.influence.self_influence_ihvp == "identity" else instantiate(ihvp_node)
    self_scores = self_influence(model, None, datamodule.train_dataset, ihvp=si_ihvp, params=_params(cfg))
    flipped = getattr(datamodule, "flipped_indices", None)
    top = self_scores.argsort(descending=True)[: max(1, len(self_scores) // 10)]
    if flipped is not None and len(flipped):
        flipped_set = set(torch.as_tensor(flipped).tolist())
        summary["mislabel_top10_fraction"] = sum(int(i) in flipped_set for i in top.tolist()) / len(top)
        summary["mislabel_random_fraction"] = len(flipped_set) / len(self_scores)

    verify_report = None
    if cfg.report.verify:
        from lightning_fastif.core.verify import verify

        batch = _collate_of(datamodule)([test[i] for i in explained[:4].tolist()])
        verify_report = verify(
            model,
            None,
            datamodule.train_dataset,
            batch,
            ihvp=instantiate(ihvp_node),
            num_train=cfg.report.verify_num_train,
            loo=cfg.report.verify_loo,
        )
        summary["verify"] = verify_report.to_dict()

    summary["report"] = str(
        _write_report(
            out / "report",
            cfg=cfg,
            datamodule=datamodule,
            model=model,
            result=result,
            explained=explained,
            self_scores=self_scores,
            flipped=flipped,
            correction_history=correction_cb.history if correction_cb is not None else [],
            verify_report=verify_report,
            summary=summary,
        )
    )
    summary["seconds"] = time.perf_counter() - started
    from lightning_fastif.io.atomic import atomic_write_bytes
    from lightning_fastif.io.results import jsonable

    atomic_write_bytes(out / "summary.json", json.dumps(jsonable(summary), indent=2).encode())
    log.info("report written to %s", summary["report"])
    return summary


def _verify_only(cfg: Any, trainer: Any, model: torch.nn.Module, datamodule: Any, ihvp_node: Any, out: Path) -> dict:
    """``mode=verify``: check the configured estimator against exact influence on a slice of the trained model.

    Writes ``verify.json`` and prints the table; with ``-m influence.ihvp.damping=...`` each run of the sweep has its
    own ``verify.json`` (Pearson, Spearman, top-10 overlap, residual against damping).
    """
    from lightning_fastif.core.verify import verify
    from lightning_fastif.io.atomic import atomic_write_bytes
    from lightning_fastif.io.results import jsonable

    if not trainer.is_global_zero:
        return {}
    test = datamodule.test_dataset
    batch = _collate_of(datamodule)([test[i] for i in range(min(8, len(test)))])
    report = verify(
        model,
        None,
        datamodule.train_dataset,
        batch,
        ihvp=instantiate(ihvp_node),
        params=_params(cfg),
        num_train=cfg.report.verify_num_train,
        loo=cfg.report.verify_loo,
        seed=cfg.seed,
    )
    print(report)
    summary = {"mode": "verify", "ihvp": _container(ihvp_node), "verify": report.to_dict()}
    atomic_write_bytes(out / "verify.json", json.dumps(jsonable(summary), indent=2).encode())
    return summary


def _container(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node


def _write_report(
    dirpath: Path,
    *,
    cfg: Any,
    datamodule: Any,
    model: torch.nn.Module,
    result: Any,
    explained: torch.Tensor,
    self_scores: torch.Tensor,
    flipped: Any,
    correction_history: list[dict[str, Any]],
    verify_report: Any,
    summary: dict[str, Any],
) -> Path:
    """The report directory: ``report.md`` and ``index.html`` with the plots and a table per question."""
    from lightning_fastif.app import viz
    from lightning_fastif.app.report import Report
    from lightning_fastif.lightning.correction import predicted_labels

    dirpath.mkdir(parents=True, exist_ok=True)
    test = datamodule.test_dataset
    train_labels = _labels_of_dataset(datamodule.train_dataset)
    test_ids = explained[result.test_indices].tolist()  # predict positions -> test dataset indices
    is_text = callable(getattr(datamodule, "texts_of", None))
    report = Report(dirpath, "lightning_fastif: what the model learned from which training points")
    report.add_paragraph(
        "Scores are influence estimates `g_testᵀ (H + λI)⁻¹ g_train`; **positive = helpful** (removing the training "
        "point would raise the test loss by about score/n), negative = harmful."
    )
    report.add_metrics(
        {
            "test accuracy": summary["test_accuracy"],
            "misclassified test points": summary["num_misclassified"],
            "kNN candidates per test point": cfg.knn.k,
            "estimator": summary["ihvp"],
            "training points": len(datamodule.train_dataset),
        },
        title="Run",
    )

    if correction_history:
        report.add_heading("Error correction during training", level=2)
        path = viz.plot_accuracy_history(correction_history, dirpath / "correction_accuracy.png")
        report.add_image(path, "Validation accuracy before and after each ErrorCorrection")
        report.add_table(
            ["moment", "accuracy before", "accuracy after", "points used", "seconds"],
            [
                [
                    h["moment"],
                    h["accuracy_before"],
                    h["accuracy_after"],
                    len(h["steps"]) * cfg.correction.top_m,
                    round(h["seconds"], 1),
                ]
                for h in correction_history
            ],
        )

    report.add_heading("Why were these test points misclassified?", level=2)
    graph = viz.plot_influence_graph(
        test_ids,
        result.candidate_indices,
        result.scores,
        dirpath / "influence_graph.png",
        test_groups=[int(_labels_of_dataset(test)[i]) for i in test_ids],
        train_groups=train_labels,
        top_n=cfg.report.top_n,
    )
    report.add_image(
        graph,
        "Training points (inside) and the misclassified test points they influence (circle, by "
        "true class); blue edges helpful, orange harmful, width ∝ |influence|",
    )
    device = next(model.parameters()).device
    collate = _collate_of(datamodule)
    for row, test_index in list(enumerate(test_ids))[: cfg.report.num_explained]:
        position = int(result.test_indices[row])
        helpful, harmful = (
            result.top_helpful(position, cfg.report.top_n),
            result.top_harmful(position, cfg.report.top_n),
        )
        batch = collate([test[test_index]])
        from lightning_fastif.core.batches import move_batch

        with torch.no_grad():
            predicted = int(predicted_labels(model.eval(), move_batch(batch, device))[0])
        label = int(_labels_of_dataset(test)[test_index])
        if is_text:

            def entries(ranked: Any) -> list[tuple[str, int, float, int]]:
                texts = datamodule.texts_of("train", ranked.indices)
                return [
                    (t, int(train_labels[i]), float(s), int(i))
                    for t, i, s in zip(texts, ranked.indices.tolist(), ranked.scores.tolist())
                ]

            report.add_blocks(
                viz.text_explanation_blocks(
                    datamodule.texts_of("test", [test_index])[0],
                    label,
                    predicted,
                    entries(helpful),
                    entries(harmful),
                    heading=f"Test review {test_index}",
                )
            )
        else:
            path = viz.plot_explanation(
                datamodule.images_of("test", [test_index])[0],
                f"test {test_index}: label {label}, predicted {predicted}",
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
                f"Test point {test_index} (label {label}, predicted {predicted}): most helpful "
                "(top row) and most harmful (bottom row) training points",
            )

    report.add_heading("Likely mislabelled training points (self-influence)", level=2)
    top = self_scores.argsort(descending=True)[: cfg.report.top_n * 2]
    flagged = None if flipped is None or len(flipped) == 0 else torch.as_tensor(flipped)
    path = viz.plot_self_influence(self_scores, dirpath / "self_influence.png", flagged=flagged)
    report.add_image(path, "Training points sorted by self-influence; known flipped labels marked")
    if flagged is not None:
        found = viz.mislabel_detection(self_scores, flagged)
        report.add_paragraph(
            f"{len(flagged)} training labels were flipped on purpose (`data.label_noise`). Inspecting the top 10% by "
            f"self-influence finds {found['found']} of them: precision {found['precision']:.2f} against "
            f"{len(flagged) / len(self_scores):.2f} for a random 10%."
        )
    if not is_text:
        path = viz.plot_examples_grid(
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


def _labels_of_dataset(dataset: Any) -> torch.Tensor:
    """The label of every example of a dataset (``TensorDataset``'s last tensor, or ``labels``/item[-1])."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return dataset.tensors[-1]
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels
    items = [dataset[i] for i in range(len(dataset))]
    return torch.as_tensor([int(it["labels"] if isinstance(it, dict) else it[-1]) for it in items])


class _IndexedSubset(torch.utils.data.Dataset):
    """A subset whose items are the dataset's items; its order maps predict indices back to test indices."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def _collate_of(datamodule: Any) -> Any:
    from torch.utils.data import default_collate

    return getattr(datamodule, "collate_fn", None) or default_collate


def _params(cfg: Any) -> Any:
    from omegaconf import OmegaConf

    params = cfg.influence.params
    return OmegaConf.to_container(params) if OmegaConf.is_config(params) else params


def _logger(out: Path) -> Any:
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(str(out), name="logs")


def main() -> None:
    """Console entry point (``fastif`` / ``python -m lightning_fastif``)."""
    import hydra

    register_configs()

    @hydra.main(version_base=None, config_name="fastif")
    def _app(cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        if cfg.output_dir is None:
            with open_dict(cfg):
                cfg.output_dir = HydraConfig.get().runtime.output_dir
        run(cfg)

    _app()


if __name__ == "__main__":
    main()
