"""The results of an ``InfluenceModule`` run: shards written batch by batch, resumed, merged into one result.

:class:`InfluenceWriter` is a Lightning ``BasePredictionWriter`` that ``InfluenceModule.configure_callbacks`` attaches
to every ``trainer.predict`` run. It collects each test batch's
:class:`~lightning_fastif.io.results.BatchInfluence`, and at the end merges them on rank 0 into an
:class:`~lightning_fastif.io.results.InfluenceResult` with a manifest of settings, timings and diagnostics. With an
``output_dir`` each batch is also written as a shard as soon as it is done; a run killed midway and restarted with
the same ``output_dir`` (and the same settings) reads the finished shards instead of computing them again::

    <output_dir>/manifest.json                 settings, status, and (when complete) timings and diagnostics
    <output_dir>/shards/shard-<first>-<key>.safetensors    one batch: test_indices, candidate_indices, scores
    <output_dir>/result.safetensors            the merged result (read with InfluenceResult.load(output_dir))

A shard's name depends only on the test points it holds (the first index and a hash of all of them), not on the
rank or the world size, so a run may resume under another number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_fastif.core.fingerprint import changed_components, digest_of
from lightning_fastif.core.influence import diagnostic_metrics
from lightning_fastif.errors import SnapshotError, check_bool, check_path
from lightning_fastif.io.atomic import (
    MANIFEST_NAME,
    load_tensors,
    manifest_path,
    read_manifest,
    read_tensor_metadata,
    save_tensors,
    write_manifest,
)
from lightning_fastif.io.results import (
    RESULT_FILE,
    RESULT_FORMAT,
    RESULT_FORMAT_VERSION,
    BatchInfluence,
    InfluenceResult,
)
from lightning_fastif.lightning.distributed import all_gather_object, gather_uneven

if TYPE_CHECKING:
    from lightning_fastif.lightning.module import InfluenceModule

__all__ = ["SHARDS_DIR", "STAGES", "InfluenceWriter", "shard_key", "shard_name"]

STAGES = ("features", "knn", "test_gradients", "s_test", "scoring")
"""Stages timed per batch (seconds in the manifest, ``fastif/<stage>/seconds`` in the loggers)."""

SHARDS_DIR = "shards"
SHARD_FORMAT = "lightning_fastif.influence.shard"


def shard_key(test_indices: Tensor) -> tuple[int, int]:
    """``(first test index, 60-bit hash of all of them)``: names a shard independently of rank and world size.

    Example::

        >>> shard_key(torch.tensor([4, 5]))[0]
        4
    """
    data = test_indices.detach().cpu().long().contiguous().numpy().tobytes()
    return int(test_indices[0]), int(hashlib.sha1(data).hexdigest()[:15], 16)  # noqa: S324 - a name, not security


def shard_name(first: int, key: int) -> str:
    """The file name of the shard whose :func:`shard_key` is ``(first, key)``.

    Example::

        >>> shard_name(4, 255)
        'shard-000000004-0000000000000ff.safetensors'
    """
    return f"shard-{first:09d}-{key:015x}.safetensors"


def _combined_ihvp(diagnostics: list[dict[str, Any]]) -> dict[str, Any]:
    """The inverse-HVP diagnostics of a batch's checkpoints as one record: the worst residual and scale, every
    iteration count and convergence flag, the total seconds."""
    if len(diagnostics) == 1:
        return diagnostics[0]

    def values(key: str) -> list[Any]:
        found = [d[key] for d in diagnostics if d.get(key) is not None]
        return [v for value in found for v in (value if isinstance(value, list) else [value])]

    combined: dict[str, Any] = {"iterations": values("iterations") or None, "converged": values("converged")}
    for key, reduce in (("residual", max), ("scale", max), ("seconds", sum)):
        numbers = [v for v in values(key) if isinstance(v, (int, float))]
        combined[key] = reduce(numbers) if numbers else None
    return combined


def _given_datasets(trainer: Trainer, module: Any) -> tuple[Any, Any]:
    """The datasets the result's indices point into: the candidates' (training set or pool) and the test set's."""
    pool = getattr(module, "candidates_pool", None)
    train = (pool.data if pool is not None else module.train_data).dataset
    loaders = trainer.predict_dataloaders
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    return train, getattr(loader, "dataset", None)


def _read_batch(path: Path) -> BatchInfluence:
    tensors = load_tensors(path)
    return BatchInfluence(
        candidates=tensors["candidate_indices"],
        scores=tensors["scores"],
        diagnostics=json.loads(read_tensor_metadata(path).get("diagnostics", "{}")),
        test_indices=tensors["test_indices"],
    )


def _clear_run(output: str) -> None:
    """Delete an earlier run's shards, result and manifest (``overwrite=True``); other files stay."""
    shards = Path(output, SHARDS_DIR)
    if shards.is_dir():
        for shard in shards.glob("*.safetensors"):
            shard.unlink()
    for name in (RESULT_FILE, MANIFEST_NAME):
        Path(output, name).unlink(missing_ok=True)


class InfluenceWriter(BasePredictionWriter):
    """Collects, writes (resumably) and merges the batches of the ``InfluenceModule`` that attached it.

    ``InfluenceModule.configure_callbacks`` creates one per ``trainer.predict`` run; there is no need to build one.
    It acts only for the module that attached it, so a Trainer reused for other models is unaffected.

    Args:
        output_dir: where shards, the merged result and its manifest are written; ``None`` keeps the result in memory
            (rank 0's :attr:`result`).
        overwrite: delete an earlier run's shards, result and manifest in ``output_dir`` and start fresh, instead of
            resuming it (a resume requires the same fingerprint: see ``InfluenceModule.fingerprint``).

    Raises:
        ArgumentError: ``output_dir`` is not a path.

    Example::

        >>> writer = InfluenceWriter("runs/influence")  # what InfluenceModule(output_dir=...) attaches
        >>> writer.interval.on_batch
        True
    """

    def __init__(self, output_dir: str | os.PathLike | None = None, *, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = check_path("output_dir", output_dir, allow_none=True)
        self.overwrite = check_bool("overwrite", overwrite)
        self._fingerprint: dict[str, str] = {}
        self._digests: dict[tuple[int, int], str | None] = {}
        self.dirpath: str | None = None
        """The absolute output directory, rank 0's on every rank (set in ``setup``)."""
        self.result: InfluenceResult | None = None
        """The merged result of the last run (rank 0)."""
        self._parts: list[BatchInfluence] = []
        self._keys: list[tuple[int, int]] = []
        self._resumed: set[tuple[int, int]] = set()
        self._settings: dict[str, Any] = {}
        self._started: float | None = None
        self._log_step = 0

    def _owner(self, pl_module: LightningModule) -> bool:
        return getattr(pl_module, "_writer", None) is self

    # ------------------------------------------------------------------------------------------- Lightning hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict" or not self._owner(pl_module):
            return
        output = None if self.output_dir is None else os.path.abspath(self.output_dir)
        # Every rank writes into rank 0's directory (Hydra may give each rank its own working directory).
        self.dirpath = trainer.strategy.broadcast(output)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._owner(pl_module):
            return
        self.result, self._parts, self._keys, self._resumed, self._digests = None, [], [], set(), {}

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here rather than in on_predict_start: InfluenceModule.on_predict_start checks the test loaders after the
        # callbacks' on_predict_start, and nothing is written to disk before those checks pass.
        if not self._owner(pl_module):
            return
        module: InfluenceModule = pl_module  # type: ignore[assignment]
        self._settings = module.settings()
        # One pass over the training data: only when the result goes to disk, where a rerun must be recognised.
        self._fingerprint = module.fingerprint() if self.dirpath is not None else {}
        if trainer.world_size > 1 and self.dirpath is None and "spawn" in type(trainer.strategy).__name__.lower():
            rank_zero_warn(
                "output_dir: None under a spawning strategy; the merged result lives in the spawned rank 0 only. Pass "
                "output_dir and read it with InfluenceResult.load(output_dir)"
            )
        if self.dirpath is not None:
            error = None
            if trainer.is_global_zero:
                try:
                    self._start_output_dir(self.dirpath)
                except Exception as err:  # re-raised on every rank below, so none waits in a collective
                    error = f"{type(err).__name__}: {err}"
            error = trainer.strategy.broadcast(error)
            if error is not None:
                raise ValueError(error)
        trainer.strategy.barrier("InfluenceWriter.start")
        # After the barrier, so the wall clock in the manifest leaves out the ranks' start-up skew.
        self._started = time.perf_counter()

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        # Under parallel="repeats" predict_step returns only the test indices; the module adds those batches from
        # its on_predict_epoch_end, once every rank knows the whole test set.
        if self._owner(pl_module) and isinstance(prediction, BatchInfluence):
            assert prediction.test_indices is not None
            digest = pl_module._test_digests.get(shard_key(prediction.test_indices))  # type: ignore[union-attr]
            self.add(trainer, prediction, write=True, test_digest=digest)

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The merge happens here, not in write_on_epoch_end: under parallel="repeats" the module computes its
        # batches in its own on_predict_epoch_end, which Lightning calls after every callback's.
        if not self._owner(pl_module):
            return
        module: InfluenceModule = pl_module  # type: ignore[assignment]
        only_rank0 = module.compute.parallel == "repeats"  # every rank holds every batch: keep rank 0's
        error, result = None, None
        if self.dirpath is not None:
            mine = self._keys if (not only_rank0 or trainer.is_global_zero) else []
            keys = gather_uneven(torch.tensor(mine, dtype=torch.long).reshape(-1, 2))
            for digests in all_gather_object(self._digests):  # every rank's test batches, for the run's fingerprint
                self._digests.update(digests)
            if trainer.is_global_zero:
                try:
                    result = self._merge_shards([(int(a), int(b)) for a, b in keys.tolist()], trainer, module)
                    result.save(self.dirpath)
                except Exception as err:  # re-raised on every rank below
                    error = f"{type(err).__name__}: {err}"
        else:
            parts = self._parts if (not only_rank0 or trainer.is_global_zero) else []
            result, error = self._gather_in_memory(parts, trainer, module)
        error = trainer.strategy.broadcast(error)
        if error is not None:
            raise RuntimeError(f"InfluenceModule: merging the results failed: {error}")
        self.result = result
        trainer.strategy.barrier("InfluenceWriter.end")

    # ------------------------------------------------------------------------------------------------- shards
    def shard_path(self, test_indices: Tensor) -> Path | None:
        """Where the shard of these test points is (or would be) written; ``None`` without ``output_dir``."""
        if self.dirpath is None:
            return None
        return Path(self.dirpath) / SHARDS_DIR / shard_name(*shard_key(test_indices))

    def has_shard(self, test_indices: Tensor) -> bool:
        """True when an earlier run already wrote the shard of these test points."""
        path = self.shard_path(test_indices)
        return path is not None and path.exists()

    def read_shard(self, test_indices: Tensor, test_digest: str | None = None) -> BatchInfluence:
        """The finished batch of these test points, from its shard (a resumed run).

        Args:
            test_indices: the batch's test indices (the shard's name).
            test_digest: the digest of the batch's content now; it must equal the one the shard was written with.

        Raises:
            SnapshotError: the shard holds other test points than its name says, or other test data (the examples at
                these indices changed since it was written: rerun with ``overwrite=True``).
        """
        path = self.shard_path(test_indices)
        assert path is not None
        out = _read_batch(path)
        if not torch.equal(out.test_indices, test_indices.cpu().long()):
            raise SnapshotError(f"shard {path} holds other test points than its name says; delete it and run again")
        written = read_tensor_metadata(path).get("test_digest")
        if test_digest is not None and written != test_digest:
            first = test_indices[:5].tolist()
            raise SnapshotError(
                f"output_dir: shard {path.name} was computed for other test data (the test examples at indices "
                f"{first}{' ...' if test_indices.numel() > 5 else ''} changed: fingerprint component 'test_data'); its "
                "scores would be stale. Pass overwrite=True to start fresh, or use another output_dir"
            )
        self._resumed.add(shard_key(test_indices))
        return out

    def add(self, trainer: Trainer, out: BatchInfluence, *, write: bool, test_digest: str | None = None) -> None:
        """Collect one finished batch. A batch computed in this run (not read from its shard) is logged to the
        Trainer's loggers and, with ``write`` and an ``output_dir``, written as its shard."""
        assert out.test_indices is not None
        key = shard_key(out.test_indices)
        self._digests[key] = test_digest
        if key not in self._resumed:
            path = self.shard_path(out.test_indices)
            if path is not None and write:
                save_tensors(
                    path,
                    {"test_indices": out.test_indices, "candidate_indices": out.candidates, "scores": out.scores},
                    {
                        "format": SHARD_FORMAT,
                        "diagnostics": json.dumps(out.diagnostics),
                        "test_digest": test_digest or "",
                    },
                )
            self._log(trainer, out)
        self._keys.append(key)
        self._parts.append(out)

    def _log(self, trainer: Trainer, out: BatchInfluence) -> None:
        if not trainer.loggers:
            return
        memory = dict(out.diagnostics.get("memory", {}))
        plan = memory.pop("plan", None)
        stages = {stage: {**memory.get(stage, {}), "seconds": s} for stage, s in out.diagnostics["seconds"].items()}
        ihvp = _combined_ihvp(out.diagnostics["ihvp"])
        metrics = diagnostic_metrics({"ihvp": ihvp, "stages": stages, "memory_plan": plan})
        # LightningModule.log is not allowed in predict: write to the loggers directly (they write on rank 0 only).
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._log_step)
        self._log_step += 1

    def _start_output_dir(self, output: str) -> None:
        if manifest_path(output).exists():
            manifest = read_manifest(output)
            if manifest.get("format") != RESULT_FORMAT:
                raise ValueError(
                    f"output_dir: {output} holds a manifest of format {manifest.get('format')!r}, not an influence "
                    "run; use an empty directory"
                )
            if self.overwrite:
                _clear_run(output)
            else:
                self._check_same_run(output, manifest)
        Path(output, SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        # Written before any computing, also when resuming: a result left by an earlier run is no longer "complete"
        # (InfluenceResult.load refuses it) until this run has merged its own.
        write_manifest(
            output,
            {
                "format": RESULT_FORMAT,
                "format_version": RESULT_FORMAT_VERSION,
                "status": "running",
                "settings": self._settings,
                "fingerprint": self._fingerprint,
            },
        )

    def _check_same_run(self, output: str, manifest: dict[str, Any]) -> None:
        """Refuse to resume a run whose fingerprint or settings differ, naming what changed."""
        # The test data are checked batch by batch (each shard keeps its batch's digest), not here.
        recorded = {k: v for k, v in (manifest.get("fingerprint") or {}).items() if k != "test_data"}
        changed = changed_components(recorded, self._fingerprint)
        before = manifest.get("settings", {})
        changed += sorted(
            f"settings.{k}" for k in set(before) | set(self._settings) if before.get(k) != self._settings.get(k)
        )
        if changed:
            raise ValueError(
                f"output_dir: {output} holds a run whose scores depend on other inputs (changed: {changed}); its "
                "shards would be stale. Pass overwrite=True to start fresh, or use another output_dir"
            )

    # -------------------------------------------------------------------------------------------------- merge
    def _manifest(self, parts: list[BatchInfluence], trainer: Trainer, module: InfluenceModule) -> dict[str, Any]:
        batches = sorted(
            (
                {"first_test_index": int(p.test_indices[0]), **p.diagnostics}
                for p in parts
                if p.test_indices is not None
            ),
            key=lambda d: d["first_test_index"],
        )
        totals = {stage: sum(float(b["seconds"].get(stage, 0.0)) for b in batches) for stage in STAGES}
        return {
            "format": RESULT_FORMAT,
            "format_version": RESULT_FORMAT_VERSION,
            "settings": self._settings or module.settings(),
            # test_data: the digests of the test batches, in test-index order (each shard also keeps its own).
            "fingerprint": {**self._fingerprint, "test_data": digest_of([d for _, d in sorted(self._digests.items())])},
            "top_k": module.top_k,
            "parallel": module.compute.parallel,
            "world_size": trainer.world_size,
            # rank 0's wall clock from the start barrier to the merge: the parallel run time, without process start-up
            "wall_seconds": time.perf_counter() - self._started if self._started is not None else None,
            "timings": {
                "total_seconds": totals,
                "per_batch": [
                    {
                        "first_test_index": b["first_test_index"],
                        "num_test": b["num_test"],
                        "seconds": b["seconds"],
                        "memory": b.get("memory", {}),
                    }
                    for b in batches
                ],
            },
            "ihvp": [{"first_test_index": b["first_test_index"], "diagnostics": b["ihvp"]} for b in batches],
        }

    def _to_result(self, parts: list[BatchInfluence], trainer: Trainer, module: InfluenceModule) -> InfluenceResult:
        if not parts:
            raise ValueError("dataloaders: no test point was scored (an empty test set?)")
        merged = InfluenceResult.merge(
            [InfluenceResult(p.test_indices, p.candidates, p.scores) for p in parts],
            self._manifest(parts, trainer, module),
        )
        return merged.with_original_indices(*_given_datasets(trainer, module))

    def _merge_shards(self, keys: list[tuple[int, int]], trainer: Trainer, module: InfluenceModule) -> InfluenceResult:
        if len(set(keys)) != len(keys):
            raise ValueError("shards: a batch of test points was scored twice (the same shard listed twice)")
        assert self.dirpath is not None
        parts = [_read_batch(Path(self.dirpath) / SHARDS_DIR / shard_name(*key)) for key in keys]
        return self._to_result(parts, trainer, module)

    def _gather_in_memory(
        self, parts: list[BatchInfluence], trainer: Trainer, module: InfluenceModule
    ) -> tuple[InfluenceResult | None, str | None]:
        if trainer.world_size == 1:
            try:
                return self._to_result(parts, trainer, module), None
            except Exception as err:
                return None, f"{type(err).__name__}: {err}"
        empty = torch.zeros(0, dtype=torch.long)
        tests = gather_uneven(torch.cat([p.test_indices for p in parts]) if parts else empty)
        cands = gather_uneven(torch.cat([p.candidates for p in parts]) if parts else empty)
        scores = gather_uneven(torch.cat([p.scores for p in parts]) if parts else torch.zeros(0))
        diagnostics = all_gather_object([(int(p.test_indices[0]), p.diagnostics) for p in parts])
        if not trainer.is_global_zero:
            return None, None
        try:
            stubs = [
                BatchInfluence(torch.zeros(0, 0), torch.zeros(0, 0), d, torch.tensor([t]))
                for rank_parts in diagnostics
                for t, d in rank_parts
            ]
            result = InfluenceResult(tests, cands, scores, self._manifest(stubs, trainer, module))
            return result.with_original_indices(*_given_datasets(trainer, module)), None
        except Exception as err:
            return None, f"{type(err).__name__}: {err}"
