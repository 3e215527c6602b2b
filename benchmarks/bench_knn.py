"""kNN candidates: time to snapshot and to index N = 10k and 100k examples, query latency for k = 100 and 1000, IVF recall.

Two parts:

* **Snapshot**: a real ``FeatureSnapshot`` at the end of a one-step fit, over N examples of a small MLP
  (64 -> 256 -> 128, features = the 128-d hidden layer): embedding, writing the safetensors file and the manifest,
  and for ``index="ivf"`` training and saving the FAISS IVF index. The time is the one the callback records.
* **Index**: synthetic clustered features (a mixture of 256 Gaussians, D = 128, as a trained model's features are
  clustered), indexed exactly (plain torch, FAISS flat) and with FAISS IVF (``nlist`` ~ 2 sqrt(N), ``nprobe`` 8, 32 and
  128). Build time includes IVF training. Query latency is the median of 3 repeats, for one query and per query in
  a batch of 100. Recall@k is the fraction of the exact k nearest neighbours an IVF search returns.

Run: ``python -m benchmarks.bench_knn [--smoke] [--threads 1]``; also writes ``benchmarks/results_knn.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import jsonable, machine_info, markdown_table, module_main, set_threads, time_call, write_atomic
from lightning_fastif.search.knn import KNNIndex, faiss_available, knn_recall

DIM = 128
QUERIES = 100
KS = (100, 1000)
RESULTS_PATH = Path(__file__).with_name("results_knn.json")


def clustered_features(n: int, dim: int, *, clusters: int = 256, seed: int = 0) -> Tensor:
    """``n`` points of a mixture of ``clusters`` Gaussians (centres spread 3x wider than each cluster)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen) * 3.0
    return centres[torch.randint(0, clusters, (n,), generator=gen)] + torch.randn(n, dim, generator=gen)


def _snapshot_seconds(n: int, index: str, workdir: Path) -> float:
    """Seconds a FeatureSnapshot at the end of a one-step fit takes over ``n`` examples (as it records them)."""
    import lightning.pytorch as pl

    from lightning_fastif.io.snapshot_store import snapshot_versions
    from lightning_fastif.lightning.snapshots import FeatureSnapshot

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, DIM), nn.ReLU())
            self.head = nn.Linear(DIM, 10)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.body(x))

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    dirpath = workdir / f"snap_{n}_{index}"
    trainer = pl.Trainer(
        default_root_dir=workdir,
        callbacks=[FeatureSnapshot(dirpath=dirpath, layer="head", hook="input", batch_size=1024, index=index)],
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MLP(), DataLoader(data, batch_size=256))
    [entry] = snapshot_versions(dirpath, "features")
    return float(entry["seconds"])


def _latencies(index: KNNIndex, queries: Tensor, k: int, repeats: int) -> tuple[float, float]:
    """(ms for one query, ms per query in a batch of ``len(queries)``), medians of ``repeats``."""
    one = time_call(lambda: index.search(queries[:1], k), repeats=repeats, warmup=1).median
    batch = time_call(lambda: index.search(queries, k), repeats=repeats, warmup=1).median
    return one * 1e3, batch * 1e3 / len(queries)


def run(*, smoke: bool = False, threads: int = 1) -> dict[str, Any]:
    """Benchmark snapshot and index building, query latency and IVF recall (see the module docstring)."""
    set_threads(threads)
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)
    sizes = (2_000, 5_000) if smoke else (10_000, 100_000)
    repeats = 1 if smoke else 3
    ks = tuple(min(k, sizes[0]) for k in KS) if smoke else KS
    gen = torch.Generator().manual_seed(1)

    snapshot_rows, index_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for kind in ("flat", "ivf") if faiss_available() else ("flat",):
                snapshot_rows.append({"n": n, "index": kind, "seconds": _snapshot_seconds(n, kind, Path(tmp))})

    for n in sizes:
        features = clustered_features(n, DIM, seed=n)
        queries = clustered_features(QUERIES, DIM, seed=n)[torch.randperm(QUERIES, generator=gen)]
        exact = KNNIndex(features, backend="torch", use_gpu=False)
        exact_ids = {k: exact.search(queries, k)[1] for k in ks}
        methods: list[tuple[str, dict[str, Any], list[int | None]]] = [("exact", {"backend": "torch"}, [None])]
        if faiss_available():
            methods += [
                ("exact", {"backend": "faiss"}, [None]),
                ("ivf", {"backend": "faiss", "kind": "ivf"}, [8, 32, 128]),
            ]
        for name, options, nprobes in methods:
            start = time.perf_counter()
            index = KNNIndex(features, use_gpu=False, **options).build()  # lazy otherwise: time it here
            build = time.perf_counter() - start
            for nprobe in nprobes:
                if nprobe is not None:
                    index.nprobe = nprobe
                row: dict[str, Any] = {
                    "n": n,
                    "method": name,
                    "backend": index.backend,
                    "nlist": index.nlist,
                    "nprobe": nprobe,
                    "build_s": build,
                }
                for k in ks:
                    one_ms, per_query_ms = _latencies(index, queries, k, repeats)
                    found = index.search(queries, k)[1]
                    row[f"k{k}_one_ms"] = one_ms
                    row[f"k{k}_batch_ms_per_query"] = per_query_ms
                    row[f"k{k}_recall"] = knn_recall(found, exact_ids[k])
                index_rows.append(row)

    snapshot_table = markdown_table(
        ["N", "index", "snapshot s (embed + write + index)"],
        [[r["n"], r["index"], r["seconds"]] for r in snapshot_rows],
    )
    columns = ["N", "method", "backend", "nlist", "nprobe", "build s"]
    for k in ks:
        columns += [f"k={k}: 1 query ms", f"k={k}: ms/query (batch {QUERIES})", f"recall@{k}"]
    table_rows = []
    for r in index_rows:
        cells = [r["n"], r["method"], r["backend"], r["nlist"], r["nprobe"], r["build_s"]]
        for k in ks:
            cells += [r[f"k{k}_one_ms"], r[f"k{k}_batch_ms_per_query"], r[f"k{k}_recall"]]
        table_rows.append(cells)
    index_table = markdown_table(columns, table_rows)
    info = machine_info(threads)
    markdown = (
        f"Snapshot of a 64-256-128 MLP's features at the end of a one-step fit (`FeatureSnapshot`, batch 1024):\n\n"
        f"{snapshot_table}\n\nIndex over synthetic clustered features (256 Gaussians, D={DIM}), {QUERIES} queries, "
        f"{threads} thread(s), {info['cpu']}:\n\n{index_table}\n"
    )
    out = {
        "name": "knn",
        "title": "kNN candidates: snapshot, index, query latency, IVF recall",
        "headline": {},
        "markdown": markdown,
        "details": {"machine": info, "dim": DIM, "queries": QUERIES, "snapshot": snapshot_rows, "index": index_rows},
    }
    if not smoke:
        write_atomic(RESULTS_PATH, json.dumps(jsonable(out), indent=2) + "\n")
    return out


if __name__ == "__main__":
    module_main(run, __doc__.splitlines()[0])
