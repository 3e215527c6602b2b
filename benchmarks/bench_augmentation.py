"""FastIF's data augmentation with DEFAULT settings: unseen pool examples chosen by influence vs random, 5 seeds.

FastIF's fourth application fine-tunes on examples of a pool the model never trained on, chosen by influence on a
few examples of the target distribution (+2.8 points on HANS over random pool examples). Two planted-cue tasks of
``bench_correction``, each with an unseen labelled pool in which the cue is reversed on a fifth of the examples
(counter-examples mixed with ordinary ones; the share is fixed beforehand, not tuned):

* ``digits``: ``examples/augmentation_demo.py``'s ``run_demo`` (the CNN on 8x8 digits with a corner patch; the pool
  is the validation images).
* ``tabular``: ``bench_correction.tabular_task`` with a pool of 1000 extra rows; ``TabularMLP``.

Per task and seed a model is trained with a ``FeatureSnapshot(datasets={"pool": pool})``, then corrected from the
same weights with influence-chosen pool examples (kNN candidates from the pool's snapshot features, influence under
the training set's Hessian) and with random pool examples (at ``lr="auto"``, and at the influence-chosen run's
learning rate): 10 steps of 10 examples, 10 anchors per step, ``lr="auto"``, ``keep="improved"`` (the guard holds
out half of the anchors). Anchors are part of the challenge split; the gain is measured on its other part, which
neither the anchors nor the guard see. The table gives the mean ± std over seeds of that held-out gain (kept
weights; 0 for a rolled-back correction), the in-distribution test change, the share of counter-examples among the
pool examples trained on, the learning rates and how many corrections were kept.

    python -m benchmarks.bench_augmentation [--smoke] [--threads 1]
"""

from __future__ import annotations

import importlib.util
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.bench_correction import TabularMLP, tabular_task
from benchmarks.common import jsonable, markdown_table, module_main, selection_summary, set_threads
from lightning_fastif import CandidatePool, ComputeArguments, LiSSA
from lightning_fastif.lightning.arguments import CorrectionArguments
from lightning_fastif.lightning.correction import accuracy
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.snapshots import FeatureSnapshot

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "augmentation_demo.py"
SELECTIONS = ("helpful", "random", "random_at_helpful_lr")
LABELS = {"helpful": "influence-chosen", "random": "random", "random_at_helpful_lr": "random, same lr"}
POOL_AGREEMENT = 0.8
"""The cue names the label on 80% of the pool examples; the other 20% are counter-examples of it."""


def _demo() -> Any:
    spec = importlib.util.spec_from_file_location("augmentation_demo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tabular(
    out: Path,
    *,
    seeds: list[int],
    epochs: int = 10,
    num_candidates: int = 200,
    depth: int = 100,
    damping: float = 0.01,
    sizes: dict[str, int] | None = None,
    pool_rows: int = 1000,
    steps: CorrectionArguments | None = None,
    keep: str = "improved",
) -> list[dict[str, Any]]:
    """Per seed: train the MLP with the pool embedded, then compare pool selections from its weights."""
    demo = _demo()
    steps = steps or CorrectionArguments()
    per_seed = []
    for seed in seeds:
        pl.seed_everything(seed)
        data = tabular_task(seed, **(sizes or {}), extra={"pool": (pool_rows, POOL_AGREEMENT)})
        x, y = data["pool"].tensors
        counter = (x[:, -1] != 2.0 * y - 1.0).tolist()
        model = TabularMLP()
        snap = out / f"tabular-snapshot-{seed}"
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=out,
            callbacks=[FeatureSnapshot(dirpath=snap, datasets={"pool": data["pool"]})],
        )
        trainer.fit(model, DataLoader(data["train"], batch_size=64, shuffle=True))
        pool = CandidatePool.from_snapshot(data["pool"], snap, name="pool")

        def make_influence(m: nn.Module, data: dict = data, snap: Path = snap, seed: int = seed) -> InfluenceModule:
            ihvp = LiSSA(damping=damping, recursion_depth=depth, batch_size=32, residual_examples=0, seed=seed)
            return InfluenceModule(
                m,
                train_dataset=data["train"],
                snapshot=snap,
                num_candidates=num_candidates,
                ihvp=ihvp,
                compute=ComputeArguments(progress=False),
            )

        table = demo.compare_pool_selections(
            model,
            data["anchors"],
            data["challenge"],
            data["test"],
            pool,
            make_influence=make_influence,
            seed=seed,
            steps=steps,
            keep=keep,
        )
        for selection in SELECTIONS:
            for run in table[selection]["runs"]:
                used = run["used_indices"]
                run["counter_fraction_used"] = statistics.fmean(float(counter[i]) for i in used) if used else 0.0
        per_seed.append(
            {
                "seed": seed,
                "test_accuracy": accuracy(model, data["test"]),
                "pool_counter_fraction": statistics.fmean(float(c) for c in counter),
                **table,
            }
        )
    return per_seed


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds per selection of the held-out gain, the test change and the counter-examples used."""
    summary: dict[str, Any] = {}
    for selection in SELECTIONS:
        runs = [run for s in per_seed for run in s[selection]["runs"]]
        summary[selection] = {
            **selection_summary(per_seed, selection),
            "counter_fraction_used": statistics.fmean(run["counter_fraction_used"] for run in runs),
        }
    summary["pool_counter_fraction"] = statistics.fmean(s["pool_counter_fraction"] for s in per_seed)
    summary["margin"] = summary["helpful"]["gain_mean"] - summary["random"]["gain_mean"]
    summary["margin_matched"] = summary["helpful"]["gain_mean"] - summary["random_at_helpful_lr"]["gain_mean"]
    summary["influence_beats_random"] = summary["margin"] > 0 and summary["margin_matched"] > 0
    return summary


def _rows(task: str, summary: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for selection in SELECTIONS:
        s = summary[selection]
        lrs = sorted(s["lrs"])
        rows.append(
            [
                task,
                LABELS[selection],
                f"{s['before_mean']:.3f}",
                f"{100 * s['gain_mean']:+.1f} ± {100 * s['gain_std']:.1f}",
                f"{100 * s['corrected_gain_mean']:+.1f} ± {100 * s['corrected_gain_std']:.1f}",
                f"{100 * s['test_change_mean']:+.1f}",
                f"{100 * s['counter_fraction_used']:.0f}% (pool {100 * summary['pool_counter_fraction']:.0f}%)",
                f"{lrs[0]:g}" if lrs[0] == lrs[-1] else f"{lrs[0]:g}-{lrs[-1]:g}",
                f"{s['kept']}/{s['runs']}",
            ]
        )
    return rows


def run(*, smoke: bool = False, threads: int = 1) -> dict[str, Any]:
    """The contract of ``benchmarks.common``: per task, the held-out gains of influence-chosen and random pool points."""
    set_threads(threads)
    demo = _demo()
    seeds = [0] if smoke else [0, 1, 2, 3, 4]
    start = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if smoke:
            digits = demo.run_demo(out / "digits", seeds=seeds, epochs=2, num_steps=2, num_candidates=40, depth=10)
            tabular = run_tabular(
                out,
                seeds=seeds,
                epochs=2,
                num_candidates=40,
                depth=10,
                sizes={"n_train": 300, "n_anchors": 40, "n_challenge": 100},
                pool_rows=200,
                steps=CorrectionArguments(num_steps=2),
            )
        else:
            digits = demo.run_demo(out / "digits", seeds=seeds)
            tabular = run_tabular(out, seeds=seeds)
        results["digits"] = {**summarise(digits["per_seed"]), "seconds": digits["seconds"]}
        results["tabular"] = summarise(tabular)
    seconds = time.perf_counter() - start
    columns = [
        "task",
        "pool examples",
        "challenge acc before",
        "held-out challenge gain, kept weights (pts)",
        "gain before the guard (pts)",
        "in-distribution test change (pts)",
        "counter-examples trained on",
        "lr chosen",
        "kept",
    ]
    rows = _rows("digits", results["digits"]) + _rows("tabular", results["tabular"])
    verdicts = []
    for task in ("digits", "tabular"):
        r = results[task]
        verdicts.append(
            f"{task}: influence-chosen - random = {100 * r['margin']:+.1f} pts ({100 * r['margin_matched']:+.1f} "
            f"against random pool examples at the same lr): "
            f"{'influence-chosen beats random' if r['influence_beats_random'] else 'influence-chosen does NOT beat random'}."
        )
    markdown = (
        markdown_table(columns, rows)
        + "\n\n"
        + " ".join(verdicts)
        + f"\n\nDefault settings (`CorrectionArguments()`: lr='auto', keep='improved'; held-out guard = half of the "
        f"anchors), unseen pools with {100 * (1 - POOL_AGREEMENT):.0f}% counter-examples of the cue, {len(seeds)} "
        f"seed(s), 10 steps x 10 pool examples (smoke: 2 steps); {seconds:.0f} s in all.\n"
    )
    return {
        "name": "augmentation",
        "title": "Data augmentation from an unseen pool: influence-chosen vs random pool examples (default settings)",
        "headline": {f"{task}_margin": results[task]["margin"] for task in ("digits", "tabular")},
        "markdown": markdown,
        "details": jsonable({"digits": digits, "tabular": tabular, "summary": results, "seconds": seconds}),
    }


if __name__ == "__main__":
    module_main(run, __doc__.splitlines()[0])
