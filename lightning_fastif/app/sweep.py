"""A ``mode=verify`` multirun of the app, summarised: correlation with exact influence and residual by damping."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_fastif.app.plots import plot_sweep
from lightning_fastif.io.atomic import atomic_write_bytes


def summarize_verify_sweep(sweep_dir: str | Path, path: str | Path | None = None) -> Path:
    """Plot a ``mode=verify`` multirun: correlation to exact and residual against damping (one point per run).

    ``python -m lightning_fastif -m mode=verify influence.ihvp.damping=0.3,1,3,10`` writes one ``verify.json`` per
    run under Hydra's sweep directory; this collects them, writes ``sweep.json`` and a PNG (default
    ``<sweep_dir>/damping_sweep.png``) and returns the PNG's path.

    Raises:
        FileNotFoundError: if ``sweep_dir`` holds no ``*/verify.json``.
    """
    sweep_dir = Path(sweep_dir)
    files = sorted(sweep_dir.glob("*/verify.json"))
    if not files:
        raise FileNotFoundError(f"sweep_dir: no */verify.json under {str(sweep_dir)!r}; run a `-m mode=verify` sweep")
    rows = []
    for f in files:
        checks = json.loads(f.read_text())["verify"]
        rows.append(
            {
                "damping": float(checks["damping"]),
                "pearson": checks["pearson"],
                "spearman": checks["spearman"],
                "residual": checks["residual"],
                "passed": checks["passed"],
                "run": f.parent.name,
            }
        )
    rows.sort(key=lambda row: row["damping"])
    atomic_write_bytes(sweep_dir / "sweep.json", json.dumps(rows, indent=2).encode())
    return plot_sweep(
        [r["damping"] for r in rows],
        {"Pearson vs exact": [r["pearson"] for r in rows], "Spearman vs exact": [r["spearman"] for r in rows]},
        Path(path) if path is not None else sweep_dir / "damping_sweep.png",
        xlabel="damping λ",
        ylabel="correlation with exact influence",
        secondary={"relative residual": [r["residual"] for r in rows]},
        secondary_label="residual ‖(H+λI)x − v‖/‖v‖",
        title="LiSSA against exact influence, by damping",
    )
