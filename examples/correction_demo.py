"""FastIF's error correction on a HANS-like planted cue, helpful vs harmful vs random points, over several seeds.

The data: scikit-learn's digits (real, bundled), binary task "digit >= 5", with a bright patch in a corner that
agrees with the label on 95% of training images and is *reversed* on a challenge split (the way HANS reverses
MNLI's lexical-overlap heuristic). A small CNN learns the cue, so challenge accuracy falls far below test accuracy.
Anchors are a small sample of the challenge split; accuracy is measured on the rest. For each seed a model is
trained, then corrected from the same weights with each selection, the same number of steps, with the default
settings: ``lr="auto"`` (a line search picks the learning rate) and ``keep="improved"`` (half of the anchors is held
out, and a correction that lowers accuracy there is rolled back).

    python examples/correction_demo.py                 # 5 seeds, the full setting (a few minutes on 2 cores)
    python examples/correction_demo.py --small         # CI size (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fastif import ComputeArguments, LiSSA
from lightning_fastif.app.data import SpuriousDigitsDataModule
from lightning_fastif.app.models import DigitsClassifier
from lightning_fastif.lightning.arguments import CorrectionArguments
from lightning_fastif.lightning.correction import accuracy, compare_selections
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.snapshots import FeatureSnapshot

SELECTIONS = ("helpful", "random", "random_at_helpful_lr", "harmful")
"""The rows: FastIF's three selections, and random points at the learning rate the helpful run used."""


def compare_with_matched_random(
    model: torch.nn.Module,
    anchors: Any,
    challenge: Any,
    test: Any,
    *,
    make_influence: Any,
    seed: int,
    steps: CorrectionArguments,
    keep: str,
) -> dict[str, Any]:
    """``compare_selections`` for helpful, random and harmful points from ``model``'s weights, plus
    ``"random_at_helpful_lr"``: random points at the learning rate the helpful run used (with ``lr="auto"`` each
    run picks its own, and random points, whose gradient barely moves the anchors' loss, get a small one)."""
    return compare_selections(
        model,
        anchors,
        challenge,
        selections=("helpful", "random", "harmful"),
        random_at_lr_of="helpful",
        make_influence=make_influence,
        seeds=[seed],
        also={"test": test},
        keep=keep,
        steps=steps,
    )


def run_demo(
    out: Path,
    *,
    seeds: list[int],
    epochs: int = 5,
    num_steps: int = 10,
    lr: float | str = "auto",
    keep: str = "improved",
    num_candidates: int = 200,
    depth: int = 100,
    damping: float = 0.1,
) -> dict[str, Any]:
    """Train one model per seed, compare selections from its weights; write ``correction_demo.json``/``.md``."""
    out.mkdir(parents=True, exist_ok=True)
    per_seed = []
    start = time.perf_counter()
    for seed in seeds:
        pl.seed_everything(seed)
        dm = SpuriousDigitsDataModule(seed=seed)
        dm.setup("fit")
        model = DigitsClassifier(num_classes=2)
        snap = out / f"snapshot-{seed}"
        trainer = pl.Trainer(
            max_epochs=epochs,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=out,
            callbacks=[FeatureSnapshot(dirpath=snap)],
        )
        trainer.fit(model, datamodule=dm)

        def make_influence(m: torch.nn.Module, dm: Any = dm, snap: Path = snap) -> InfluenceModule:
            # A CNN's Hessian is indefinite: damping must exceed its most negative eigenvalue or LiSSA diverges.
            ihvp = LiSSA(damping=damping, recursion_depth=depth, batch_size=8, residual_examples=0, seed=seed)
            return InfluenceModule(
                m,
                train_dataset=dm.train_dataset,
                snapshot=snap,
                num_candidates=num_candidates,
                ihvp=ihvp,
                compute=ComputeArguments(progress=False),
            )

        table = compare_with_matched_random(
            model,
            dm.challenge_dataset,
            dm.challenge_eval_dataset,
            dm.test_dataset,
            make_influence=make_influence,
            seed=seed,
            steps=CorrectionArguments(num_steps=num_steps, lr=lr),
            keep=keep,
        )
        per_seed.append({"seed": seed, "test_accuracy": accuracy(model, dm.test_dataset), **table})
    summary: dict[str, Any] = {
        "seeds": seeds,
        "num_steps": num_steps,
        "lr": lr,
        "keep": keep,
        "num_candidates": num_candidates,
        "damping": damping,
        "recursion_depth": depth,
    }
    for selection in SELECTIONS:
        gains = [s[selection]["gain_mean"] for s in per_seed]
        summary[selection] = {
            "gain_mean": statistics.fmean(gains),
            "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
            "before_mean": statistics.fmean(s[selection]["before"] for s in per_seed),
            "after_mean": statistics.fmean(s[selection]["after_mean"] for s in per_seed),
            "lrs": [run["lr"] for s in per_seed for run in s[selection]["runs"]],
            "kept": sum(run["kept"] for s in per_seed for run in s[selection]["runs"]),
            "test_change_mean": statistics.fmean(
                run["test_after"] - s[selection]["test_before"] for s in per_seed for run in s[selection]["runs"]
            ),
        }
    summary["test_accuracy_mean"] = statistics.fmean(s["test_accuracy"] for s in per_seed)
    summary["per_seed"] = per_seed
    summary["seconds"] = time.perf_counter() - start
    (out / "correction_demo.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"Challenge accuracy before correction: {summary['helpful']['before_mean']:.3f} "
        f"(test accuracy {summary['test_accuracy_mean']:.3f}); {num_steps} SGD steps at lr {lr!r} on 10 points "
        f"each, keep={keep!r}, {len(seeds)} seeds.",
        "",
        "| selection | challenge accuracy after | gain (mean ± std over seeds) | test accuracy change | lr used "
        "| kept |",
        "|---|---|---|---|---|---|",
    ]
    for selection in SELECTIONS:
        s = summary[selection]
        lrs = ", ".join(f"{x:g}" for x in s["lrs"])
        lines.append(
            f"| {selection} | {s['after_mean']:.3f} | {100 * s['gain_mean']:+.1f} ± {100 * s['gain_std']:.1f} pts "
            f"| {100 * s['test_change_mean']:+.1f} pts | {lrs} | {s['kept']}/{len(s['lrs'])} |"
        )
    (out / "correction_demo.md").write_text("\n".join(lines) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/correction_demo"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="CI size: 1 seed, 2 epochs, 2 steps")
    args = parser.parse_args()
    if args.small:
        summary = run_demo(args.out, seeds=[0], epochs=2, num_steps=2, num_candidates=40, depth=20)
    else:
        summary = run_demo(args.out, seeds=list(range(args.seeds)))
    print((args.out / "correction_demo.md").read_text())
    print(f"({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
