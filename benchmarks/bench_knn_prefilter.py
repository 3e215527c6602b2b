"""The exact inner-product search over factored loss gradients: the full products against the low-rank prefilter.

FastIF's kNN stage searches ``N`` per-example loss gradients of a ``Linear`` layer, stored as their factors
(``δ``: ``C`` numbers, ``ã = [a; 1]``: ``D + 1``), with preconditioned test gradients (``C x (D+1)`` matrices
``Q``), for the ``k`` best rows of ``q`` and the ``2k`` best of ``-q`` (``KNNIndex.search_signed(..., "both")``).
:func:`~lightning_fastif.search.exact.exact_search` answers it two ways over the rows by decreasing norm:

* ``full``: every visited row's exact score with every query (``prefilter=False``);
* ``prefilter``: a bound from each query's rank-``r`` part first, exact scores only for the rows it keeps (default).

Both must return the same rows (checked here: ids equal, or the same rows with float32 ties in another order, and
distances within float32 rounding). Timings: median of
interleaved repeats, wall seconds and CPU seconds of this process (the machine is shared), one torch thread.

Data: with ``--workdir`` (a ``benchmarks.bench_scale`` work directory after its ``fit`` part, e.g. run with
``FASTIF_BENCH_CURVATURE=1 FASTIF_BENCH_ESTIMATOR=ekfac``), the snapshot's real factored gradients (N = 200,000,
``C = 10``, ``D = 128``) and the real queries of its 100 test points, preconditioned as FastIF does (EK-FAC block
or ``H_last``); without it, synthetic factors of the same shape: softmax-minus-one-hot ``δ`` of mostly well-fitted
examples, ReLU ``a``, and queries ``δ_t ã_tᵀ`` plus a decaying spectrum (``σ_j / σ_1``: 0.1, 0.03, 0.015, ...), as
the real ones have.

Run: ``python -m benchmarks.bench_knn_prefilter [--smoke] [--threads 1] [--workdir DIR --n 200000] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import jsonable, machine_info, markdown_table, set_threads, write_atomic
from lightning_fastif.core.factored_grads import FactoredGradients
from lightning_fastif.search.exact import LowRankQueries, exact_search

N, SMOKE_N = 200_000, 5_000
QUERIES, SMOKE_QUERIES = 100, 10
K, SMOKE_K = 100, 10
C, D = 10, 128
REPEATS = 5
SPECTRUM = (1.0, 0.1, 0.03, 0.015, 0.008, 0.005, 0.002, 0.001, 0.0003)
"""``σ_j / σ_1`` of the synthetic queries (the means measured on bench_scale's EK-FAC-preconditioned queries)."""


def synthetic(n: int, queries: int, seed: int = 0) -> tuple[FactoredGradients, Tensor]:
    """Factored rows and queries shaped like a trained classifier's last layer (see the module's text)."""
    gen = torch.Generator().manual_seed(seed)

    def rows(count: int) -> tuple[Tensor, Tensor]:
        logits = torch.randn(count, C, generator=gen) * 4.0
        labels = torch.where(torch.rand(count, generator=gen) < 0.9, logits.argmax(1), torch.randint(0, C, (count,)))
        out_grads = logits.softmax(1) - torch.nn.functional.one_hot(labels, C).float()
        inputs = torch.relu(torch.randn(count, D, generator=gen) + 0.5 * torch.randn(1, D, generator=gen))
        return out_grads, inputs

    db = FactoredGradients(*rows(n), bias=True)
    g, a = rows(queries)
    main = g.unsqueeze(2) * torch.cat([a, torch.ones(queries, 1)], 1).unsqueeze(1)  # [Q, C, D+1], rank one
    scale = torch.linalg.matrix_norm(main, ord=2)
    extra = torch.zeros_like(main)
    for ratio in SPECTRUM[1:]:
        u = torch.nn.functional.normalize(torch.randn(queries, C, 1, generator=gen), dim=1)
        v = torch.nn.functional.normalize(torch.randn(queries, 1, D + 1, generator=gen), dim=2)
        extra += ratio * scale[:, None, None] * u * v
    mats = main + extra
    dense = torch.cat([mats[:, :, :D].reshape(queries, -1), mats[:, :, D]], 1)
    return db, dense


def real(workdir: Path, n: int, queries: int) -> tuple[FactoredGradients, Tensor]:
    """The factored features of ``bench_scale``'s snapshot at ``n`` and its test points' queries, as FastIF forms them."""
    os.environ.setdefault("FASTIF_BENCH_ESTIMATOR", "ekfac")
    from benchmarks import bench_scale as scale
    from lightning_fastif.core.ekfac import EKFAC
    from lightning_fastif.core.grads import evaluating
    from lightning_fastif.core.ihvp import AutoInverse
    from lightning_fastif.lightning.arguments import ComputeArguments
    from lightning_fastif.lightning.module import InfluenceModule
    from lightning_fastif.search.features import features_of_batch

    test_x, test_y = (t[:queries] for t in scale.make_data(scale.NUM_TEST, scale.TEST_SEED).tensors)
    module = InfluenceModule(
        scale._load_model(scale._model_path(workdir, "snapshot", n)),
        train_dataset=scale.make_data(n, scale.TRAIN_SEED),
        snapshot=str(scale._snapshot_dir(workdir, n)),
        params=scale.PARAMS,
        num_candidates=K,
        ihvp=EKFAC(damping=scale.DAMPING) if scale.ESTIMATOR == "ekfac" else AutoInverse(damping=scale.DAMPING),
        compute=ComputeArguments(progress=False),
    )
    with evaluating(module.model):
        g_test = features_of_batch(
            module.model, (test_x, test_y), layer=module.search.feature_layer, kind="loss_gradient",
            loss_fn=module.loss_fn,
        )  # fmt: skip
    q = module.precondition_query(g_test)  # (H + λI)⁻¹ g_test with the layer's EK-FAC block, as FastIF's search
    db = module.knn_index.features
    if not isinstance(db, FactoredGradients):
        raise SystemExit(f"--workdir: the snapshot at N={n} does not hold factored gradients")
    return db, q


def measure(db: FactoredGradients, q: Tensor, k: int, repeats: int) -> dict[str, Any]:
    """Both searches (interleaved repeats), the check that they agree, and the prefilter's rank."""
    start = time.perf_counter()
    norms = torch.cat([db.sq_norms(s, s + 65536) for s in range(0, len(db), 65536)]).sqrt()
    order = norms.argsort(descending=True)
    norm_order = (order, norms[order])
    build = time.perf_counter() - start
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in ("full", "prefilter")}
    found = {}
    for _ in range(repeats):
        for mode in times:
            wall, cpu = time.perf_counter(), time.process_time()
            found[mode] = exact_search(db, q, k, 2 * k, norm_order=norm_order, prefilter=mode == "prefilter")
            times[mode]["wall"].append(time.perf_counter() - wall)
            times[mode]["cpu"].append(time.process_time() - cpu)
    full, fast = found["full"], found["prefilter"]
    low_rank = LowRankQueries.of(db, q)
    return {
        "n": len(db),
        "queries": int(q.shape[0]),
        "k": k,
        "rank": low_rank.rank if low_rank is not None else None,
        "norm_order_seconds": build,
        "seconds": {m: {w: sorted(v)[len(v) // 2] for w, v in t.items()} for m, t in times.items()},
        "ids_equal": bool(torch.equal(full[1], fast[1]) and torch.equal(full[3], fast[3])),
        # float32 ties may come in either order (distances equal): the same rows, and where the order differs
        "same_rows": all(torch.equal(full[i].sort(1).values, fast[i].sort(1).values) for i in (1, 3)),
        "positions_differing": int(sum(int((full[i] != fast[i]).sum()) for i in (1, 3))),
        "max_distance_difference": max(float((full[i] - fast[i]).abs().max()) for i in (0, 2)),
    }


def run(*, smoke: bool = False, threads: int = 1, workdir: str | None = None, n: int = N) -> dict[str, Any]:
    """Time both exact searches over synthetic factors (or ``bench_scale``'s snapshot with ``workdir``)."""
    set_threads(threads)
    k = SMOKE_K if smoke else K
    if workdir is not None:
        db, q = real(Path(workdir), n, SMOKE_QUERIES if smoke else QUERIES)
        data = f"bench_scale snapshot at N={n} ({workdir})"
    else:
        db, q = synthetic(SMOKE_N if smoke else n, SMOKE_QUERIES if smoke else QUERIES)
        data = "synthetic factors"
    out = measure(db, q, k, 1 if smoke else REPEATS)
    secs = out["seconds"]
    speedup = secs["full"]["cpu"] / secs["prefilter"]["cpu"] if secs["prefilter"]["cpu"] > 0 else None
    rows = [
        [out["n"], out["queries"], k, "full", secs["full"]["wall"], secs["full"]["cpu"], "", "", "", ""],
        [out["n"], out["queries"], k, f"prefilter (rank {out['rank']})", secs["prefilter"]["wall"],
         secs["prefilter"]["cpu"], out["ids_equal"], out["same_rows"], out["positions_differing"],
         out["max_distance_difference"]],
    ]  # fmt: skip
    columns = ["N", "queries", "k (and 2k of -q)", "search", "wall s", "CPU s", "ids equal", "same rows",
               "positions in another order (float32 ties)", "max |distance diff|"]  # fmt: skip
    markdown = (
        f"Data: {data}; {threads} thread(s); rows by decreasing norm "
        f"({out['norm_order_seconds']:.3g} s, not in the times); median of {1 if smoke else REPEATS} interleaved "
        f"repeats. Speedup (CPU s): {speedup:.3g}.\n\n" + markdown_table(columns, rows)
    )
    return {
        "name": "knn_prefilter",
        "title": "Exact kNN over factored gradients: low-rank prefilter",
        "headline": {},
        "markdown": markdown,
        "details": {**out, "speedup_cpu": speedup, "data": data, "machine": machine_info(threads)},
    }


def main() -> None:
    """``python -m benchmarks.bench_knn_prefilter``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--workdir", default=None, help="a bench_scale work directory (its snapshot's real data)")
    parser.add_argument("--n", type=int, default=N, help="the N of that snapshot, or of the synthetic rows")
    parser.add_argument("--json", type=Path, default=None, help="also write the returned dict here")
    args = parser.parse_args()
    out = run(smoke=args.smoke, threads=args.threads, workdir=args.workdir, n=args.n)
    print(f"## {out['title']}\n\n{out['markdown']}\n")
    if args.json is not None:
        write_atomic(args.json, json.dumps(jsonable(out), indent=2) + "\n")


if __name__ == "__main__":
    main()
