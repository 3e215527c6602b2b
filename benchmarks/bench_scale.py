"""FastIF at a user's scale: snapshot overhead, FastIF against all-N influence, self-influence against Kronfluence.

Setting: synthetic data, 64 Gaussian features, 10 classes labelled by a fixed random teacher MLP (64-64-10, tanh,
argmax) with 10% of the labels replaced by uniform random classes; an MLP 64-256-128-10 (ReLU) as a LightningModule
with ``per_example_loss(batch)`` (cross-entropy, no reduction), trained for 2 epochs with Adam (lr 1e-3, batch 64,
shuffled, seed 0). Influence is taken over its last two layers (``net.2``: 256->128 and ``net.4``: 128->10,
34,186 parameters). One torch thread everywhere.

Every measurement that reports a peak runs in its own process (``python -m benchmarks.bench_scale --worker <part>``,
which prints one JSON line), and its peak is that process's own ``ru_maxrss``: the peaks do not mix. Each ratio
comes from one run of each side (the machine is shared; the runs are minutes long).

Parts (``--parts``):

* ``fit``: ``Trainer.fit`` alone against the same seeded fit with ``FeatureSnapshot(features="loss_gradient")``
  (its defaults: the last layer's per-example loss gradients, ``index="auto"``, ``H_last`` over 8,192 examples);
  wall time, peak RSS, size of the features file. The snapshot run keeps the model and snapshot for ``fastif``.
* ``fastif``: ``trainer.predict`` with ``InfluenceModule(num_candidates=100)`` (default estimator at damping 0.2) over 100
  test points (one predict batch), against the same module with ``num_candidates=None`` (every training point
  scored) over 4 test points (one batch); seconds per test point, speedup, and the recall of the all-N top-10
  helpful points among FastIF's candidates for those 4 points.
* ``self_influence``: self-influence of every training point with ours (``fit_kfac`` + ``ekfac_correct``, the
  low-rank correction toward the Hessian ``fit_low_rank_correction``: ``CORRECTION_STEPS`` Lanczos steps on
  ``M^½(H + λI)M^½``, then ``ekfac_self_influence(correction=...)``) and with Kronfluence's EK-FAC
  (``Analyzer.fit_all_factors`` + ``compute_self_scores``), both at the same damping; Pearson of each, and of our
  EK-FAC alone (no correction), against conjugate gradients on the Hessian (float64, tight tolerance) over a sample
  of training points.
* ``million``: N = 1,000,000: fit + snapshot, then FastIF for 100 test points (only when asked for).
* ``minilm``: FastIF with the DEFAULT settings on a real transformer: all-MiniLM-L6-v2 with its top layer and a
  linear head (1.78M parameters) fine-tuned for one epoch on 2,000 Rotten Tomatoes snippets (length 64, the cached
  frozen prefix of ``examples/text_experiments.py``), ``FeatureSnapshot`` at its defaults, then
  ``InfluenceModule`` with its defaults (no ``ihvp``, ``num_candidates``, ``search`` or ``compute`` given) over 20
  test points in one predict batch; seconds per test point and the stage breakdown of the result's timings
  (only when asked for; smoke: a random 2-layer BERT, 160 snippets).

``--device cuda`` runs the Trainer-driven workers (fit, fastif, minilm's predict) on the GPU; the self-influence
workers stay on the CPU.

Run: ``python -m benchmarks.bench_scale [--smoke] [--parts fit,fastif,self_influence,million,minilm]
[--sizes 10000,50000,200000] [--device cpu|cuda] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from benchmarks.common import goal, jsonable, machine_info, markdown_table, pearson, set_threads, write_atomic

NUM_FEATURES = 64
NUM_CLASSES = 10
LABEL_NOISE = 0.1
EPOCHS = 2
TRAIN_BATCH = 64
LEARNING_RATE = 1e-3
PARAMS = ["net.2.*", "net.4.*"]
"""The last two Linear layers: 256*128 + 128 + 128*10 + 10 = 34,186 parameters."""
NUM_PARAMS = 34_186
TRAIN_SEED, TEST_SEED, TEACHER_SEED = 0, 1, 1234

NUM_TEST = 100
NUM_TEST_ALL = 4
NUM_CANDIDATES = 100
TOP = 10

SIZES = (10_000, 50_000, 200_000)
SMOKE_SIZES = (600,)
TARGET_SIZE = 200_000
"""The N the time and speedup targets are stated for."""
SELF_N, SMOKE_SELF_N = 50_000, 2_000
MILLION = 1_000_000
SMOKE_TEST = 8
SMOKE_CANDIDATES = 20

DAMPING = float(os.environ.get("FASTIF_BENCH_DAMPING", "0.2"))
"""λ of every estimator here; the smoke run's barely trained small MLP needs more (set for its worker processes)."""
"""λ of the self-influence comparison (ours, Kronfluence and the reference alike). The Hessian over the two layers
is indefinite at N = 50k (Lanczos: eigenvalues from about -0.093 to 5.6), so conjugate gradients need λ above 0.093;
0.2 is about twice that, and CG then reaches a relative residual of 1e-8 in about 35 iterations."""
CURVATURE_BATCH = 256
"""Examples per pass of both EK-FAC implementations."""
CORRECTION_STEPS = int(os.environ.get("FASTIF_BENCH_CORRECTION_STEPS", "64"))
"""Lanczos steps of our low-rank correction of EK-FAC toward the Hessian (``0``: EK-FAC alone)."""
CORRECTION_EXAMPLES: int | None = int(os.environ.get("FASTIF_BENCH_CORRECTION_EXAMPLES", "0")) or None
"""Training examples of its Hessian-vector products (``None``: all)."""
REFERENCE_POINTS = 32
REFERENCE_TOL = 1e-6
REFERENCE_MAX_ITER = 500

DEVICE = os.environ.get("FASTIF_BENCH_DEVICE", "cpu")
ESTIMATOR = os.environ.get("FASTIF_BENCH_ESTIMATOR", "auto")
"""The ``fastif`` part's estimator: ``auto`` (the default ``AutoInverse``) or ``ekfac`` (``EKFAC``: uncertified,
factors fitted once per weights, then a few matrix products per solve)."""
CURVATURE = os.environ.get("FASTIF_BENCH_CURVATURE", "0") == "1"
"""With ``1`` the snapshot fit also runs ``CurvatureSnapshot(params=PARAMS)`` into the same directory: EK-FAC factors
fitted once at the end of fit, which the ``fastif`` part's ``EKFAC`` then reuses instead of fitting per run."""
CURVATURE_EXAMPLES = (
    int(os.environ["FASTIF_BENCH_CURVATURE_EXAMPLES"]) if os.environ.get("FASTIF_BENCH_CURVATURE_EXAMPLES") else None
)
"""``CurvatureSnapshot(examples=...)``: fit the factors on a seeded sample of this many training examples (default all)."""
"""The Trainer's accelerator in the workers (``--device`` sets it for the worker processes)."""

WORKER_TIMEOUT = 4 * 3600
MEMORY_FRACTION = 0.85
"""The ``million`` workers may map this fraction of the memory available when the part starts (``RLIMIT_AS``)."""
PARTS = ("fit", "fastif", "self_influence", "million", "minilm")
DEFAULT_PARTS = ("fit", "fastif", "self_influence")

TARGETS = {
    "fit_ratio": 1.3,
    "speedup": 50.0,
    "recall": 0.95,
    "self_pearson": 0.99,
    "self_time_ratio": 1.0,
}


# -- the setting ----------------------------------------------------------------------------------------------------
class ScaleMLP(LightningModule):
    """MLP 64-256-128-10 (ReLU) with a per-example cross-entropy; trained with Adam.

    Example::

        >>> model = ScaleMLP()
        >>> sum(p.numel() for n, p in model.named_parameters() if n.startswith(("net.2", "net.4")))
        34186
    """

    def __init__(self, lr: float = LEARNING_RATE) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(NUM_FEATURES, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def per_example_loss(self, batch: Any) -> Tensor:
        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y, reduction="none")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_example_loss(batch).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _teacher() -> nn.Module:
    torch.manual_seed(TEACHER_SEED)
    teacher = nn.Sequential(nn.Linear(NUM_FEATURES, 64), nn.Tanh(), nn.Linear(64, NUM_CLASSES))
    return teacher.eval()


def make_data(n: int, seed: int) -> TensorDataset:
    """``n`` examples: Gaussian features, teacher labels, 10% of them replaced by uniform random classes.

    Example::

        >>> x, y = make_data(5, 0).tensors
        >>> tuple(x.shape), int(y.max()) < 10
        ((5, 64), True)
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, NUM_FEATURES, generator=generator)
    teacher = _teacher()
    y = torch.empty(n, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, n, 65536):
            y[start : start + 65536] = teacher(x[start : start + 65536]).argmax(-1)
    noisy = torch.rand(n, generator=generator) < LABEL_NOISE
    y[noisy] = torch.randint(0, NUM_CLASSES, (int(noisy.sum()),), generator=generator)
    return TensorDataset(x, y)


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "kronfluence"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _trainer(root: str | Path, **kwargs: Any) -> Any:
    from lightning.pytorch import Trainer

    options = {
        "default_root_dir": str(root),
        "accelerator": DEVICE,
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    options.update(kwargs)
    return Trainer(**options)


def _peak_mb() -> float:
    """This process's peak resident set size, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stage(name: str) -> None:
    """Mark the worker's current stage on stderr: a worker that dies is reported with the last stage it began."""
    print(f"@stage {name}", file=sys.stderr, flush=True)


def _model_path(workdir: Path, tag: str, n: int) -> Path:
    return workdir / f"model_{tag}_{n}.pt"


def _snapshot_dir(workdir: Path, n: int) -> Path:
    return workdir / f"snapshot_{n}"


def _load_model(path: Path) -> ScaleMLP:
    model = ScaleMLP()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        right = sum(
            int((model(x[s : s + 65536]).argmax(-1) == y[s : s + 65536]).sum()) for s in range(0, len(y), 65536)
        )
    return right / len(y)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- workers (one process each) -------------------------------------------------------------------------------------
def worker_fit(n: int, workdir: Path, *, snapshot: bool, save: str | None) -> dict[str, Any]:
    """Fit (with or without the loss-gradient snapshot); time ``trainer.fit``; keep the model when ``save``."""
    from lightning.pytorch import seed_everything

    from lightning_fastif.io.snapshot_store import feature_snapshot_file, last_layer_hessian_file, snapshot_versions
    from lightning_fastif.lightning.snapshots import CurvatureSnapshot, FeatureSnapshot

    _stage("data")
    train = make_data(n, TRAIN_SEED)
    _stage("fit")
    seed_everything(TRAIN_SEED, verbose=False)
    model = ScaleMLP()
    callbacks: list[Any] = []
    if snapshot:
        callbacks.append(FeatureSnapshot(dirpath=_snapshot_dir(workdir, n), features="loss_gradient"))
        if CURVATURE:
            callbacks.append(
                CurvatureSnapshot(
                    dirpath=_snapshot_dir(workdir, n), params=PARAMS, batch_size=512, examples=CURVATURE_EXAMPLES
                )
            )
    trainer = _trainer(workdir / f"fit_{n}_{int(snapshot)}", max_epochs=EPOCHS, callbacks=callbacks)
    loader = DataLoader(
        train, batch_size=TRAIN_BATCH, shuffle=True, generator=torch.Generator().manual_seed(TRAIN_SEED)
    )
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    _stage("after fit")
    out: dict[str, Any] = {"n": n, "snapshot": snapshot, "seconds": seconds, "peak_rss_mb": _peak_mb()}
    model.eval()
    out["train_accuracy"] = _accuracy(model, train)
    if save is not None:
        torch.save(model.state_dict(), _model_path(workdir, save, n))
    if snapshot:
        directory = _snapshot_dir(workdir, n)
        path, entry = feature_snapshot_file(directory, "train")
        hessian = last_layer_hessian_file(directory, entry)
        record = entry["datasets"]["train"]
        out.update(
            features_bytes=path.stat().st_size,
            features_dim=entry["dim"],
            index_files_bytes=sum(p.stat().st_size for p in path.parent.glob("train.*") if p != path),
            hessian_bytes=hessian.stat().st_size if hessian is not None else 0,
            snapshot_bytes=_dir_bytes(directory),
            snapshot_seconds=entry.get("seconds"),
            curvature_seconds=sum(e.get("seconds") or 0.0 for e in snapshot_versions(directory, "curvature")),
            index=record.get("index"),
            hessian_examples=(entry.get("last_layer_hessian") or {}).get("hessian_examples"),
        )
    return out


IVF_COMPARISON_MIN_SIZE = 100_000
"""From this N the stages also time an IVF index against the exact search (``index="auto"``'s threshold)."""


def worker_snapshot_stages(n: int, workdir: Path) -> dict[str, Any]:
    """The snapshot's stages one by one, on the fitted model, as ``FeatureSnapshot`` runs them: seconds each.

    Inside fit: embed (the factors of the per-example loss gradients of ``net.4``) and the streamed write of each
    round of rows into the features file, and ``H_last`` (closed form) over the snapshot's sample of 8,192 examples. At the first search (not in
    fit): the exact search over the memory-mapped features and, from ``IVF_COMPARISON_MIN_SIZE`` examples, an IVF
    index over them whatever ``index="auto"`` picks (k-means training and adding the vectors, the ``nprobe`` tuning to
    recall 0.99 without self-matches, the cache write). The search time of 100 queries (k=100, both signs), exact
    against IVF, is what ``index="auto"``'s threshold (``AUTO_IVF_MIN_SIZE``) is chosen from.
    """
    from lightning_fastif.core.batches import IndexedData
    from lightning_fastif.core.factored_grads import extract_gradient_factors, linear_layer_hessian
    from lightning_fastif.core.grads import default_loss_fn
    from lightning_fastif.io.atomic import TensorFileWriter
    from lightning_fastif.search.index_files import factored_layout, factored_metadata
    from lightning_fastif.search.ivf import faiss_available
    from lightning_fastif.search.knn import TUNE_K, KNNIndex, features_metadata

    train = make_data(n, TRAIN_SEED)
    model = _load_model(_model_path(workdir, "snapshot", n))
    seconds: dict[str, float] = {"embed": 0.0, "write (streamed)": 0.0}
    directory = workdir / f"stages_{n}"
    _stage("embed + write")
    rows_per_round = 64 * 256
    data, layer, loss = IndexedData(train), model.net[4], default_loss_fn(model)
    first = extract_gradient_factors(model, data, layer, loss, indices=torch.tensor([0]))
    assert first is not None  # a Linear head: its gradients factor, as FeatureSnapshot stores them
    meta = factored_metadata(features_metadata("ip", "auto", None, 8), first.bias)
    layout = factored_layout(n, first.num_outputs, first.num_inputs)
    with TensorFileWriter(directory / "train.safetensors", layout, meta) as writer:
        for begin in range(0, n, rows_per_round):
            rows = torch.arange(begin, min(n, begin + rows_per_round))
            start = time.perf_counter()
            feats = extract_gradient_factors(model, data, layer, loss, indices=rows, batch_size=256)
            assert feats is not None
            seconds["embed"] += time.perf_counter() - start
            start = time.perf_counter()
            writer.write("out_grads", feats.out_grads, row=begin)
            writer.write("inputs", feats.inputs, row=begin)
            writer.write("indices", rows, row=begin)
            seconds["write (streamed)"] += time.perf_counter() - start
        start = time.perf_counter()
    seconds["write (streamed)"] += time.perf_counter() - start  # the flush to disk and the rename
    _stage("H_last")
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:8192].sort().values
    start = time.perf_counter()
    hessian = linear_layer_hessian(model, IndexedData(Subset(train, sample.tolist())), layer, loss, batch_size=256)
    assert hessian is not None
    seconds["H_last (8192 examples, closed form)"] = time.perf_counter() - start
    ivf = n >= IVF_COMPARISON_MIN_SIZE and faiss_available()  # measured even where index='auto' picks flat
    flat = KNNIndex.load(directory, "train", kind="flat", use_gpu=False)
    g = torch.Generator().manual_seed(1)
    queries = flat.features[torch.randperm(n, generator=g)[:100]] + 0.1 * torch.randn(100, flat.dim, generator=g)
    start = time.perf_counter()
    _, exact_ids = flat.search_signed(queries, 100, "both")
    seconds["first search: flat, 100 queries, k=100, both signs"] = time.perf_counter() - start
    out: dict[str, Any] = {"n": n, "seconds": seconds}
    if ivf:
        _stage("index (first search)")
        index = KNNIndex.load(directory, "train", kind="ivf", use_gpu=False)
        start = time.perf_counter()
        index._cache = None  # timed apart below
        index.build()
        seconds["first search: IVF train + add"] = time.perf_counter() - start
        start = time.perf_counter()
        index.tune(TUNE_K, target_recall=0.99)
        seconds["first search: IVF nprobe tuning (recall 0.99, self excluded)"] = time.perf_counter() - start
        start = time.perf_counter()
        index.save(directory, "ivf_copy")
        seconds["IVF save (features + cache file)"] = time.perf_counter() - start
        start = time.perf_counter()
        _, ivf_ids = index.search_signed(queries, 100, "both")
        seconds["IVF search, 100 queries, k=100, both signs"] = time.perf_counter() - start
        from lightning_fastif.metrics import knn_recall

        out["index"] = {"nlist": index.nlist, "nprobe": index.nprobe, "tuning": index.tuning}
        out["ivf_recall_on_perturbed_rows"] = knn_recall(ivf_ids, exact_ids)
    shutil.rmtree(directory, ignore_errors=True)
    return out


def _exact_candidates(module: Any, batch: tuple[Tensor, Tensor], k: int) -> Tensor:
    """The candidates the module's queries get from an exact (flat) search of the snapshot's features.

    Separates what the approximate index loses from what the embedding itself misses.
    """
    from lightning_fastif.core.grads import evaluating
    from lightning_fastif.search.knn import KNNIndex

    index = module.knn_index
    exact = KNNIndex(index.features, index.ids, metric=index.metric, kind="flat", backend="torch", use_gpu=False)
    damping = module.search.knn_damping if module.search.knn_damping is not None else module.ihvp.damping
    with torch.no_grad(), evaluating(module.model):
        queries = module.queries.embed(module.model, batch, module.loss_fn, damping)
    return module.queries.nearest(exact, queries, k)


def worker_influence(n: int, workdir: Path, *, mode: str, num_test: int, num_candidates: int) -> dict[str, Any]:
    """``trainer.predict`` with FastIF (``mode="fastif"``) or every training point (``"all"``), one test batch."""
    from lightning_fastif.core.ekfac import EKFAC
    from lightning_fastif.core.ihvp import AutoInverse
    from lightning_fastif.lightning.arguments import ComputeArguments
    from lightning_fastif.lightning.module import InfluenceModule

    _stage("data")
    train = make_data(n, TRAIN_SEED)
    test_x, test_y = (t[:num_test] for t in make_data(NUM_TEST, TEST_SEED).tensors)  # the same points at any count
    model = _load_model(_model_path(workdir, "snapshot", n))
    _stage("module")
    module = InfluenceModule(
        model,
        train_dataset=train,
        snapshot=str(_snapshot_dir(workdir, n)),
        params=PARAMS,
        num_candidates=num_candidates if mode == "fastif" else None,
        # The default estimator (AutoInverse), at the damping of this non-convex MLP: its default 0.01 is below
        # the Hessian's most negative eigenvalue here, and the certified solve says so instead of answering.
        ihvp=EKFAC(damping=DAMPING) if ESTIMATOR == "ekfac" else AutoInverse(damping=DAMPING),
        compute=ComputeArguments(progress=False),
    )
    loader = DataLoader(TensorDataset(test_x, test_y), batch_size=num_test)
    _stage("predict")
    start = time.perf_counter()
    _trainer(workdir / f"predict_{mode}_{n}").predict(module, loader)
    seconds = time.perf_counter() - start
    _stage("after predict")
    peak = _peak_mb()  # before the diagnosis below
    result = module.result
    manifest = result.manifest
    keep = min(NUM_TEST_ALL, num_test)
    saved = {"candidates": result.candidate_indices[:keep].clone(), "scores": result.scores[:keep].clone()}
    if mode == "fastif":
        _stage("exact kNN")
        saved["exact_candidates"] = _exact_candidates(module, (test_x[:keep], test_y[:keep]), num_candidates)
    torch.save(saved, workdir / f"influence_{mode}_{n}.pt")
    ihvp = manifest.get("ihvp", [{}])[0].get("diagnostics", [{}])
    return {
        "n": n,
        "mode": mode,
        "num_test": num_test,
        "candidates_per_point": int(result.candidate_indices.shape[1]),
        "seconds": seconds,
        "seconds_per_point": seconds / num_test,
        "manifest_wall_seconds": manifest.get("wall_seconds"),
        "stage_seconds": manifest["timings"]["total_seconds"],
        "ihvp": manifest["settings"].get("ihvp"),
        "ihvp_diagnostics": {k: ihvp[0].get(k) for k in ("iterations", "scale", "residual", "seconds")}
        if ihvp
        else None,
        "knn_preconditioned": module.knn_preconditioned,
        # The dense H_last of the features snapshot, or (under EKFAC) the scores' own EK-FAC block of that layer.
        "knn_query_curvature": (manifest["settings"].get("knn_preconditioner") or {}).get("curvature", "H_last")
        if module.knn_preconditioned
        else None,
        "index": {"kind": module.knn_index.kind, "nlist": module.knn_index.nlist, "nprobe": module.knn_index.nprobe}
        if mode == "fastif"
        else None,
        "peak_rss_mb": peak,
    }


def worker_self_ours(n: int, workdir: Path) -> dict[str, Any]:
    """Our self-influence of every training point: EK-FAC factors (two passes), the low-rank correction toward the
    Hessian (``CORRECTION_STEPS`` Lanczos steps, one Hessian-vector product over ``CORRECTION_EXAMPLES`` training
    examples each), then the scoring pass. EK-FAC alone (no correction) is also scored on the reference rows."""
    from lightning_fastif.core.curvature import ekfac_correct, ekfac_self_influence, fit_kfac
    from lightning_fastif.core.deflation import fit_low_rank_correction

    train = make_data(n, TRAIN_SEED)
    model = _load_model(_model_path(workdir, "self", n))
    _stage("fit_kfac")
    start = time.perf_counter()
    factors = fit_kfac(model, None, train, PARAMS, batch_size=CURVATURE_BATCH)
    kfac_seconds = time.perf_counter() - start
    _stage("ekfac_correct")
    factors = ekfac_correct(factors, model, None, train, batch_size=CURVATURE_BATCH)
    factor_seconds = time.perf_counter() - start
    _stage("fit_low_rank_correction")
    correction = None
    if CORRECTION_STEPS > 0:
        correction = fit_low_rank_correction(
            model, None, train, factors, DAMPING, PARAMS, steps=CORRECTION_STEPS, examples=CORRECTION_EXAMPLES
        )
    fit_seconds = time.perf_counter() - start
    _stage("ekfac_self_influence")
    start = time.perf_counter()
    scores = ekfac_self_influence(
        model, None, train, PARAMS, DAMPING, factors=factors, batch_size=CURVATURE_BATCH, correction=correction
    )
    score_seconds = time.perf_counter() - start
    torch.save(scores.double(), workdir / f"self_ours_{n}.pt")
    rows = _reference_indices(n)
    plain = ekfac_self_influence(model, None, Subset(train, rows.tolist()), PARAMS, DAMPING, factors=factors)
    torch.save({"rows": rows, "scores": plain.double()}, workdir / f"self_ours_plain_{n}.pt")
    eigenvalues = torch.cat([layer.eigenvalues().flatten() for layer in factors.layers])
    ritz = correction.diagnostics["ritz_values"] if correction is not None else [1.0]
    return {
        "n": n,
        "kfac_seconds": kfac_seconds,
        "factor_seconds": factor_seconds,
        "correction_seconds": fit_seconds - factor_seconds,
        "correction_steps": CORRECTION_STEPS,
        "correction_examples": correction.diagnostics["examples"] if correction is not None else 0,
        "ritz_range": [min(ritz), max(ritz)],
        "fit_seconds": fit_seconds,
        "score_seconds": score_seconds,
        "seconds": fit_seconds + score_seconds,
        "mean_eigenvalue": float(eigenvalues.mean()),
        "max_eigenvalue": float(eigenvalues.max()),
        "peak_rss_mb": _peak_mb(),
    }


def _kronfluence_task() -> Any:
    from kronfluence.task import Task

    class _Task(Task):
        """The same loss as ``ScaleMLP.per_example_loss``, summed over the batch as Kronfluence expects."""

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:  # labels drawn from the model: the true Fisher (Kronfluence's default curvature)
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self) -> list[str]:
            return ["2", "4"]  # net.2 and net.4 of ScaleMLP, as modules of the Sequential analysed

    return _Task()


def worker_self_kronfluence(n: int, workdir: Path, *, empirical: bool) -> dict[str, Any]:
    """Kronfluence's EK-FAC self-influence of every training point (its default settings but the damping)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    train = make_data(n, TRAIN_SEED)
    net = _load_model(_model_path(workdir, "self", n)).net
    torch.manual_seed(0)  # the sampled-label Fisher is random
    task = _kronfluence_task()
    analyzer = Analyzer(
        analysis_name=f"scale_{n}_{int(empirical)}",
        model=prepare_model(net, task),
        task=task,
        cpu=True,
        output_dir=str(workdir / "kronfluence"),
        disable_tqdm=True,
        disable_model_save=True,
    )
    _stage("fit_all_factors")
    start = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=train,
        per_device_batch_size=CURVATURE_BATCH,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=empirical),
        overwrite_output_dir=True,
    )
    fit_seconds = time.perf_counter() - start
    _stage("compute_self_scores")
    start = time.perf_counter()
    analyzer.compute_self_scores(
        scores_name="self",
        factors_name="ekfac",
        train_dataset=train,
        per_device_train_batch_size=CURVATURE_BATCH,
        score_args=ScoreArguments(damping_factor=DAMPING),
        overwrite_output_dir=True,
    )
    score_seconds = time.perf_counter() - start
    scores = analyzer.load_self_scores("self")["all_modules"]
    torch.save(scores.double(), workdir / f"self_kronfluence{'_empirical' if empirical else ''}_{n}.pt")
    return {
        "n": n,
        "empirical_fisher": empirical,
        "fit_seconds": fit_seconds,
        "score_seconds": score_seconds,
        "seconds": fit_seconds + score_seconds,
        "peak_rss_mb": _peak_mb(),
    }


def _reference_indices(n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(7))[: min(REFERENCE_POINTS, n)].sort().values


def worker_self_reference(n: int, workdir: Path) -> dict[str, Any]:
    """``g_iᵀ (H + λI)⁻¹ g_i`` for a sample of training points: conjugate gradients on the Hessian, in float64."""
    from lightning_fastif.core.ihvp import ConjugateGradient
    from lightning_fastif.core.influence import self_influence

    train = make_data(n, TRAIN_SEED)
    model = _load_model(_model_path(workdir, "self", n)).double()
    rows = _reference_indices(n)
    # The residual over every training example (one more product), not the default sample of 2048.
    cg = ConjugateGradient(DAMPING, max_iter=REFERENCE_MAX_ITER, tol=REFERENCE_TOL, residual_examples=None)
    diagnostics: dict[str, Any] = {}
    _stage("conjugate gradients")
    start = time.perf_counter()
    scores = self_influence(
        model,
        None,
        Subset(train, rows.tolist()),
        ihvp=cg,
        params=PARAMS,
        train_data=train,
        batch_size=len(rows),
        hessian_batch_size=2048,
        diagnostics=diagnostics,
    )
    seconds = time.perf_counter() - start
    torch.save({"rows": rows, "scores": scores.double()}, workdir / f"self_reference_{n}.pt")
    return {
        "n": n,
        "points": len(rows),
        "seconds": seconds,
        "iterations": cg.diagnostics.get("iterations"),
        "residual": cg.diagnostics.get("residual"),
        "tol": REFERENCE_TOL,
        "peak_rss_mb": _peak_mb(),
    }


WORKERS = ("fit", "fit_snapshot", "snapshot_stages", "fastif", "all", "self_train", "self_ours", "self_kronfluence",
           "self_kronfluence_empirical", "self_reference", "minilm")  # fmt: skip


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.memory_limit_mb is not None:
        # Address space, not RSS: an allocation past it fails with an error (and a traceback saying where) instead of
        # the kernel's OOM killer taking this or another process on a shared machine.
        limit = int(args.memory_limit_mb) * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _quiet()
    set_threads(args.threads)
    workdir, n, name = Path(args.workdir), args.n, args.worker
    if name in ("fit", "fit_snapshot"):
        return worker_fit(
            n, workdir, snapshot=name == "fit_snapshot", save="snapshot" if name == "fit_snapshot" else None
        )
    if name == "snapshot_stages":
        return worker_snapshot_stages(n, workdir)
    if name == "self_train":
        return worker_fit(n, workdir, snapshot=False, save="self")
    if name in ("fastif", "all"):
        return worker_influence(n, workdir, mode=name, num_test=args.num_test, num_candidates=args.num_candidates)
    if name == "self_ours":
        return worker_self_ours(n, workdir)
    if name in ("self_kronfluence", "self_kronfluence_empirical"):
        return worker_self_kronfluence(n, workdir, empirical=name.endswith("empirical"))
    if name == "self_reference":
        return worker_self_reference(n, workdir)
    if name == "minilm":
        return worker_minilm(n, workdir, num_test=args.num_test, encoder=args.encoder, damping=args.damping)
    raise ValueError(f"--worker: expected one of {WORKERS}, got {name!r}")


# -- the parent: workers in subprocesses ----------------------------------------------------------------------------
def _spawn(name: str, n: int, workdir: Path, threads: int, **extra: Any) -> dict[str, Any]:
    """Run one worker in a fresh process; its JSON line, or ``{"failed": ...}`` with the stage it died in."""
    command = [sys.executable, "-m", "benchmarks.bench_scale", "--worker", name, "--n", str(n)]
    command += ["--workdir", str(workdir), "--threads", str(threads)]
    for key, value in extra.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=WORKER_TIMEOUT, cwd=root)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        return _failure(name, n, f"timed out after {WORKER_TIMEOUT} s", stderr, time.perf_counter() - start)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        how = f"exit status {done.returncode}" + (" (killed: out of memory?)" if done.returncode in (-9, 137) else "")
        return _failure(name, n, how, done.stderr, time.perf_counter() - start)
    out = json.loads(lines[-1])
    out["process_seconds"] = time.perf_counter() - start
    return out


def _failure(name: str, n: int, how: str, stderr: str, seconds: float) -> dict[str, Any]:
    lines = stderr.splitlines()
    stages = [line.split(" ", 1)[1] for line in lines if line.startswith("@stage ")]
    text = [line.strip() for line in lines if line.strip() and not line.startswith("@stage ")]
    frames = [line for line in text if line.startswith("File ")][-3:]  # the innermost frames of the traceback
    return {
        "worker": name,
        "n": n,
        "failed": how,
        "stage": stages[-1] if stages else "start-up",
        "error": (text[-1] if text else "")[-400:],
        "where": frames,
        "process_seconds": seconds,
    }


def _ok(result: dict[str, Any] | None) -> bool:
    return result is not None and "failed" not in result


def _failed_note(result: dict[str, Any]) -> str:
    where = " <- ".join(reversed(result.get("where") or []))
    return (
        f"{result['worker']} at N={result['n']} failed ({result['failed']}) in stage '{result['stage']}': "
        f"{result.get('error') or ''}" + (f" [at {where}]" if where else "")
    )


# -- the parts ------------------------------------------------------------------------------------------------------
def _at_target(n: int, value: float | None, target: float, *, at_least: bool) -> tuple[str, str]:
    """Target and verdict cells: the target is stated for N = 200k only (and for N above it)."""
    if n < TARGET_SIZE:
        return f"({'≥' if at_least else '≤'} {target:g} at N = 200k)", ""
    return f"{'≥' if at_least else '≤'} {target:g}", goal(value, target, at_least=at_least)


def part_fit(sizes: Sequence[int], workdir: Path, threads: int) -> dict[str, Any]:
    """Plain fit against fit + loss-gradient snapshot at each N (two processes per N)."""
    rows, raw, notes = [], {}, []
    for n in sizes:
        plain = _spawn("fit", n, workdir, threads)
        snap = _spawn("fit_snapshot", n, workdir, threads)
        raw[n] = {"plain": plain, "snapshot": snap}
        for result in (plain, snap):
            if not _ok(result):
                notes.append(_failed_note(result))
        if not (_ok(plain) and _ok(snap)):
            continue
        ratio = snap["seconds"] / plain["seconds"]
        # The same fit without the snapshots' own seconds, in the same process: a ratio the machine's load cannot
        # skew (the two processes above run minutes apart on a shared machine). The callbacks do nothing else
        # during fit (no per-batch hook), so the rest of that run is the plain fit.
        own = snap["snapshot_seconds"] + snap.get("curvature_seconds", 0.0)
        in_run = snap["seconds"] / (snap["seconds"] - own)
        bound = plain["peak_rss_mb"] + 2 * snap["features_bytes"] / 2**20
        raw[n].update(time_ratio=ratio, time_ratio_in_run=in_run, peak_bound_mb=bound)
        target, verdict = _at_target(n, in_run, TARGETS["fit_ratio"], at_least=False)
        index = snap.get("index") or {}
        tuning = index.get("tuning") or {}
        rows += [
            [n, "fit s: plain / with snapshot", f"{plain['seconds']:.3g} / {snap['seconds']:.3g}", "", ""],
            [n, "time ratio, two processes (with snapshot / plain; each at its own moment's load)", ratio, "", ""],
            [n, "snapshots' own s (manifest): features (embed + write + H_last); curvature",
             f"{snap['snapshot_seconds']:.3g}; {snap.get('curvature_seconds', 0.0):.3g}", "", ""],
            [n, "time ratio in the snapshot run (fit / (fit - snapshots' own s))", in_run, target, verdict],
            [n, f"features file MiB ({snap['features_dim']}-d loss gradients, stored as their factors); whole snapshot MiB",
             f"{snap['features_bytes'] / 2**20:.4g}; {snap['snapshot_bytes'] / 2**20:.4g}", "", ""],
            [n, "index (kind, nlist, nprobe, tuned recall@100)",
             f"{index.get('kind')}, {index.get('nlist')}, {index.get('nprobe')}, {tuning.get('recall')}", "", ""],
            [n, "peak RSS MiB: plain / with snapshot", f"{plain['peak_rss_mb']:.4g} / {snap['peak_rss_mb']:.4g}",
             "", ""],
            [n, "peak with snapshot, MiB (bound: plain peak + 2 x features file)", snap["peak_rss_mb"],
             f"≤ {bound:.4g}", goal(snap["peak_rss_mb"], bound, at_least=False)],
        ]  # fmt: skip
        if in_run > TARGETS["fit_ratio"] or ratio > TARGETS["fit_ratio"]:  # where the time goes: stages one by one
            stages = _spawn("snapshot_stages", n, workdir, threads)
            raw[n]["snapshot_stages"] = stages
            if _ok(stages):
                text = ", ".join(f"{name} {value:.3g}" for name, value in stages["seconds"].items())
                rows.append([n, "snapshot stages s (re-run one by one)", text, "", ""])
            else:
                notes.append(_failed_note(stages))
    return {"rows": rows, "raw": raw, "notes": notes}


def _recall_and_agreement(workdir: Path, n: int, num_candidates: int) -> dict[str, Any]:
    fast = torch.load(workdir / f"influence_fastif_{n}.pt", weights_only=True)
    full = torch.load(workdir / f"influence_all_{n}.pt", weights_only=True)
    recalls, recalls_helpful, recalls_exact, index_recalls, pearsons = [], [], [], [], []
    for t in range(full["scores"].shape[0]):
        scores = full["scores"][t]  # every training point, in dataset order
        top = set(scores.topk(TOP).indices.tolist())
        cand = fast["candidates"][t]
        exact = fast["exact_candidates"][t]
        recalls.append(len(top & set(cand.tolist())) / TOP)
        recalls_helpful.append(len(top & set(cand[:num_candidates].tolist())) / TOP)
        recalls_exact.append(len(top & set(exact.tolist())) / TOP)
        index_recalls.append(len(set(cand.tolist()) & set(exact.tolist())) / exact.numel())
        pearsons.append(pearson(fast["scores"][t].double(), scores[cand].double()))
    return {
        "recall10": sum(recalls) / len(recalls),
        "recall10_helpful_direction": sum(recalls_helpful) / len(recalls_helpful),
        "recall10_exact_knn": sum(recalls_exact) / len(recalls_exact),
        "index_recall_of_exact_knn": sum(index_recalls) / len(index_recalls),
        "per_point_recall10": recalls,
        "score_pearson_on_candidates": pearsons,
    }


def _index_text(result: dict[str, Any]) -> str:
    index = result["index"]
    if index["kind"] != "ivf":
        return f"the snapshot's index is {index['kind']}"
    return f"the snapshot's index is IVF, nprobe {index['nprobe']} of {index['nlist']} lists"


def _stage_text(result: dict[str, Any]) -> str:
    """Seconds per stage, and the rest of the predict wall time (Trainer set-up, loading the index)."""
    stages = result["stage_seconds"]
    other = result["seconds"] - sum(stages.values())
    return ", ".join(f"{s} {v:.3g}" for s, v in stages.items()) + f", other {other:.3g}"


def part_fastif(sizes: Sequence[int], workdir: Path, threads: int, *, smoke: bool) -> dict[str, Any]:
    """FastIF (k = 100, 100 test points) against every training point (4 test points) at each N."""
    num_test = SMOKE_TEST if smoke else NUM_TEST
    k = SMOKE_CANDIDATES if smoke else NUM_CANDIDATES
    rows, raw, notes, speedups = [], {}, [], []
    for n in sizes:
        if not _model_path(workdir, "snapshot", n).exists():
            notes.append(f"N={n}: no model and snapshot from the fit part (run --parts fit,fastif)")
            continue
        fast = _spawn("fastif", n, workdir, threads, num_test=num_test, num_candidates=k)
        full = _spawn("all", n, workdir, threads, num_test=NUM_TEST_ALL, num_candidates=k)
        raw[n] = {"fastif": fast, "all": full}
        for result in (fast, full):
            if not _ok(result):
                notes.append(_failed_note(result))
        if not (_ok(fast) and _ok(full)):
            continue
        speedup = full["seconds_per_point"] / fast["seconds_per_point"]
        speedups.append((n, speedup))
        quality = _recall_and_agreement(workdir, n, k)
        raw[n].update(speedup=speedup, **quality)
        target, verdict = _at_target(n, speedup, TARGETS["speedup"], at_least=True)
        stages_fast, stages_full = _stage_text(fast), _stage_text(full)
        rows += [
            [n, f"FastIF s / test point ({num_test} points, {fast['candidates_per_point']} candidates each)",
             fast["seconds_per_point"], "", ""],
            [n, f"all-N s / test point ({NUM_TEST_ALL} points, {n} scored each)", full["seconds_per_point"], "", ""],
            [n, "speedup (all-N / FastIF per test point)", speedup, target, verdict],
            [n, f"recall of the all-N top-{TOP} helpful among FastIF's candidates (mean of {NUM_TEST_ALL})",
             quality["recall10"], f"≥ {TARGETS['recall']:g}", goal(quality["recall10"], TARGETS["recall"])],
            [n, f"same, among the k = {k} helpful-direction candidates", quality["recall10_helpful_direction"], "",
             ""],
            [n, f"same, among the candidates of an exact (flat) search with the same queries ({_index_text(fast)})",
             quality["recall10_exact_knn"], "", ""],
            [n, "the index's recall of the exact search's candidates (these queries)",
             quality["index_recall_of_exact_knn"], "", ""],
            [n, "kNN queries preconditioned with", fast.get("knn_query_curvature"), "", ""],
            [n, "stage s, FastIF run (all points)", stages_fast, "", ""],
            [n, "stage s, all-N run (all points)", stages_full, "", ""],
            [n, "peak RSS MiB: FastIF / all-N", f"{fast['peak_rss_mb']:.4g} / {full['peak_rss_mb']:.4g}", "", ""],
        ]  # fmt: skip
    if len(speedups) > 1:
        growing = all(b[1] > a[1] for a, b in zip(speedups, speedups[1:]))
        rows.append(["all", "speedup grows with N", growing, "yes", "met" if growing else "NOT met"])
    return {"rows": rows, "raw": raw, "notes": notes}


def part_self_influence(n: int, workdir: Path, threads: int) -> dict[str, Any]:
    """Self-influence of every training point: our EK-FAC, Kronfluence's, and a CG reference on a sample."""
    raw: dict[str, Any] = {"n": n, "damping": DAMPING}
    notes: list[str] = []
    trained = _spawn("self_train", n, workdir, threads)
    raw["train"] = trained
    if not _ok(trained):
        return {"rows": [], "raw": raw, "notes": [_failed_note(trained)]}
    runs = {
        "ours": "self_ours",
        "kronfluence": "self_kronfluence",
        "kronfluence_empirical": "self_kronfluence_empirical",
        "reference": "self_reference",
    }
    files = {
        "ours": f"self_ours_{n}.pt",
        "kronfluence": f"self_kronfluence_{n}.pt",
        "kronfluence_empirical": f"self_kronfluence_empirical_{n}.pt",
    }
    for key, worker in runs.items():
        raw[key] = _spawn(worker, n, workdir, threads)
        if not _ok(raw[key]):
            notes.append(_failed_note(raw[key]))
    pearsons: dict[str, float | None] = dict.fromkeys([*files, "ours_plain"])
    if _ok(raw["reference"]):
        reference = torch.load(workdir / f"self_reference_{n}.pt", weights_only=True)
        for key, name in files.items():
            if _ok(raw[key]):
                scores = torch.load(workdir / name, weights_only=True)
                pearsons[key] = pearson(scores[reference["rows"]], reference["scores"])
        if _ok(raw["ours"]):
            plain = torch.load(workdir / f"self_ours_plain_{n}.pt", weights_only=True)
            if torch.equal(plain["rows"], reference["rows"]):
                pearsons["ours_plain"] = pearson(plain["scores"], reference["scores"])
    raw["pearson"] = pearsons
    ours, kron = raw["ours"], raw["kronfluence"]
    ratio = ours["seconds"] / kron["seconds"] if _ok(ours) and _ok(kron) else None
    raw["time_ratio"] = ratio
    ref = raw["reference"]
    label = f"Pearson with CG on the Hessian ({REFERENCE_POINTS} training points)"

    def seconds(result: dict[str, Any]) -> str:
        if not _ok(result):
            return "failed"
        return f"{result['seconds']:.3g} ({result['fit_seconds']:.3g} + {result['score_seconds']:.3g})"

    def peak(result: dict[str, Any]) -> float | None:
        return result.get("peak_rss_mb") if _ok(result) else None

    correction = (
        f"{ours['correction_steps']} Lanczos steps on {ours['correction_examples']} examples"
        if _ok(ours) and ours["correction_steps"]
        else "none"
    )
    rows = [
        [n, f"ours (EK-FAC, empirical Fisher, + low-rank correction: {correction}) s: total (fit + scores)",
         seconds(ours), "", ""],
        [n, "Kronfluence (EK-FAC, true Fisher: its default) s", seconds(kron), "", ""],
        [n, "Kronfluence (EK-FAC, empirical Fisher) s", seconds(raw["kronfluence_empirical"]), "", ""],
        [n, "time ratio (ours / Kronfluence default)", ratio, f"≤ {TARGETS['self_time_ratio']:g}",
         goal(ratio, TARGETS["self_time_ratio"], at_least=False)],
        [n, f"ours: {label}", pearsons["ours"], f"≥ {TARGETS['self_pearson']:g}",
         goal(pearsons["ours"], TARGETS["self_pearson"])],
        [n, f"ours, EK-FAC alone (no correction): {label}", pearsons["ours_plain"], "", ""],
        [n, f"Kronfluence default: {label}", pearsons["kronfluence"], "", ""],
        [n, f"Kronfluence empirical Fisher: {label}", pearsons["kronfluence_empirical"], "", ""],
        [n, "peak RSS MiB: ours / Kronfluence / Kronfluence empirical",
         " / ".join(fmt_mb(peak(raw[k])) for k in ("ours", "kronfluence", "kronfluence_empirical")), "", ""],
        [n, "reference: CG s, iterations, residual",
         f"{ref['seconds']:.3g}, {ref['iterations']}, {ref['residual']:.2g}" if _ok(ref) else "failed", "", ""],
    ]  # fmt: skip
    if _ok(ours):
        rows.insert(1, [n, "ours s: EK-FAC factors / correction / scores",
                        f"{ours['factor_seconds']:.3g} / {ours['correction_seconds']:.3g} / {ours['score_seconds']:.3g}",
                        "", ""])  # fmt: skip
        rows.insert(4, [n, "ours: mean / largest EK-FAC eigenvalue (λ = damping); Ritz values of M^½(H+λI)M^½",
                        f"{ours['mean_eigenvalue']:.3g} / {ours['max_eigenvalue']:.3g} (λ = {DAMPING:g}); "
                        f"{ours['ritz_range'][0]:.3g} to {ours['ritz_range'][1]:.3g}", "", ""])  # fmt: skip
    return {"rows": rows, "raw": raw, "notes": notes}


def fmt_mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _available_mb() -> float:
    """``MemAvailable`` of ``/proc/meminfo`` in MiB (the whole machine's when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


def part_million(n: int, workdir: Path, threads: int, *, smoke: bool) -> dict[str, Any]:
    """Fit + snapshot at N, then FastIF for 100 test points; time, peak, or where it failed."""
    num_test = SMOKE_TEST if smoke else NUM_TEST
    k = SMOKE_CANDIDATES if smoke else NUM_CANDIDATES
    limit = int(MEMORY_FRACTION * _available_mb())
    raw: dict[str, Any] = {"n": n, "memory_limit_mb": limit}
    raw["fit_snapshot"] = snap = _spawn("fit_snapshot", n, workdir, threads, memory_limit_mb=limit)
    raw["fastif"] = fast = (
        _spawn("fastif", n, workdir, threads, num_test=num_test, num_candidates=k, memory_limit_mb=limit)
        if _ok(snap)
        else None
    )
    completed = _ok(snap) and _ok(fast)
    raw["completed"] = completed
    notes = [_failed_note(r) for r in (snap, fast) if r is not None and not _ok(r)]
    rows: list[list[Any]] = []
    if _ok(snap):
        rows += [
            [n, "fit + snapshot s (snapshot's own s)", f"{snap['seconds']:.4g} ({snap['snapshot_seconds']:.4g})", "",
             ""],
            [n, "fit + snapshot peak RSS MiB", snap["peak_rss_mb"], "", ""],
            [n, "features file MiB; whole snapshot MiB",
             f"{snap['features_bytes'] / 2**20:.4g}; {snap['snapshot_bytes'] / 2**20:.4g}", "", ""],
        ]  # fmt: skip
    if _ok(fast):
        stages = _stage_text(fast)
        rows += [
            [n, f"FastIF predict s ({num_test} test points); s / point",
             f"{fast['seconds']:.4g}; {fast['seconds_per_point']:.3g}", "", ""],
            [n, "FastIF peak RSS MiB", fast["peak_rss_mb"], "", ""],
            [n, "stage s, FastIF run", stages, "", ""],
        ]  # fmt: skip
    rows.append([n, f"completes (each process limited to {limit} MiB of address space)", completed, "yes",
                 "met" if completed else "NOT met"])  # fmt: skip
    return {"rows": rows, "raw": raw, "notes": notes}


# -- MiniLM with the default settings -------------------------------------------------------------------------------
MINILM_N, SMOKE_MINILM_N = 2_000, 160
MINILM_TEST, SMOKE_MINILM_TEST = 20, 4
SMOKE_MINILM_DAMPING = 2.0
"""The smoke run's damping: its random 2-layer BERT after one epoch on 160 snippets has eigenvalues near -0.5."""
MINILM_TARGET = 1.5
"""Seconds per test point with the default settings (issue "Curvature fitted once")."""
STAGES = ("features", "knn", "test_gradients", "s_test", "scoring")
MINILM_ESTIMATOR = os.environ.get("FASTIF_BENCH_MINILM_ESTIMATOR", "auto")
"""``auto``: ``InfluenceModule`` at its defaults (the target's row). ``ekfac``: EK-FAC factors of the influence
parameters fitted once after training (what ``CurvatureSnapshot`` does at the end of fit; timed apart), then
``EKFAC(damping=0.01, factors=...)`` reused by every solve, its residual against ``H + λI`` measured on
``MINILM_RESIDUAL_EXAMPLES`` training examples for 2 of the vectors: curvature fitted once and reused, not the
defaults."""
MINILM_RESIDUAL_EXAMPLES = int(os.environ.get("FASTIF_BENCH_MINILM_RESIDUAL_EXAMPLES", "256"))


def worker_minilm(
    n: int, workdir: Path, *, num_test: int, encoder: str = "minilm", damping: float | None = None
) -> dict[str, Any]:
    """Fine-tune the text classifier's top layer + head on ``n`` snippets, then ``trainer.predict`` with an
    ``InfluenceModule`` at its defaults over ``num_test`` test points (one batch); ``damping`` (the smoke run's
    barely trained random BERT is far from convex) replaces only the default estimator's damping."""
    from examples.text_experiments import train_text_model
    from lightning_fastif.core.ihvp import AutoInverse
    from lightning_fastif.errors import ArgumentError
    from lightning_fastif.lightning.arguments import ComputeArguments
    from lightning_fastif.lightning.module import InfluenceModule

    _stage("train")
    start = time.perf_counter()
    run = train_text_model(
        workdir / f"minilm_{n}",
        encoder=encoder,
        cue_word=None,
        max_train=n,
        max_eval=num_test,
        train_layers=1,
        influence_layers=1,
        epochs=1,
    )
    train_seconds = time.perf_counter() - start
    ihvp: Any = None if damping is None else AutoInverse(damping=damping)
    curvature: dict[str, Any] = {}
    if MINILM_ESTIMATOR == "ekfac":
        from lightning_fastif.core.curvature import ekfac_correct, fit_kfac
        from lightning_fastif.core.ekfac import EKFAC

        _stage("curvature")
        params = [name for name, p in run.head.named_parameters() if p.requires_grad]
        start = time.perf_counter()
        factors = fit_kfac(run.head, None, run.loader("train"), params, batch_size=32)
        factors = ekfac_correct(factors, run.head, None, run.loader("train"), batch_size=32)
        curvature = {
            "curvature_seconds": time.perf_counter() - start,
            "curvature_layers": len(factors.layers),
            "residual_examples": MINILM_RESIDUAL_EXAMPLES,
        }
        ihvp = EKFAC(
            0.01 if damping is None else damping,
            factors=factors,
            residual_examples=MINILM_RESIDUAL_EXAMPLES,
            residual_vectors=2,
        )
    _stage("module")
    # Every influence setting at its default (with MINILM_ESTIMATOR=ekfac: the estimator aside); only the progress
    # bar is off (it changes no number).
    module = InfluenceModule(
        run.head,
        train_dataset=run.loader("train"),
        snapshot=run.snapshot,
        ihvp=ihvp,
        compute=ComputeArguments(progress=False),
    )
    _stage("predict")
    start = time.perf_counter()
    try:
        _trainer(workdir / f"predict_minilm_{n}").predict(module, run.loader("test", batch_size=num_test))
    except ArgumentError as err:
        # The defaults refused (e.g. H + λI indefinite at the default damping): how long it took to say so, and
        # what the chosen estimator had done by then, are the measurement.
        inner = getattr(module.ihvp, "_cg", None) or getattr(module.ihvp, "_lissa", None)
        return {
            "n": n,
            "encoder": encoder,
            "num_test": num_test,
            "num_params": sum(p.numel() for p in run.head.parameters() if p.requires_grad),
            "train_seconds": train_seconds,
            "accuracy": run.info["accuracy"],
            "refused": str(err),
            "seconds": time.perf_counter() - start,
            "seconds_per_point": (time.perf_counter() - start) / num_test,
            "ihvp": {"estimator": module.ihvp.name, **module.ihvp.settings()},
            "ihvp_diagnostics": [jsonable(dict(inner.diagnostics))] if inner is not None else [],
            "device": DEVICE,
            "peak_rss_mb": _peak_mb(),
        }
    seconds = time.perf_counter() - start
    result = module.result
    manifest = result.manifest
    stages = dict(manifest["timings"]["total_seconds"])
    diagnostics = manifest.get("ihvp", [{}])[0].get("diagnostics", [{}])
    return {
        "n": n,
        "encoder": encoder,
        "num_test": int(result.scores.shape[0]),
        "num_params": sum(p.numel() for p in run.head.parameters() if p.requires_grad),
        "candidates_per_point": int(result.candidate_indices.shape[1]),
        "train_seconds": train_seconds,
        "train_stage_seconds": run.info["seconds"],
        "accuracy": run.info["accuracy"],
        "seconds": seconds,
        "seconds_per_point": seconds / max(int(result.scores.shape[0]), 1),
        "stage_seconds": stages,
        "ihvp": manifest["settings"].get("ihvp"),
        "ihvp_diagnostics": diagnostics,
        "knn_preconditioned": module.knn_preconditioned,
        "index": {"kind": module.knn_index.kind, "nlist": module.knn_index.nlist, "nprobe": module.knn_index.nprobe},
        "device": DEVICE,
        "peak_rss_mb": _peak_mb(),
        "estimator": MINILM_ESTIMATOR,
        **curvature,
    }


def part_minilm(n: int, workdir: Path, threads: int, *, smoke: bool) -> dict[str, Any]:
    """FastIF with the default settings on MiniLM (top layer + head): seconds per test point and per stage."""
    num_test = SMOKE_MINILM_TEST if smoke else MINILM_TEST
    extra: dict[str, Any] = {"encoder": "tiny", "damping": SMOKE_MINILM_DAMPING} if smoke else {}
    result = _spawn("minilm", n, workdir, threads, num_test=num_test, **extra)
    if not _ok(result):
        return {"rows": [], "raw": result, "notes": [_failed_note(result)]}
    if "refused" in result:
        done = result["ihvp_diagnostics"][0] if result["ihvp_diagnostics"] else {}
        fit = done.get("preconditioner_fit_seconds")
        rows = [
            [n, f"{result['encoder']} top layer + head: parameters; train s", f"{result['num_params']}; "
             f"{result['train_seconds']:.4g}", "", ""],
            [n, f"FastIF with the defaults ({result['num_test']} points, {result['device']}): refused after "
             f"{result['seconds']:.4g} s" + (f" (EK-FAC fit {fit:.4g} s)" if fit is not None else ""),
             result["refused"], f"≤ {MINILM_TARGET:g} s / point", "NOT met (no scores)"],
            [n, "peak RSS MiB", result["peak_rss_mb"], "", ""],
        ]  # fmt: skip
        return {"rows": rows, "raw": result, "notes": []}
    stages = result["stage_seconds"]
    per_point = result["seconds_per_point"]
    other = result["seconds"] - sum(stages.values())
    breakdown = ", ".join(f"{s} {stages.get(s, 0.0):.3g}" for s in STAGES)
    extra = ", ".join(f"{s} {v:.3g}" for s, v in stages.items() if s not in STAGES)
    breakdown += (f", {extra}" if extra else "") + f", other {other:.3g}"
    chose = [d.get("chose") or d.get("estimator") for d in result["ihvp_diagnostics"] if isinstance(d, dict)]
    reused = result.get("estimator") == "ekfac"
    rows = [
        [n, f"{result['encoder']} top layer + head: parameters; train s (prefix + fit + caches)",
         f"{result['num_params']}; {result['train_seconds']:.4g}", "", ""],
    ]  # fmt: skip
    if reused:
        rows += [
            [n, "EK-FAC factors fitted once after training, s (not in the per-point figure)",
             f"{result['curvature_seconds']:.4g}", "", ""],
            [n, f"FastIF s / test point, EK-FAC reused, residual on {result['residual_examples']} examples x 2 "
             f"vectors ({result['num_test']} points, {result['candidates_per_point']} candidates each, "
             f"{result['device']})", per_point, f"(≤ {MINILM_TARGET:g} is for the defaults)", "not the defaults"],
        ]  # fmt: skip
    else:
        rows.append(
            [n, f"FastIF s / test point, defaults ({result['num_test']} points, {result['candidates_per_point']} "
             f"candidates each, {result['device']})", per_point, f"≤ {MINILM_TARGET:g}",
             goal(per_point, MINILM_TARGET, at_least=False)]
        )  # fmt: skip
    rows += [
        [n, "stage s (all points): " + ", ".join((*STAGES, "other")), breakdown, "", ""],
        [n, "estimator chosen (per system)", ", ".join(str(c) for c in chose) or str(result["ihvp"]), "", ""],
        [n, "peak RSS MiB", result["peak_rss_mb"], "", ""],
    ]  # fmt: skip
    return {"rows": rows, "raw": result, "notes": []}


# -- run ------------------------------------------------------------------------------------------------------------
COLUMNS = ["N", "measure", "value", "target", "verdict"]
TITLES = {
    "fit": "Fit with a loss-gradient snapshot against a plain fit",
    "fastif": "FastIF (k = 100 per direction) against every training point",
    "self_influence": "Self-influence of every training point: ours (EK-FAC) against Kronfluence (EK-FAC)",
    "million": "One million training points",
    "minilm": "MiniLM (top layer + head) with the default settings: seconds per test point and per stage",
}


def run(
    *,
    smoke: bool = False,
    threads: int = 1,
    sizes: Sequence[int] | None = None,
    parts: Sequence[str] | None = None,
    workdir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Measure the parts asked for (default: fit, fastif, self_influence) and return the benchmark contract's dict.

    Args:
        smoke: tiny sizes (seconds per process).
        threads: torch threads per worker process.
        sizes: the N of ``fit`` and ``fastif`` (default 10k, 50k, 200k; smoke: 600).
        parts: any of ``fit``, ``fastif``, ``self_influence``, ``million``, ``minilm``.
        workdir: where the models, snapshots and scores go, kept afterwards (default: a temporary directory,
            removed at the end).

    Returns:
        ``{"name", "title", "headline", "markdown", "details"}``.
    """
    _quiet()
    set_threads(threads)
    if smoke:  # the worker processes read it at import; this process's DAMPING only labels the tables
        os.environ.setdefault("FASTIF_BENCH_DAMPING", "2.0")
    parts = tuple(DEFAULT_PARTS if parts is None else parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"parts: expected some of {PARTS}, got {unknown}")
    sizes = tuple(sizes) if sizes is not None else (SMOKE_SIZES if smoke else SIZES)
    keep = workdir is not None
    workdir = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        if "fit" in parts or "fastif" in parts:
            results["fit"] = part_fit(sizes, workdir, threads)
        if "fastif" in parts:
            results["fastif"] = part_fastif(sizes, workdir, threads, smoke=smoke)
        if "self_influence" in parts:
            results["self_influence"] = part_self_influence(SMOKE_SELF_N if smoke else SELF_N, workdir, threads)
        if "million" in parts:
            results["million"] = part_million(SMOKE_SIZES[-1] * 2 if smoke else MILLION, workdir, threads, smoke=smoke)
        if "minilm" in parts:
            results["minilm"] = part_minilm(SMOKE_MINILM_N if smoke else MINILM_N, workdir, threads, smoke=smoke)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    info = machine_info(threads)
    sections = []
    for part, result in results.items():
        body = markdown_table(COLUMNS, result["rows"]) if result["rows"] else "(no rows: every run failed)"
        notes = "".join(f"\n- {note}" for note in result["notes"])
        sections.append(f"**{TITLES[part]}**\n\n{body}\n{notes}")
    markdown = (
        f"Synthetic {NUM_FEATURES}-feature, {NUM_CLASSES}-class data (teacher labels, {LABEL_NOISE:.0%} label noise), "
        f"MLP 64-256-128-10 trained {EPOCHS} epochs with Adam (batch {TRAIN_BATCH}); influence over {PARAMS} "
        f"({NUM_PARAMS} parameters). Each measurement in its own process (peak = its ru_maxrss); {threads} "
        f"thread(s), {info['cpu']}, {info['usable_cores']} cores shared with other jobs, load average "
        f"{info.get('load_average')}.\n\n" + "\n\n".join(sections) + "\n"
    )
    details = {
        "machine": info,
        "sizes": list(sizes),
        "parts": list(parts),
        "smoke": smoke,
        "wall_seconds": time.perf_counter() - start,
        "settings": {
            "epochs": EPOCHS,
            "train_batch": TRAIN_BATCH,
            "lr": LEARNING_RATE,
            "params": PARAMS,
            "num_params": NUM_PARAMS,
            "label_noise": LABEL_NOISE,
            "num_test": SMOKE_TEST if smoke else NUM_TEST,
            "num_test_all": NUM_TEST_ALL,
            "num_candidates": SMOKE_CANDIDATES if smoke else NUM_CANDIDATES,
            "damping_self_influence": DAMPING,
            "curvature_batch": CURVATURE_BATCH,
            "reference": {"points": REFERENCE_POINTS, "tol": REFERENCE_TOL, "max_iter": REFERENCE_MAX_ITER},
        },
        **{part: {"raw": result["raw"], "notes": result["notes"]} for part, result in results.items()},
    }
    return {
        "name": "scale",
        "title": "FastIF at scale (MLP 64-256-128-10, synthetic data)",
        "headline": {},
        "markdown": markdown,
        "details": jsonable(details),
    }


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in text.split(",") if s.strip())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.bench_scale``: the benchmark, or one worker (``--worker``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds per process)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--sizes", type=_sizes, default=None, help="N of fit/fastif, e.g. 10000,50000,200000")
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the returned dict here")
    parser.add_argument("--worker", choices=WORKERS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help="keep models, snapshots and scores here (default: temporary)")
    parser.add_argument("--num-test", type=int, default=NUM_TEST, help=argparse.SUPPRESS)
    parser.add_argument("--num-candidates", type=int, default=NUM_CANDIDATES, help=argparse.SUPPRESS)
    parser.add_argument("--memory-limit-mb", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--encoder", default="minilm", help=argparse.SUPPRESS)
    parser.add_argument("--damping", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="the workers' Trainer accelerator")
    args = parser.parse_args(argv)
    if args.device is not None:  # read by the worker processes at import, like FASTIF_BENCH_DAMPING
        os.environ["FASTIF_BENCH_DEVICE"] = args.device
    if args.worker is not None:
        print(json.dumps(jsonable(_worker(args))), flush=True)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    out = run(smoke=args.smoke, threads=args.threads, sizes=args.sizes, parts=parts, workdir=args.workdir)
    print(f"## {out['title']}\n\n{out['markdown']}")
    if args.json is not None:
        write_atomic(args.json, json.dumps(jsonable(out), indent=2) + "\n")


if __name__ == "__main__":
    main()
