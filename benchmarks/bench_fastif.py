"""FastIF against the original influence functions on the same trained digits CNN: speed, agreement, recall, DDP.

Setup: ``DigitsClassifier`` (CNN, 9,802 parameters) fitted on ``DigitsDataModule(val 10%, test 10%)``'s training
split (N = 1,437), with two ``FeatureSnapshot``s: the classifier's input (FastIF's raw features, L2) and the
per-example loss gradient of the classifier's parameters (``features="loss_gradient"``, 330-d, inner product), which
also stores ``H_last``, the Hessian of the mean training loss over those 330 parameters. Influence is taken over the top layers
(``hidden.*``, ``classifier.*``: 8,554 parameters, as FastIF restricts BERT to its top layers). Both methods target
the same quantity ``(H + λI)⁻¹`` with the same λ and the same LiSSA scale (estimated once on the model, a tuning step
that is reported, not timed per test point); scores in float32.

* **original** (Koh & Liang): one test point at a time; deep LiSSA (minibatch 8, 1000 steps, 1 repeat); every one of
  the N training points scored with its own per-example gradient, one example at a time (``method="grads"``,
  ``batch_size=1``).
* **FastIF** (``InfluenceModule.score_batch``, end to end: features, kNN, s_test, scoring): k = 1% of N kNN
  candidates in the loss-gradient space *per direction*, for the preconditioned query ``q = (H_last + λI)⁻¹ g_test``
  (the k largest ``<q, g_train>``, likely helpful, and the k smallest, likely harmful: 2k candidates scored); tuned LiSSA (minibatch 8, 200 steps, 1 repeat) for a batch of test points in one solve; candidates
  scored by JVP.

Time per test point: FastIF's batch time / batch size against the original's time for one test point, measured
interleaved (median of repeats). Agreement: Spearman between FastIF's scores and the original's on FastIF's
candidates; recall: the fraction of the original's top-10 helpful training points (over all N) that are among
FastIF's k helpful-direction candidates (and the top-10 harmful among the k harmful-direction ones). A second table
gives recall@k for k = 1, 2, 5, 10% of N for the raw features (L2, FastIF's original choice) and the gradient
embedding (raw and preconditioned queries, per direction; raw queries with both signs sharing k slots by
``|<g_test, g_train>|``). DDP: ``trainer.predict`` in ``parallel="test"``
mode with 2 CPU processes against 1, from the run's own wall clock (process start-up excluded), one thread per rank.

Run: ``python -m benchmarks.bench_fastif [--smoke] [--threads 1]``; also writes ``benchmarks/results_fastif.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import (
    goal,
    interleaved,
    jsonable,
    machine_info,
    markdown_table,
    module_main,
    nanmean,
    pearson,
    set_threads,
    spearman,
    write_atomic,
)

RESULTS_PATH = Path(__file__).with_name("results_fastif.json")
PARAMS = ["hidden.*", "classifier.*"]
DAMPING_RELATIVE = 5e-3
"""λ = scale × 5e-3: FastIF's ``damp`` (the reference code's damping relative to its scale)."""

FULL = {
    "epochs": 8,
    "original": {"batch_size": 8, "recursion_depth": 1000},
    "fastif": {"batch_size": 8, "recursion_depth": 200, "num_repeats": 1},
    "test_points_timed": 3,
    "test_points_quality": 20,
    "fastif_batch": 20,
    "repeats": 3,
    "ddp_test_points": 60,
    "train_limit": None,
}
SMOKE = {
    "epochs": 1,
    "original": {"batch_size": 8, "recursion_depth": 30},
    "fastif": {"batch_size": 8, "recursion_depth": 10, "num_repeats": 1},
    "test_points_timed": 1,
    "test_points_quality": 4,
    "fastif_batch": 4,
    "repeats": 1,
    "ddp_test_points": 0,
    "train_limit": 300,
}


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _trainer(root: str, **kwargs: Any) -> Any:
    from lightning.pytorch import Trainer

    options = {
        "default_root_dir": root,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    options.update(kwargs)
    return Trainer(**options)


def _train(root: str, epochs: int, limit: int | None) -> tuple[Any, Any, str]:
    from lightning.pytorch import seed_everything

    from lightning_fastif.app.data import DigitsDataModule
    from lightning_fastif.app.models import DigitsClassifier
    from lightning_fastif.lightning.snapshots import FeatureSnapshot

    seed_everything(0, verbose=False)
    data = DigitsDataModule(val_fraction=0.1, test_fraction=0.1, batch_size=64, seed=0)
    data.setup()
    train = data.train_dataset
    if limit is not None:
        train = TensorDataset(*(t[:limit] for t in train.tensors))
    model = DigitsClassifier()
    snapshot = os.path.join(root, "snapshot")
    callbacks = [
        FeatureSnapshot(dirpath=snapshot, features="loss_gradient", layer="classifier"),
        FeatureSnapshot(dirpath=os.path.join(root, "snapshot_raw")),
    ]
    trainer = _trainer(root, max_epochs=epochs, callbacks=callbacks)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
    return model.eval(), (train, data.test_dataset), snapshot


RECALL_PERCENT = (1, 2, 5, 10)


def _recall(found: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over test points of the fraction of the reference's 10 points found."""
    return (
        sum(len(set(f.tolist()) & set(r.tolist())) for f, r in zip(found, reference, strict=True)) / reference.numel()
    )


def _recall_table(
    model: Any, snapshot: str, batch: Any, original: torch.Tensor, n_train: int, gradient_fn: Any, precondition: Any
) -> dict[str, list[tuple[float, float]]]:
    """(helpful, harmful) recall of the original top-10s at each k of RECALL_PERCENT, for each embedding/search."""
    from lightning_fastif.search.knn import KNNIndex

    raw = KNNIndex.from_snapshot(os.path.join(os.path.dirname(snapshot), "snapshot_raw"))
    grad = KNNIndex.from_snapshot(snapshot)
    with torch.no_grad():
        raw_q = model.features(batch)
    grad_q = gradient_fn(model, batch, layer="classifier")
    pre_q = precondition(grad_q)
    top, bottom = original.topk(10, 1).indices, (-original).topk(10, 1).indices
    table: dict[str, list[tuple[float, float]]] = {}
    for percent in RECALL_PERCENT:
        k = max(1, round(percent / 100 * n_train))
        raw_ids = raw.search(raw_q, k)[1]
        plus, minus = grad.search_signed(grad_q, k, "positive")[1], grad.search_signed(grad_q, k, "negative")[1]
        pre_plus, pre_minus = grad.search_signed(pre_q, k, "positive")[1], grad.search_signed(pre_q, k, "negative")[1]
        shared = (grad_q @ grad.features.T).abs().topk(k, 1).indices
        rows = {
            "raw features, L2 (FastIF's)": (raw_ids, raw_ids),
            "loss gradient, inner product with g_test, per direction": (plus, minus),
            "loss gradient, |inner product| with g_test, k shared": (shared, shared),
            "loss gradient, inner product with (H_last + λI)⁻¹ g_test, per direction (ours)": (pre_plus, pre_minus),
        }
        for name, (helpful_ids, harmful_ids) in rows.items():
            table.setdefault(name, []).append((_recall(helpful_ids, top), _recall(harmful_ids, bottom)))
    return table


def _lissa(settings: dict[str, Any], scale: float) -> Any:
    from lightning_fastif import LiSSA

    # residual_examples=0: the residual check is a diagnostic neither method of the comparison includes.
    return LiSSA(damping=DAMPING_RELATIVE * scale, scale=scale, seed=0, residual_examples=0, **settings)


def _ddp_wall(model: Any, data: Any, snapshot: str, module_kwargs: dict[str, Any], devices: int, root: str) -> float:
    from lightning_fastif.io.results import InfluenceResult
    from lightning_fastif.lightning.arguments import ComputeArguments
    from lightning_fastif.lightning.module import InfluenceModule

    output = os.path.join(root, f"ddp{devices}")
    module = InfluenceModule(
        model,
        snapshot=snapshot,
        output_dir=output,
        compute=ComputeArguments(parallel="test", progress=False),
        **module_kwargs,
    )
    options: dict[str, Any] = {"accelerator": "cpu", "devices": devices}
    if devices > 1:
        options["strategy"] = "ddp_spawn"
    test = data[1]
    n = min(len(test), FULL["ddp_test_points"])
    loader = DataLoader(TensorDataset(*(t[:n] for t in test.tensors)), batch_size=10)
    _trainer(root, **options).predict(module, loader)
    return float(InfluenceResult.load(output).manifest["wall_seconds"])


def run(*, smoke: bool = False, threads: int = 1) -> dict[str, Any]:
    """FastIF vs original influence functions: time per test point, Spearman, recall; DDP 2 vs 1 (module docstring)."""
    _quiet()
    set_threads(threads)
    from lightning_fastif import influence_scores
    from lightning_fastif.core.grads import FunctionalLoss
    from lightning_fastif.core.hessian import HessianOperator
    from lightning_fastif.lightning.arguments import ComputeArguments
    from lightning_fastif.lightning.module import InfluenceModule
    from lightning_fastif.search.features import loss_gradient_features

    cfg = SMOKE if smoke else FULL
    root = tempfile.mkdtemp(prefix="bench_fastif_")
    start = time.perf_counter()
    model, data, snapshot = _train(root, cfg["epochs"], cfg["train_limit"])
    train, test = data
    n_train = len(train)
    k = max(1, round(0.01 * n_train))
    train_seconds = time.perf_counter() - start

    # Tuning, once per model: LiSSA's scale above the largest minibatch-Hessian eigenvalue (minibatch 8).
    start = time.perf_counter()
    operator = HessianOperator(model, None, train, PARAMS, function=FunctionalLoss(model, None, PARAMS))
    estimate = _lissa({"batch_size": 8, "scale_batches": 16}, 1.0).estimate_top_eigenvalue(operator)
    scale = 1.5 * estimate["eigenvalue"]
    tuning_seconds = time.perf_counter() - start
    original_ihvp = _lissa(cfg["original"], scale)
    fastif_ihvp = _lissa(cfg["fastif"], scale)

    module = InfluenceModule(
        model,
        train_dataset=train,
        snapshot=snapshot,
        ihvp=fastif_ihvp,
        params=PARAMS,
        num_candidates=k,
        compute=ComputeArguments(batch_size=256, progress=False),
    )
    x_test, y_test = test.tensors
    fast_batch = (x_test[: cfg["fastif_batch"]], y_test[: cfg["fastif_batch"]])
    module.score_batch((x_test[:2], y_test[:2]))  # warm-up: loads the index, first autograd calls

    timed = cfg["test_points_timed"]
    counter = {"i": 0}

    def original_one() -> None:
        i = counter["i"] % timed
        counter["i"] += 1
        influence_scores(
            model,
            None,
            (x_test[i : i + 1], y_test[i : i + 1]),
            train,
            ihvp=original_ihvp,
            params=PARAMS,
            batch_size=1,
            method="grads",
        )

    timings = interleaved(
        {"fastif_batch": lambda: module.score_batch(fast_batch), "original_one": original_one},
        repeats=max(cfg["repeats"], timed),
        warmup=0,
    )
    fastif_per_point = timings["fastif_batch"].median / cfg["fastif_batch"]
    original_per_point = timings["original_one"].median
    speedup = original_per_point / fastif_per_point
    stages = module.score_batch(fast_batch).diagnostics["seconds"]

    # Quality over more test points: the original's scores computed in one batched pass (same minibatch draws and
    # the same arithmetic per vector as one at a time, so the same scores up to float rounding).
    q = cfg["test_points_quality"]
    quality_batch = (x_test[:q], y_test[:q])
    original = influence_scores(model, None, quality_batch, train, ihvp=original_ihvp, params=PARAMS, batch_size=256)
    fast = module.score_batch(quality_batch)
    spearmans, pearsons, recalls, recalls_harmful, overlaps = [], [], [], [], []
    for t in range(q):
        cand = fast.candidates[t]
        reference = original[t, cand]
        spearmans.append(spearman(fast.scores[t], reference))
        pearsons.append(pearson(fast.scores[t], reference))
        top = set(original[t].topk(10).indices.tolist())
        bottom = set((-original[t]).topk(10).indices.tolist())
        # The first k columns are the helpful direction's neighbours, the rest the harmful direction's.
        recalls.append(len(top & set(cand[:k].tolist())) / 10)
        recalls_harmful.append(len(bottom & set(cand[k:].tolist())) / 10)
        m = min(10, cand.numel())
        fast_top = set(cand[fast.scores[t].topk(m).indices].tolist())
        overlaps.append(len(fast_top & set(cand[reference.topk(m).indices].tolist())) / m)
    recall_table = _recall_table(
        model, snapshot, quality_batch, original, n_train, loss_gradient_features, module.precondition_query
    )
    recalls10 = recall_table["raw features, L2 (FastIF's)"][-1][0]

    ddp: dict[str, Any] = {"wall_1": None, "wall_2": None, "speedup": None}
    if not smoke:
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # one thread per rank in the spawned processes too
        try:
            kwargs = {"train_dataset": train, "ihvp": fastif_ihvp, "params": PARAMS, "num_candidates": k}
            ddp["wall_1"] = _ddp_wall(model, data, snapshot, kwargs, 1, root)
            ddp["wall_2"] = _ddp_wall(model, data, snapshot, kwargs, 2, root)
            ddp["speedup"] = ddp["wall_1"] / ddp["wall_2"]
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        set_threads(threads)

    recall_rows = [
        [name, *(f"{helpful:.2f} / {harmful:.2f}" for helpful, harmful in cells)]
        for name, cells in recall_table.items()
    ]
    headline = {
        "fastif_speedup": speedup,
        "fastif_spearman": nanmean(spearmans),
        "fastif_recall10": nanmean(recalls),
        "ddp2_speedup": ddp["speedup"],
    }
    info = machine_info(threads)
    rows = [
        ["time per test point, original (s)", original_per_point, "", ""],
        ["time per test point, FastIF (s)", fastif_per_point, "", ""],
        ["speedup (original / FastIF)", speedup, ">= 100x", goal(speedup, 100.0)],
        [f"Spearman over FastIF's k={k} candidates (mean of {q})", headline["fastif_spearman"], ">= 0.9",
         goal(headline["fastif_spearman"], 0.9)],
        ["Pearson over the candidates", nanmean(pearsons), "", ""],
        ["top-10 overlap within the candidates", nanmean(overlaps), "", ""],
        [f"recall of the original top-10 helpful among the k={k} (1%) helpful-direction candidates",
         headline["fastif_recall10"], ">= 0.8", goal(headline["fastif_recall10"], 0.8)],
        [f"recall of the original top-10 harmful among the k={k} harmful-direction candidates",
         nanmean(recalls_harmful), "", ""],
        ["kNN query preconditioned by the stored (H_last + λI)⁻¹", str(module.knn_preconditioned), "", ""],
        [f"candidates scored per test point (k per direction, mean of {q})",
         float(sum(c.numel() for c in fast.candidates) / q), "", ""],
        [f"recall of the top-10 helpful, raw features L2, k={round(0.1 * n_train)} (10%)", recalls10, "", ""],
        ["DDP `parallel='test'`: 1 process wall (s)", ddp["wall_1"], "", ""],
        ["DDP `parallel='test'`: 2 processes wall (s)", ddp["wall_2"], "", ""],
        ["DDP speedup (2 vs 1)", ddp["speedup"], ">= 1.7x", goal(ddp["speedup"], 1.7)],
    ]  # fmt: skip
    stage_rows = [[stage, seconds / cfg["fastif_batch"]] for stage, seconds in stages.items()]
    markdown = (
        f"Digits CNN ({cfg['epochs']} epochs), N = {n_train} training points, influence over {PARAMS} "
        f"({operator.num_params} parameters), λ = {DAMPING_RELATIVE} × scale, scale = 1.5 × {estimate['eigenvalue']:.3g} "
        f"(largest minibatch-8 Hessian eigenvalue; tuning once took {tuning_seconds:.2f} s). Original: LiSSA "
        f"{cfg['original']}, every training point, gradients one at a time. FastIF: k = {k}, LiSSA {cfg['fastif']}, "
        f"{cfg['fastif_batch']} test points per solve. {threads} thread(s), {info['cpu']}, load average "
        f"{info.get('load_average')}.\n\n"
        + markdown_table(["measure", "value", "goal", "verdict"], rows)
        + f"\n\nRecall of the original top-10 helpful / top-10 harmful points among k kNN candidates (mean of {q} "
        "test points). Per direction: k neighbours of +q for the helpful, k of -q for the harmful points. Shared: "
        "the k largest |<g_test, g_train>|, helpful and harmful together (even the exact scores, ranked by |score|, "
        "cannot put all 20 in fewer than 20 slots). Preconditioned: q = (H_last + λI)⁻¹ g_test, H_last the Hessian of "
        "the mean training loss over the classifier's parameters (stored by the snapshot), λ the estimator's.\n\n"
        + markdown_table(
            ["embedding, search", *(f"k = {p}% ({max(1, round(p / 100 * n_train))})" for p in RECALL_PERCENT)],
            recall_rows,
        )
        + "\n\nFastIF seconds per test point by stage:\n\n"
        + markdown_table(["stage", "s / test point"], stage_rows)
        + "\n"
    )
    out = {
        "name": "fastif",
        "title": "FastIF vs original influence functions (digits CNN)",
        "headline": headline,
        "markdown": markdown,
        "details": {
            "machine": info,
            "n_train": n_train,
            "k": k,
            "params": PARAMS,
            "num_params": operator.num_params,
            "scale": scale,
            "damping": fastif_ihvp.damping,
            "eigenvalue_estimate": estimate,
            "tuning_seconds": tuning_seconds,
            "train_seconds": train_seconds,
            "settings": cfg,
            "times": {name: t.times for name, t in timings.items()},
            "fastif_seconds_per_point": fastif_per_point,
            "original_seconds_per_point": original_per_point,
            "fastif_stage_seconds_per_point": {s: v / cfg["fastif_batch"] for s, v in stages.items()},
            "spearman": spearmans,
            "pearson": pearsons,
            "top10_overlap": overlaps,
            "recall10_k1pct": recalls,
            "recall10_harmful_k1pct": recalls_harmful,
            "recall_table": recall_table,
            "recall_percent": RECALL_PERCENT,
            "ddp": ddp,
        },
    }
    if not smoke:
        write_atomic(RESULTS_PATH, json.dumps(jsonable(out), indent=2) + "\n")
    return out


if __name__ == "__main__":
    module_main(run, __doc__.splitlines()[0])
