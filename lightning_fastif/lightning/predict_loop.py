"""The influence module's side of ``trainer.predict``: test indices, resumable shards, and ``parallel="repeats"``.

:class:`PredictLoop` is the part of :class:`~lightning_fastif.lightning.module.InfluenceModule` that Lightning's
predict loop drives: it attaches the :class:`~lightning_fastif.lightning.writer.InfluenceWriter` (which collects,
writes and merges the batches), records each batch's test-dataset indices, reuses the shards an earlier run finished
(a rerun over other test data at the same indices is refused, by the batch's digest), and under
``parallel="repeats"`` defers every batch to ``on_predict_epoch_end``, when each rank knows the whole test set and
can take part in each batch's collectives. The computation of a batch itself is the module's ``_compute``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_fastif.core.batches import Batch, IndexedData, batch_size_of
from lightning_fastif.core.fingerprint import digest_of
from lightning_fastif.errors import ArgumentError
from lightning_fastif.io.results import BatchInfluence, InfluenceResult
from lightning_fastif.lightning.arguments import ComputeArguments
from lightning_fastif.lightning.candidates import CandidatePool
from lightning_fastif.lightning.distributed import gather_uneven
from lightning_fastif.lightning.writer import InfluenceWriter, shard_key

__all__ = ["PredictLoop"]


class PredictLoop(LightningModule):
    """The predict-loop hooks of :class:`~lightning_fastif.lightning.module.InfluenceModule` (not used alone).

    The subclass provides ``output_dir``, ``overwrite``, ``compute``, ``num_candidates``, ``candidates_pool`` and
    ``_compute(batch, *, combine, num_candidates, pool, split, test_indices) -> BatchInfluence``, and calls
    :meth:`_init_predict_loop` in its constructor.

    Attributes:
        computed_batches: batches computed by the last ``trainer.predict`` (on this rank).
        skipped_batches: batches whose shard was already on disk, skipped by the last ``trainer.predict`` (on this
            rank).

    Example::

        >>> from lightning_fastif.lightning.module import InfluenceModule
        >>> issubclass(InfluenceModule, PredictLoop)
        True
    """

    output_dir: str | None
    overwrite: bool
    compute: ComputeArguments
    num_candidates: int | None
    candidates_pool: CandidatePool | None
    _compute: Callable[..., BatchInfluence]

    def _init_predict_loop(self, test_batch_size: int) -> None:
        self._result: InfluenceResult | None = None
        self._writer: InfluenceWriter | None = None
        self._pending: list[Tensor] = []
        self._test_data: IndexedData | None = None  # parallel="repeats": the test set, and its batch size
        self._test_batch_size = test_batch_size
        self._offsets: dict[int, int] = {}
        self.computed_batches = 0
        self.skipped_batches = 0

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_writer"] = None  # each process attaches its own (configure_callbacks)
        return state

    @property
    def result(self) -> InfluenceResult:
        """The merged result of the last ``trainer.predict`` (rank 0; under ``ddp_spawn`` load it from disk).

        Raises:
            RuntimeError: before a predict run, or on a rank that does not hold it.
        """
        if self._result is None:
            raise RuntimeError(
                "result: no result here; run trainer.predict(module, test_loader) first. Only rank 0 holds it; under "
                "strategy='ddp_spawn' the processes that computed it are gone: pass output_dir and read it with "
                "InfluenceResult.load(output_dir)"
            )
        return self._result

    @override
    def configure_callbacks(self) -> list[Callback]:
        # The writer is attached to every run, also without output_dir: it collects and merges the batches, and
        # Lightning records the test indices of each batch (predict_loop.current_batch_indices) only while a
        # BasePredictionWriter is attached.
        self._writer = InfluenceWriter(self.output_dir, overwrite=self.overwrite)
        return [self._writer]

    @override
    def setup(self, stage: str) -> None:
        self._predicted = False

    @override
    def teardown(self, stage: str) -> None:
        # Lightning skips the whole predict loop (no hook runs) when the test loaders hold no batch: say so here,
        # rather than leave the user with no result and no reason.
        if stage == "predict" and not getattr(self, "_predicted", True):
            raise ArgumentError(
                "test data: expected at least one test example, got an empty predict DataLoader (no batch); pass the "
                "test points to explain to trainer.predict(module, loader)"
            )

    @override
    def on_predict_start(self) -> None:
        self._predicted = True
        self._result, self._pending, self._offsets, self._test_data = None, [], {}, None
        self.computed_batches = self.skipped_batches = 0
        self._test_digests: dict[tuple[int, int], str | None] = {}
        loaders = self.trainer.predict_dataloaders
        if isinstance(loaders, (list, tuple)) and len(loaders) != 1:
            raise ArgumentError(
                "dataloaders: expected one test set per trainer.predict call (call trainer.predict once per test set, "
                f"with its own output_dir), got {len(loaders)} loaders"
            )
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if self.trainer.world_size > 1 and not isinstance(loader, DataLoader):
            raise ArgumentError(
                "dataloaders: expected a DataLoader over a map-style dataset under DDP (the test points of each batch "
                f"must be known), got a {type(loader).__name__}"
            )
        if self.compute.parallel == "repeats":
            self._test_batch_size = int(getattr(loader, "batch_size", None) or self.compute.batch_size)
            try:
                self._test_data = IndexedData(loader, name="dataloaders")
            except TypeError as err:
                raise ArgumentError(
                    f"dataloaders: expected a DataLoader over a map-style dataset under parallel='repeats', got "
                    f"{type(loader).__name__} ({err})"
                ) from err

    def _test_indices(self, batch: Batch, dataloader_idx: int) -> Tensor:
        """Test-dataset indices of this batch, as Lightning recorded them for the prediction writer."""
        size = batch_size_of(batch)
        recorded = self.trainer.predict_loop.current_batch_indices
        if len(recorded) == size:
            return torch.as_tensor(recorded, dtype=torch.long)
        # A loader Lightning cannot record indices of (not a DataLoader): one process, batches in order.
        offset = self._offsets.get(dataloader_idx, 0)
        self._offsets[dataloader_idx] = offset + size
        return torch.arange(offset, offset + size)

    @override
    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> BatchInfluence | Tensor:
        indices = self._test_indices(batch, dataloader_idx)
        if self.compute.parallel == "repeats":
            # Computed in on_predict_epoch_end, where every rank can take part in each batch's collectives.
            self._pending.append(indices)
            return indices
        return self._score_test_batch(lambda: batch, indices, split=False)

    @override
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Lightning leaves the last recorded indices in place for a loader it cannot record: clear them, so that
        # such a loader's next batch never takes them for its own.
        self.trainer.predict_loop.current_batch_indices = []

    def _score_test_batch(self, fetch: Callable[[], Batch], indices: Tensor, split: bool) -> BatchInfluence:
        """One batch of test points: read from its shard when an earlier run finished it, else computed."""
        writer = self._writer
        batch = fetch()
        # The content of the test batch goes with its shard: a rerun over other test data at the same indices is
        # refused, never served stale scores.
        test_digest = digest_of(batch) if writer is not None and writer.dirpath is not None else None
        self._test_digests[shard_key(indices)] = test_digest
        found = writer is not None and writer.has_shard(indices)
        if split:
            found = self.trainer.strategy.broadcast(found)  # rank 0 decides, so every rank takes the same branch
        if found:
            assert writer is not None
            self.skipped_batches += 1
            return writer.read_shard(indices, test_digest)
        out = self._compute(
            batch,
            combine=False,
            num_candidates=self.num_candidates,
            pool=self.candidates_pool,
            split=split,
            test_indices=indices,
        )
        self.computed_batches += 1
        return out

    @override
    def on_predict_epoch_end(self) -> None:
        if self.compute.parallel != "repeats":
            return
        local = torch.cat(self._pending) if self._pending else torch.zeros(0, dtype=torch.long)
        everything = gather_uneven(local).sort().values
        if bool((everything[1:] == everything[:-1]).any()):
            raise RuntimeError("parallel='repeats': the Trainer gave a test point to more than one rank")
        test_data, chunk = self._test_data, self._test_batch_size
        assert test_data is not None
        for start in range(0, everything.numel(), chunk):
            indices = everything[start : start + chunk]
            out = self._score_test_batch(lambda idx=indices: test_data.gather(idx), indices, split=True)
            if self._writer is not None:
                digest = self._test_digests.get(shard_key(indices))
                self._writer.add(self.trainer, out, write=self.trainer.is_global_zero, test_digest=digest)

    @override
    def on_predict_end(self) -> None:
        self._result = None if self._writer is None else self._writer.result
