"""Trust the numbers: what LiSSA's "auto" settings choose and cost, memory per stage under a budget, a damping sweep.

On the digits CNN of :mod:`lightning_fastif.app.models` (``DigitsClassifier(conv1_channels=4, conv2_channels=8, hidden_dim=16)``, trained
briefly with Adam), influence is taken over its last two layers, ``hidden.*`` and ``classifier.*`` (2,234
parameters, separated by a ReLU: a non-convex slice), in float64, for 8 test points against all 1,079 training
points, so that :class:`~lightning_fastif.core.ihvp.ExactInverse` gives the reference at every damping. Three parts:

1. **auto against fixed settings**: ``LiSSA(scale="auto", recursion_depth="auto")`` (last iterate and with
   ``tail_fraction=0.5``) against FastIF's fixed settings at the same damping (``scale=1e4``, 1,000 steps; the
   original minibatch 128, and the fast setting of minibatch 1 with 4 repeats), and FastIF's literal setting
   ``damp=5e-3, scale=1e4`` (effective damping 50): the settings chosen, seconds, and the Pearson/Spearman
   correlation of the scores with exact influence at the same damping, and the residual.
2. **memory per stage** of :func:`~lightning_fastif.influence_scores` at two ``max_memory`` budgets: the chunk sizes
   the budget gave, and the seconds and measured extra peak RSS of each stage (test gradients, inverse HVP, scoring).
3. **damping sweep**: Pearson with exact influence and residual against damping for recursion depths 100, 300,
   1,000 and "auto"; a PNG and a JSON (``benchmarks/trust/``).

Run: ``python -m benchmarks.bench_trust [--smoke] [--threads 1]`` (about two minutes on one core).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from benchmarks.common import jsonable, markdown_table, module_main, pearson, set_threads, spearman, write_atomic
from lightning_fastif import (
    ExactInverse,
    FunctionalLoss,
    HessianOperator,
    InverseHVP,
    LiSSA,
    LiSSADivergenceError,
    influence_scores,
)
from lightning_fastif.core.memory import format_bytes, measure_example_cost, plan_chunks

OUT_DIR = Path(__file__).resolve().parent / "trust"
PARAMS = ["hidden.*", "classifier.*"]
DAMPING = 1.0
"""Above |λ_min| of the slice's Hessian (about -0.46 after training), so that LiSSA can converge."""


def _step_of(message: str) -> int | None:
    """The step a divergence message names (``... at step 96 ...``), if it names one."""
    import re

    found = re.search(r"step (\d+)", message)
    return int(found.group(1)) if found else None


def _stopped(value: object) -> str:
    """Why a LiSSA solve stopped: one reason (``"tol"``, ``"depth"``, ...), or the first of a per-repeat list."""
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else "depth"
    return str(value or "depth")


def digits_problem(smoke: bool) -> dict[str, Any]:
    """The trained digits CNN (float64 afterwards), its training set and 8 test points."""
    from lightning_fastif.app.data import DigitsDataModule
    from lightning_fastif.app.models import DigitsClassifier

    torch.manual_seed(0)
    dm = DigitsDataModule(seed=0)
    dm.setup()
    x, y = dm.train_dataset.tensors
    if smoke:
        x, y = x[:120], y[:120]
    model = DigitsClassifier(conv1_channels=4, conv2_channels=8, hidden_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(2 if smoke else 15):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model = model.double().eval()
    tx, ty = dm.test_dataset.tensors
    with torch.no_grad():
        accuracy = float((model(tx.double()).argmax(-1) == ty).double().mean())
    train = TensorDataset(x.double(), y)
    test = (tx[:8].double(), ty[:8])
    function = FunctionalLoss(model, None, PARAMS)
    operator = HessianOperator(model, None, train, function=function)
    eigenvalues = torch.linalg.eigvalsh(operator.dense(function.num_params))
    return {
        "model": model,
        "train": train,
        "test": test,
        "function": function,
        "operator": operator,
        "lambda_min": float(eigenvalues[0]),
        "lambda_max": float(eigenvalues[-1]),
        "g_train": torch.cat([function.per_example_gradients(b) for _, b in function_chunks(train)]),
        "g_test": function.per_example_gradients(test),
        "accuracy": accuracy,
        "num_params": function.num_params,
    }


def function_chunks(train: TensorDataset, size: int = 256) -> Any:
    from lightning_fastif.core.batches import IndexedData

    return IndexedData(train).chunks(size)


def evaluate(problem: dict[str, Any], est: InverseHVP, exact_scores: torch.Tensor) -> dict[str, Any]:
    """Solve with ``est``; the scores' agreement with exact ones, the residual, seconds and the settings used.

    A divergence is a result too (small damping on this non-convex slice): the row says so, with LiSSA's advice.
    """
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "reached max_depth" shows as stopped_by in the tables
            s_test = est.solve(problem["operator"], problem["g_test"])
    except LiSSADivergenceError as err:
        return {
            "seconds": time.perf_counter() - start,
            "pearson": None,
            "spearman": None,
            "residual": None,
            "scale": est.diagnostics.get("scale"),
            "iterations": [_step_of(str(err))],
            "stopped_by": "diverged",
            "eigenvalue": None,
            "scale_seconds": None,
            "diverged": str(err),
        }
    seconds = time.perf_counter() - start
    scores = s_test @ problem["g_train"].T
    d = est.diagnostics
    rows = range(scores.shape[0])
    return {
        "seconds": seconds,
        "pearson": sum(pearson(scores[t], exact_scores[t]) for t in rows) / len(rows),
        "spearman": sum(spearman(scores[t], exact_scores[t]) for t in rows) / len(rows),
        "residual": d.get("residual"),
        "scale": d.get("scale"),
        "iterations": d.get("iterations"),
        "stopped_by": d.get("stopped_by"),
        "eigenvalue": (d.get("scale_estimate") or {}).get("eigenvalue"),
        "scale_seconds": (d.get("scale_estimate") or {}).get("seconds"),
        "diverged": None,
    }


def exact_scores(problem: dict[str, Any], damping: float) -> torch.Tensor:
    """Exact influence at ``damping`` (the dense Hessian is built once per operator and cached)."""
    return ExactInverse(damping, max_params=problem["num_params"]).solve(problem["operator"], problem["g_test"]) @ (
        problem["g_train"].T
    )


def auto_vs_fixed(problem: dict[str, Any], smoke: bool) -> tuple[list[dict[str, Any]], str]:
    depth = 50 if smoke else 1000
    max_depth = 200 if smoke else 5000
    settings = [
        ("auto (last iterate)", DAMPING, LiSSA(DAMPING, recursion_depth="auto", max_depth=max_depth)),
        (
            "auto + tail_fraction=0.5",
            DAMPING,
            LiSSA(DAMPING, recursion_depth="auto", max_depth=max_depth, tail_fraction=0.5),
        ),
        (
            f"FastIF original: scale 1e4, {depth} steps, batch 128",
            DAMPING,
            LiSSA(DAMPING, scale=1e4, recursion_depth=depth, batch_size=128),
        ),
        (
            f"FastIF fast: scale 1e4, {depth} steps, batch 1, 4 repeats",
            DAMPING,
            LiSSA(DAMPING, scale=1e4, recursion_depth=depth, batch_size=1, num_repeats=4),
        ),
        (
            f"FastIF literal: damp 5e-3, scale 1e4 (damping 50), {depth} steps, batch 1, 4 repeats",
            50.0,
            LiSSA(50.0, scale=1e4, recursion_depth=depth, batch_size=1, num_repeats=4),
        ),
    ]
    references = {d: exact_scores(problem, d) for d in sorted({d for _, d, _ in settings})}
    rows = []
    for name, damping, est in settings:
        out = evaluate(problem, est, references[damping])
        rows.append({"setting": name, "damping": damping, **out})
    table = markdown_table(
        ["setting", "damping", "scale", "steps", "seconds", "Pearson vs exact", "Spearman", "residual"],
        [
            [
                r["setting"],
                r["damping"],
                r["scale"],
                "/".join(str(i) for i in r["iterations"]) if len(set(r["iterations"])) > 1 else r["iterations"][0],
                r["seconds"],
                r["pearson"],
                r["spearman"],
                r["residual"],
            ]
            for r in rows
        ],
    )
    auto = rows[0]
    if auto["diverged"]:
        note = f"\n\n`auto` diverged: {auto['diverged']}"
    else:
        note = (
            f'\n\n`scale="auto"` estimated the top minibatch-Hessian eigenvalue at {auto["eigenvalue"]:.3g} '
            f"(8 batches of 8, {auto['scale_seconds']:.2f} s) and chose scale {auto['scale']:.3g} "
            f'(1.5x (eigenvalue + damping)); `recursion_depth="auto"` stopped after {auto["iterations"][0]} steps '
            f"({_stopped(auto['stopped_by'])})."
        )
    if 50.0 in references and DAMPING in references:
        exact_50, exact_d = references[50.0], references[DAMPING]
        agreement = sum(pearson(exact_50[t], exact_d[t]) for t in range(exact_d.shape[0])) / exact_d.shape[0]
        note += (
            f" FastIF's literal setting answers a different question: exact influence at damping 50 against exact "
            f"influence at damping {DAMPING:g} has Pearson {agreement:.3f}."
        )
    return rows, table + note


def memory_budgets(problem: dict[str, Any], smoke: bool) -> tuple[list[dict[str, Any]], str]:
    model, train, test = problem["model"], problem["train"], problem["test"]
    cost = measure_example_cost(problem["function"], train)
    minimum = plan_chunks(cost, 10**15, num_vectors=8).minimum
    budgets = [2 * minimum, max(64 * 10**6, 4 * minimum)]
    # Warm-up: the first forward-mode (JVP) call sets up torch.func's machinery (~10 MB once), not a per-chunk cost.
    influence_scores(
        model,
        None,
        test,
        TensorDataset(*(t[:4] for t in train.tensors)),
        ihvp=ExactInverse(1.0),
        params=PARAMS,
        method="jvp",
    )
    rows = []
    reference = None
    for budget in budgets:
        info: dict[str, Any] = {}
        est = LiSSA(DAMPING, recursion_depth=50 if smoke else 300, tail_fraction=0.5)
        scores = influence_scores(
            model, None, test, train, ihvp=est, params=PARAMS, max_memory=budget, diagnostics=info, method="jvp"
        )
        if reference is None:
            reference = scores
        plan = info["memory_plan"]
        for stage, record in info["stages"].items():
            work = {"test_gradients": "gradients", "inverse_hvp": "hvp", "scoring": "scoring"}[stage]
            chunk = {"test_gradients": "test_gradients", "inverse_hvp": "hessian", "scoring": "scoring"}[stage]
            rows.append(
                {
                    "max_memory": format_bytes(budget),
                    "stage": stage,
                    "chunk": info["chunks"][chunk],
                    "planned_bytes": plan["fixed"][work] + info["chunks"][chunk] * plan["per_example"][work],
                    "extra_bytes": record["cpu_extra_bytes"],
                    "peak_bytes": record["cpu_peak_bytes"],
                    "seconds": record["seconds"],
                    "same_scores": bool(torch.allclose(scores, reference, rtol=1e-8, atol=1e-10)),
                }
            )
    table = markdown_table(
        ["max_memory", "stage", "chunk (examples)", "planned", "measured extra RSS", "peak RSS", "seconds"],
        [
            [
                r["max_memory"],
                r["stage"],
                r["chunk"],
                format_bytes(r["planned_bytes"]),
                format_bytes(r["extra_bytes"]),
                format_bytes(r["peak_bytes"]),
                r["seconds"],
            ]
            for r in rows
        ],
    )
    note = (
        f"\n\nOne example's activations: {format_bytes(cost.activation_bytes)} (measured); "
        f"{cost.num_params} parameters of {cost.itemsize} bytes; the smallest budget for 8 test points is "
        f"{format_bytes(minimum)}. Scores equal across budgets: {all(r['same_scores'] for r in rows)}. Measured extra "
        "RSS is the stage's peak above its starting RSS (at the start of each stage the kernel's peak counter is reset "
        "and glibc's free heap pages are returned to the OS); 'planned' is the cost model's fixed part plus the chunk."
    )
    return rows, table + note


def damping_sweep(problem: dict[str, Any], smoke: bool, out_dir: Path | None) -> tuple[list[dict[str, Any]], str]:
    """LiSSA against exact influence over a grid of dampings and depths; the PNG and JSON go to ``out_dir``."""
    dampings = [0.1, 1.0] if smoke else [0.01, 0.1, 0.3, 1.0, 3.0, 10.0]
    depths: list[int | str] = [20, "auto"] if smoke else [100, 300, 1000, "auto"]
    max_depth = 100 if smoke else 3000
    rows = []
    for damping in dampings:
        reference = exact_scores(problem, damping)
        for depth in depths:
            est = LiSSA(damping, recursion_depth=depth, max_depth=max_depth, tail_fraction=0.5)
            out = evaluate(problem, est, reference)
            rows.append({"damping": damping, "depth": str(depth), **out})
    table = markdown_table(
        ["damping", "depth", "steps", "stopped by", "scale", "Pearson vs exact", "residual", "seconds"],
        [
            [
                r["damping"],
                r["depth"],
                r["iterations"][0],
                _stopped(r["stopped_by"]),
                r["scale"],
                r["pearson"],
                r["residual"],
                r["seconds"],
            ]
            for r in rows
        ],
    )
    diverged = sorted({r["damping"] for r in rows if r["diverged"]})
    detected = (
        f"with auto depth it raised LiSSADivergenceError at damping {', '.join(f'{d:g}' for d in diverged)}"
        if diverged
        else "no divergence was detected within these depths"
    )
    note = (
        f"\n\nBelow damping {-problem['lambda_min']:.2g} (= -λ_min(H)) `H + λI` is indefinite and LiSSA cannot "
        f"converge: {detected}; fixed depths return numbers unrelated to exact influence, and only their residual "
        "says so."
    )
    if out_dir is not None:
        png = plot_sweep(rows, out_dir / "damping_sweep.png", -problem["lambda_min"])
        raw = write_atomic(out_dir / "damping_sweep.json", json.dumps(jsonable(rows), indent=2) + "\n")
        raw.chmod(0o644)
        note += f"\n\n![damping sweep]({png.relative_to(out_dir.parent).as_posix()}) (raw: `damping_sweep.json`)"
    return rows, table + note


def plot_sweep(rows: list[dict[str, Any]], path: Path, negative: float) -> Path:
    """Pearson with exact and residual against damping, one line per depth; written atomically.

    ``negative`` is ``-λ_min(H)``: below that damping ``H + λI`` is indefinite and LiSSA cannot converge.
    """
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for depth in dict.fromkeys(r["depth"] for r in rows):
        part = [r for r in rows if r["depth"] == depth]
        x = [r["damping"] for r in part]
        left.plot(x, [r["pearson"] for r in part], marker="o", label=f"depth {depth}")
        right.plot(x, [r["residual"] for r in part], marker="o", label=f"depth {depth}")
    for ax, label in ((left, "Pearson with exact influence"), (right, "relative residual")):
        if negative > 0:
            ax.axvline(negative, color="grey", linestyle="--", linewidth=1, label="-λ_min(H)")
        ax.set_xscale("log")
        ax.set_xlabel("damping λ")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    right.set_yscale("log")
    fig.suptitle("LiSSA (scale='auto', tail_fraction=0.5) on the digits CNN's last two layers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def run(*, smoke: bool = False, threads: int = 1, out_dir: str | Path | None = None) -> dict[str, Any]:
    """The three parts; the sweep's PNG/JSON go to ``out_dir`` (default ``benchmarks/trust``; none when smoke)."""
    set_threads(threads)
    target = Path(out_dir) if out_dir is not None else (None if smoke else OUT_DIR)
    start = time.perf_counter()
    problem = digits_problem(smoke)
    auto_rows, auto_md = auto_vs_fixed(problem, smoke)
    memory_rows, memory_md = memory_budgets(problem, smoke)
    sweep_rows, sweep_md = damping_sweep(problem, smoke, target)
    head = (
        f"DigitsClassifier(conv1_channels=4, conv2_channels=8, hidden_dim=16), test accuracy {problem['accuracy']:.3f}; influence over "
        f"{', '.join(PARAMS)} ({problem['num_params']} parameters, float64; the Hessian's eigenvalues span "
        f"{problem['lambda_min']:.3g} to {problem['lambda_max']:.3g}: not convex), 8 test points x "
        f"{len(problem['train'])} training points; Pearson/Spearman: scores against ExactInverse at the same damping, "
        "per test point, averaged."
    )
    markdown = "\n\n".join(
        [
            head,
            f"**Auto against fixed settings** (damping {DAMPING}):\n\n{auto_md}",
            f"**Memory per stage at two budgets** (`influence_scores(..., max_memory=...)`, LiSSA):\n\n{memory_md}",
            f"**Damping sweep** (LiSSA, scale auto, tail_fraction 0.5):\n\n{sweep_md}",
        ]
    )
    return {
        "name": "trust",
        "title": "Trust: auto LiSSA settings, memory budgets, damping sweep",
        "headline": {},
        "markdown": markdown,
        "details": jsonable(
            {
                "auto_vs_fixed": auto_rows,
                "memory": memory_rows,
                "damping_sweep": sweep_rows,
                "accuracy": problem["accuracy"],
                "num_params": problem["num_params"],
                "lambda_min": problem["lambda_min"],
                "lambda_max": problem["lambda_max"],
                "seconds": time.perf_counter() - start,
            }
        ),
    }


if __name__ == "__main__":
    module_main(run, __doc__.splitlines()[0])
