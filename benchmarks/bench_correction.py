"""FastIF's error correction with its DEFAULT settings on three planted-cue tasks: helpful vs random vs harmful, 5 seeds.

The defaults are what a user gets without tuning: ``lr="auto"`` (a line search at the first step) and
``keep="improved"`` (the guard: every step is held to the accuracy on 512 training examples, at most 2 points below
its value before, and the weights kept are the state with the best accuracy on a held-out half of the anchors, or
those from before when none is at least as good; see ``lightning_fastif.lightning.correction_guard``). Per
task and seed a model is trained, then corrected from the same weights with each selection (10 steps on 10 points,
10 anchors per step); the gain is the change of accuracy on a challenge split that neither the anchors nor the
guard ever see.

* ``digits``: ``examples/correction_demo.py``'s ``run_demo`` (a CNN on 8x8 digits, "digit >= 5", a corner patch
  that agrees with the label on 95% of training images and is reversed on the challenge split).
* ``tabular``: 20 informative Gaussian features (a noisy linear rule gives the label) and one column equal to the
  label (+-1) on 95% of training rows and reversed on the challenge rows; an MLP learns the column.
* ``text``: ``examples/text_experiments.py``'s spurious-cue task (Rotten Tomatoes, the word "tuesday" planted in
  95% of the fresh training snippets and reversed on the challenge split), all-MiniLM-L6-v2 with its top layer and
  a linear head fine-tuned on the cached frozen prefix, influence over the same parameters (fixed-scale LiSSA, as
  in the text experiment). MiniLM is costly on CPU, so the model is trained once (seed 0) and the seeds vary the
  correction only (anchor draws, the held-out half, the random points); the other two tasks train one model per seed.

The table gives the mean ± std over seeds of the challenge gain of the weights kept (0 for a rolled-back
correction), the gain the correction alone made (before the guard), the mean change of in-distribution test
accuracy, the learning rates chosen, how many corrections were kept, the mean number of steps of the weights kept
and the mean change of the retain accuracy (the guard's in-distribution sample), and two checks of the guard: kept
corrections that lowered the held-out metric (must be 0) and kept corrections that lowered the challenge accuracy. The row
``random_at_helpful_lr`` takes random points at the rate the helpful run chose (``lr="auto"`` gives random points,
whose gradient barely moves the anchors' loss, a small rate of their own).

    python -m benchmarks.bench_correction [--smoke] [--threads 1] [--tasks digits,tabular,text]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import jsonable, markdown_table, selection_summary, set_threads, write_atomic
from lightning_fastif import ComputeArguments, LiSSA
from lightning_fastif.app.models import _Classifier
from lightning_fastif.errors import check_choice
from lightning_fastif.lightning.arguments import CorrectionArguments
from lightning_fastif.lightning.correction import accuracy
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.snapshots import FeatureSnapshot

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "correction_demo.py"
SELECTIONS = ("helpful", "random", "random_at_helpful_lr", "harmful")
TARGET_MARGIN = 0.05
"""The goal: helpful's mean challenge gain exceeds random's by at least 5 accuracy points on each task."""


def _demo() -> Any:
    spec = importlib.util.spec_from_file_location("correction_demo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the tabular task ----------------------------------------------------------------------------------------------
def tabular_task(
    seed: int,
    *,
    n_train: int = 2000,
    n_anchors: int = 100,
    n_challenge: int = 500,
    informative: int = 20,
    extra: dict[str, tuple[int, float]] | None = None,
) -> dict[str, TensorDataset]:
    """Training, anchor and challenge rows: ``informative`` Gaussian features and a spurious last column.

    The label is ``1[x·w + 0.5·noise > 0]`` (``w`` a random unit vector); the last column is ``+1`` for label 1 and
    ``-1`` for label 0 on 95% of the training rows (the others reversed), and reversed on every anchor and challenge
    row (the anchors are a sample of the challenge distribution, as HANS anchors are). ``test`` is in-distribution.
    ``extra`` adds splits by name, ``(rows, agreement)`` each, drawn after the others (which stay the same).
    """
    g = torch.Generator().manual_seed(10_000 + seed)
    w = torch.randn(informative, generator=g)
    w = w / w.norm()

    def make(n: int, agreement: float) -> TensorDataset:
        x = torch.randn(n, informative, generator=g)
        y = ((x @ w + 0.5 * torch.randn(n, generator=g)) > 0).long()
        agrees = torch.rand(n, generator=g) < agreement
        cue = torch.where(agrees, 2.0 * y - 1.0, 1.0 - 2.0 * y)
        return TensorDataset(torch.cat([x, cue.unsqueeze(1)], 1), y)

    splits = {
        "train": make(n_train, 0.95),
        "test": make(n_challenge, 0.95),
        "anchors": make(n_anchors, 0.0),
        "challenge": make(n_challenge, 0.0),
    }
    for name, (rows, agreement) in (extra or {}).items():
        splits[name] = make(rows, agreement)
    return splits


class TabularMLP(_Classifier):
    """``features -> 64 tanh -> 2``, with the package classifiers' steps, per-example loss and Adam."""

    def __init__(self, num_features: int = 21, hidden: int = 64, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        super().__init__(num_classes=2)
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh())
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x))

    def logits(self, batch: Any) -> Tensor:
        return self(batch[0])

    def features(self, batch: Any) -> Tensor:
        return self.body(batch[0])


def run_tabular(
    out: Path,
    *,
    seeds: list[int],
    epochs: int = 10,
    num_candidates: int = 200,
    depth: int = 100,
    damping: float = 0.01,
    sizes: dict[str, int] | None = None,
    steps: CorrectionArguments | None = None,
    keep: str = "improved",
) -> list[dict[str, Any]]:
    """Per seed: train the MLP, then compare the selections from its weights (default steps unless given)."""
    demo = _demo()
    steps = steps or CorrectionArguments()
    per_seed = []
    for seed in seeds:
        pl.seed_everything(seed)
        data = tabular_task(seed, **(sizes or {}))
        model = TabularMLP()
        snap = out / f"tabular-snapshot-{seed}"
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=out,
            callbacks=[FeatureSnapshot(dirpath=snap)],
        )
        trainer.fit(model, DataLoader(data["train"], batch_size=64, shuffle=True))

        def make_influence(m: nn.Module, data: dict = data, snap: Path = snap, seed: int = seed) -> InfluenceModule:
            ihvp = LiSSA(damping=damping, recursion_depth=depth, batch_size=32, residual_examples=0, seed=seed)
            return InfluenceModule(
                m, train_dataset=data["train"], snapshot=snap, num_candidates=num_candidates, ihvp=ihvp, progress=False
            )

        table = demo.compare_with_matched_random(
            model,
            data["anchors"],
            data["challenge"],
            data["test"],
            make_influence=make_influence,
            seed=seed,
            steps=steps,
            keep=keep,
        )
        per_seed.append({"seed": seed, "test_accuracy": accuracy(model, data["test"]), **table})
    return per_seed


# -- the text task (MiniLM) ----------------------------------------------------------------------------------------
TEXT_TRAIN: dict[str, Any] = {
    "encoder": "minilm",
    "cue_word": "tuesday",
    "max_train": 800,
    "max_eval": 200,
    "max_length": 64,
    "train_layers": 1,
    "influence_layers": 1,
    "epochs": 3,
    "lr": 5e-4,
}
"""MiniLM's top layer + head fine-tuned on 800 snippets (the text experiment's size, one trainable layer)."""

TEXT_SMOKE: dict[str, Any] = {**TEXT_TRAIN, "encoder": "tiny", "max_train": 64, "max_eval": 40, "epochs": 1}
"""The CI size: a random 2-layer BERT (no MiniLM weights needed), a few dozen snippets."""


def run_text(
    out: Path,
    *,
    seeds: list[int],
    train: dict[str, Any] | None = None,
    num_candidates: int = 100,
    depth: int = 10,
    lissa_batch_size: int = 4,
    damping: float = 0.01,
    steps: CorrectionArguments | None = None,
    keep: str = "improved",
) -> list[dict[str, Any]]:
    """Train the text classifier once, then compare the selections from its weights for each seed.

    The anchors (and the guard's held-out half) come from the challenge split's anchor part, the gain is measured
    on its disjoint ``challenge_eval`` part, the in-distribution change on ``test``.

    Args:
        out: working directory (the snapshot goes under it).
        seeds: one correction per selection and seed, all from the same trained weights.
        train: :func:`examples.text_experiments.train_text_model` keyword arguments (default :data:`TEXT_TRAIN`).
        num_candidates: kNN candidates per step.
        depth: LiSSA recursion depth (its scale is estimated once, :func:`examples.text_experiments.fixed_lissa`).
        lissa_batch_size: LiSSA's minibatch size.
        damping: LiSSA's damping.
        steps: correction steps (default ``CorrectionArguments()``).
        keep: the guard (default ``"improved"``).

    Returns:
        One entry per seed, in the shape of :func:`run_tabular`'s (plus ``"text_info"`` on the first).
    """
    from examples.text_experiments import fixed_lissa, train_text_model

    demo = _demo()
    steps = steps or CorrectionArguments()
    start = time.perf_counter()
    text = train_text_model(out / "text", **(train or TEXT_TRAIN), seed=0)
    train_seconds = time.perf_counter() - start
    train_loader = text.loader("train")
    ihvp = fixed_lissa(text.head, train_loader, damping=damping, recursion_depth=depth, batch_size=lissa_batch_size)

    def make_influence(m: nn.Module) -> InfluenceModule:
        return InfluenceModule(
            m,
            train_dataset=train_loader,
            snapshot=text.snapshot,
            ihvp=ihvp,
            num_candidates=num_candidates,
            compute=ComputeArguments(batch_size=64, progress=False),
        )

    anchors, challenge = text.loader("challenge"), text.loader("challenge_eval", batch_size=64)
    test = text.loader("test", batch_size=64)
    per_seed = []
    for seed in seeds:
        table = demo.compare_with_matched_random(
            text.head, anchors, challenge, test, make_influence=make_influence, seed=seed, steps=steps, keep=keep
        )
        per_seed.append({"seed": seed, "test_accuracy": accuracy(text.head, test), **table})
    per_seed[0]["text_info"] = {**text.info, "train_seconds": train_seconds, "lissa": ihvp.settings()}
    return per_seed


# -- the summary ---------------------------------------------------------------------------------------------------
def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds per selection, and the guard's checks, from the :func:`compare_selections` tables."""
    summary: dict[str, Any] = {}
    for selection in SELECTIONS:
        runs = [run for s in per_seed for run in s[selection]["runs"]]
        kept = [run for run in runs if run["kept"]]
        summary[selection] = {
            **selection_summary(per_seed, selection),
            "stopped": sum(run["stopped"] is not None for run in runs),
            "kept_lowering_holdout": sum(
                run["holdout_before"] is not None and run["holdout_kept"] < run["holdout_before"] for run in kept
            ),
            "kept_lowering_challenge": sum(run["gain"] < 0 for run in kept),
            "kept_steps_mean": statistics.fmean(run["kept_steps"] for run in runs),
            "retain_change_mean": statistics.fmean(run["retain_kept"] - run["retain_before"] for run in runs),
        }
    summary["margin"] = summary["helpful"]["gain_mean"] - summary["random"]["gain_mean"]
    summary["margin_matched"] = summary["helpful"]["gain_mean"] - summary["random_at_helpful_lr"]["gain_mean"]
    summary["target_met"] = summary["margin"] >= TARGET_MARGIN
    summary["guard_never_lowered_holdout"] = all(summary[s]["kept_lowering_holdout"] == 0 for s in SELECTIONS)
    return summary


def _rows(task: str, summary: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for selection in SELECTIONS:
        s = summary[selection]
        lrs = sorted(s["lrs"])
        rows.append(
            [
                task,
                selection,
                f"{s['before_mean']:.3f}",
                f"{100 * s['gain_mean']:+.1f} ± {100 * s['gain_std']:.1f}",
                f"{100 * s['corrected_gain_mean']:+.1f} ± {100 * s['corrected_gain_std']:.1f}",
                f"{100 * s['test_change_mean']:+.1f}",
                f"{lrs[0]:g}" if lrs[0] == lrs[-1] else f"{lrs[0]:g}-{lrs[-1]:g}",
                f"{s['kept']}/{s['runs']}",
                f"{s['kept_steps_mean']:.1f}",
                f"{100 * s['retain_change_mean']:+.1f}",
                s["kept_lowering_holdout"],
                s["kept_lowering_challenge"],
            ]
        )
    return rows


TASKS = ("digits", "tabular", "text")


def run(*, smoke: bool = False, threads: int = 1, tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """The contract of ``benchmarks.common``: per task, the challenge gains of the selections and the guard's checks.

    Args:
        smoke: tiny sizes, one seed (the text task on a random 2-layer BERT).
        threads: torch intra-op threads.
        tasks: which of :data:`TASKS` to run.

    Returns:
        ``{"name", "title", "headline", "markdown", "details"}``.

    Raises:
        ArgumentError: for an unknown task.
    """
    for task in tasks:
        check_choice("tasks", task, TASKS)
    set_threads(threads)
    demo = _demo()
    seeds = [0] if smoke else [0, 1, 2, 3, 4]
    start = time.perf_counter()
    results: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if "digits" in tasks:
            if smoke:
                digits = demo.run_demo(out / "digits", seeds=seeds, epochs=2, num_steps=2, num_candidates=40, depth=20)
            else:
                digits = demo.run_demo(out / "digits", seeds=seeds)
            raw["digits"] = digits
            results["digits"] = {**summarise(digits["per_seed"]), "seconds": digits["seconds"]}
        if "tabular" in tasks:
            task_start = time.perf_counter()
            if smoke:
                tabular = run_tabular(
                    out,
                    seeds=seeds,
                    epochs=2,
                    num_candidates=40,
                    depth=20,
                    sizes={"n_train": 300, "n_anchors": 40, "n_challenge": 100},
                    steps=CorrectionArguments(num_steps=2),
                )
            else:
                tabular = run_tabular(out, seeds=seeds)
            raw["tabular"] = tabular
            results["tabular"] = {**summarise(tabular), "seconds": time.perf_counter() - task_start}
        if "text" in tasks:
            task_start = time.perf_counter()
            if smoke:
                text = run_text(
                    out,
                    seeds=seeds,
                    train=TEXT_SMOKE,
                    num_candidates=16,
                    depth=2,
                    steps=CorrectionArguments(num_steps=2),
                )
            else:
                text = run_text(out, seeds=seeds)
            raw["text"] = text
            results["text"] = {**summarise(text), "seconds": time.perf_counter() - task_start}
    seconds = time.perf_counter() - start
    columns = [
        "task",
        "selection",
        "challenge acc before",
        "challenge gain, kept weights (pts)",
        "gain before the guard (pts)",
        "in-distribution test change (pts)",
        "lr chosen",
        "kept",
        "steps kept (mean)",
        "retain change (pts)",
        "kept yet held-out lower",
        "kept yet challenge lower",
    ]
    rows = [row for task in results for row in _rows(task, results[task])]
    verdicts = []
    for task, r in results.items():
        verdicts.append(
            f"{task}: helpful - random = {100 * r['margin']:+.1f} pts (goal >= {100 * TARGET_MARGIN:.0f}: "
            f"{'met' if r['target_met'] else 'NOT met'}; {100 * r['margin_matched']:+.1f} against random points at "
            "the helpful runs' lr); the guard "
            f"{'never kept' if r['guard_never_lowered_holdout'] else 'KEPT'} a correction that lowered the "
            "held-out accuracy."
        )
    timing = ", ".join(f"{task} {r['seconds']:.0f} s" for task, r in results.items())
    markdown = (
        markdown_table(columns, rows)
        + "\n\n"
        + " ".join(verdicts)
        + f"\n\nDefault settings (`CorrectionArguments()`: lr='auto', keep='improved'; held-out = half of the "
        "anchors; retain = 512 training examples, retain_tolerance 0.02), "
        f"{len(seeds)} seed(s), 10 steps x 10 points (smoke: 2 steps); {seconds:.0f} s in all ({timing}).\n"
    )
    return {
        "name": "correction",
        "title": "Error correction with its default settings (digits, tabular and MiniLM text planted cues)",
        "headline": {task: {"margin": r["margin"], "target_met": r["target_met"]} for task, r in results.items()},
        "markdown": markdown,
        "details": jsonable({**raw, "summary": results, "seconds": seconds}),
    }


def main() -> None:
    """``python -m benchmarks.bench_correction``: ``--smoke``, ``--threads``, ``--json PATH``, ``--tasks``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one seed (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the returned dict here")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    args = parser.parse_args()
    out = run(smoke=args.smoke, threads=args.threads, tasks=tuple(t for t in args.tasks.split(",") if t))
    print(f"## {out['title']}\n\n{out['markdown']}\n")
    print(json.dumps(jsonable(out["headline"]), indent=2))
    if args.json is not None:
        write_atomic(args.json, json.dumps(jsonable(out), indent=2) + "\n")


if __name__ == "__main__":
    main()
