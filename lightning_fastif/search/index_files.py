"""Files of the kNN index: the features file (streamed in chunks, memory-mapped on load) and the cached IVF index.

A features file is a safetensors file holding ``indices`` [N] int64 and ``features`` [N, D] float32 (or, for loss
gradients of a ``Linear`` layer, their factors ``out_grads`` [N, C] and ``inputs`` [N, D], :func:`factored_layout`),
with the index settings and a ``fingerprint`` (a random id of that write) in its header. A FAISS IVF index built
from it is cached in ``<name>.faiss`` with the fingerprint in its own header
(:func:`~lightning_fastif.search.ivf.write_ivf_cache`), so a cache built from an earlier file under the same name
is never reused. The cache holds the inverted lists, that is the vectors a second time on disk: rebuilding the lists
from the memory-mapped features at every load would instead cost one assignment pass over all N vectors
(``N x nlist x D`` multiply-adds, seconds at 200k x 1290) per process; the disk copy makes loads instant.
:class:`IndexFiles` is the part of :class:`~lightning_fastif.search.knn.KNNIndex` that reads and writes them.
This module imports no Lightning.
"""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_fastif.core.factored_grads import FactoredGradients
from lightning_fastif.errors import SnapshotError
from lightning_fastif.io.atomic import PathLike, TensorFileWriter, map_tensors, read_tensor_metadata
from lightning_fastif.io.snapshot_store import (
    FACTOR_TENSORS,
    FACTORED,
    FAISS_SUFFIX,
    feature_snapshot_file,
    features_of_file,
    record_index_cache,
)
from lightning_fastif.search.ivf import read_ivf_cache_index, read_ivf_cache_info, write_ivf_cache

KNN_FORMAT = "lightning_fastif.knn"
FINITE_CHECKED = "checked"
"""The header's ``finite`` value of a features file whose writer checked that every row is finite (the snapshot's
writer and :meth:`IndexFiles.save` refuse NaN and infinities), so loading it skips that pass over all N rows."""
_WRITE_CHUNK = 1 << 16  # rows per write of a features file


def features_layout(n: int, dim: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors of a features file, in file order: ``indices`` [N] int64, then ``features`` [N, D] float32."""
    return {"indices": (torch.int64, (n,)), "features": (torch.float32, (n, dim))}


def factored_layout(n: int, outputs: int, inputs: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors of a factored features file (loss gradients of a ``Linear`` layer, see
    :class:`~lightning_fastif.core.factored_grads.FactoredGradients`): ``indices`` [N] int64, ``out_grads``
    [N, C] and ``inputs`` [N, D] float32; its header says ``layout: factored`` and ``bias``."""
    return {
        "indices": (torch.int64, (n,)),
        FACTOR_TENSORS[0]: (torch.float32, (n, outputs)),
        FACTOR_TENSORS[1]: (torch.float32, (n, inputs)),
    }


def factored_metadata(meta: dict[str, str], bias: bool) -> dict[str, str]:
    """``meta`` (:func:`features_metadata`) of a factored file: ``layout: factored``, and whether rows end in a bias."""
    return {**meta, "layout": FACTORED, "bias": "1" if bias else "0"}


def features_metadata(
    metric: str, kind: str, nlist: int | None, nprobe: int, tuning: dict[str, Any] | None = None
) -> dict[str, str]:
    """The header of a features file: the index settings and a fresh ``fingerprint`` (a random id of this write).

    A cached IVF index names the fingerprint of the features it was built from, so one built from an earlier file
    under the same name is never reused (:meth:`KNNIndex.load`).
    """
    return {
        "format": KNN_FORMAT,
        "metric": metric,
        "kind": kind,
        "nlist": str(nlist or ""),
        "nprobe": str(nprobe),
        "tuning": json.dumps(tuning),
        "fingerprint": uuid.uuid4().hex,
        "finite": FINITE_CHECKED,
    }


class IndexFiles:
    """Saving and loading of :class:`~lightning_fastif.search.knn.KNNIndex` (its base class; not used alone)."""

    _cache: tuple[Path, str, Any] | None
    _features: Any
    _ids: Any
    _metric: Any
    _kind: Any
    _nlist: int | None
    _nprobe: int
    _backend: str
    _on_gpu: bool
    _index: Any
    _cpu_index: Any
    tuning: dict[str, Any] | None

    def _write_cache(self) -> None:
        """Save the IVF index just built next to its features (see :meth:`load`); a failure only warns."""
        assert self._cache is not None
        path, fingerprint, on_saved = self._cache
        info = {"metric": self._metric, "nlist": self._nlist, "nprobe": self._nprobe, "tuning": self.tuning}
        try:
            write_ivf_cache(path, self._faiss_cpu_index(), {**info, "features_fingerprint": fingerprint})
            if on_saved is not None:
                on_saved({"file": path.name, "kind": self._kind, **info, "features_fingerprint": fingerprint})
        except (OSError, SnapshotError) as err:
            warnings.warn(f"KNNIndex: the IVF index could not be cached at {path} ({err})", UserWarning, stacklevel=3)

    def save(self, dirpath: PathLike, name: str = "index") -> Path:
        """Save the index to ``<dirpath>/<name>.safetensors`` (+ ``<name>.faiss`` for a trained FAISS IVF).

        The safetensors file holds the tensors ``indices`` [N] and ``features`` [N, D] (written in chunks from the
        features, no copy of the whole set) and the index settings in its header, with a fresh ``fingerprint``; a
        flat index is rebuilt from it on load, an IVF one is read back from ``<name>.faiss`` (whose header names the
        fingerprint of the features it was built from) without retraining.

        Returns:
            The path of the safetensors file.
        """
        if self._kind == "ivf" and self._backend == "faiss":
            self._ensure_built()  # trains and, for kind="auto", tunes nprobe: the settings saved are the ones used
        info = {"metric": self._metric, "nlist": self._nlist, "nprobe": self._nprobe, "tuning": self.tuning}
        meta = features_metadata(self._metric, self._kind, self._nlist, self._nprobe, self.tuning)
        path = Path(dirpath) / f"{name}.safetensors"
        features = self._features
        if isinstance(features, FactoredGradients):
            layout = factored_layout(self.ntotal, features.num_outputs, features.num_inputs)
            meta = factored_metadata(meta, features.bias)
            sources = dict(zip(FACTOR_TENSORS, (features.out_grads, features.inputs), strict=True))
        else:
            layout, sources = features_layout(self.ntotal, self.dim), {"features": features}
        with TensorFileWriter(path, layout, meta) as writer:
            writer.write("indices", self._ids)
            for name, tensor in sources.items():
                for start in range(0, self.ntotal, _WRITE_CHUNK):
                    writer.write(name, tensor[start : start + _WRITE_CHUNK].float(), row=start)
        faiss_file = path.with_suffix(FAISS_SUFFIX)
        if self._kind == "ivf" and self._backend == "faiss":
            write_ivf_cache(faiss_file, self._faiss_cpu_index(), {**info, "features_fingerprint": meta["fingerprint"]})
        elif faiss_file.exists():
            faiss_file.unlink()  # left by an earlier IVF save under this name; it would not match these features
        return path

    def _adopt_faiss_file(self, path: Path) -> None:
        """Use a serialised IVF index instead of training a new one; it must match these features."""
        import faiss

        cpu_index = read_ivf_cache_index(path)
        nlist = getattr(faiss.extract_index_ivf(cpu_index), "nlist", None) if self._kind == "ivf" else None
        if cpu_index.ntotal != self.ntotal or cpu_index.d != self.dim or cpu_index.metric_type != self._faiss_metric():
            raise SnapshotError(
                f"FAISS index file {path} does not match its features: ntotal {cpu_index.ntotal} vs {self.ntotal}, "
                f"dim {cpu_index.d} vs {self.dim}"
            )
        if nlist is not None:
            self._nlist = int(nlist)
            self._nprobe = min(self._nprobe, self._nlist)
        self._cpu_index = cpu_index
        self._index = self._to_gpu(cpu_index) if self._on_gpu else cpu_index
        self._set_nprobe(self._index)
        if not self._on_gpu:
            self._cpu_index = self._index

    @classmethod
    def load(
        cls,
        dirpath: PathLike,
        name: str = "index",
        *,
        metric: str | None = None,
        kind: str | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        use_gpu: bool | Literal["auto"] = "auto",
        backend: Any = "auto",
    ) -> Any:
        """Load an index saved with :meth:`save` (or a feature file of a snapshot); the features are memory-mapped.

        ``metric``/``kind``/``nlist``/``nprobe`` override the saved settings. A FAISS IVF index cached in
        ``<name>.faiss`` is reused when the settings match and its header names the fingerprint of these features;
        otherwise (none yet, or a stale one: the features were rewritten since) the index is built at the first
        search, tuned (``kind="auto"``), and written to ``<name>.faiss`` for the next load.

        Raises:
            SnapshotNotFoundError: if the file is missing.
            SnapshotError: if it is corrupted, lacks the ``features``/``indices`` tensors, or ``<name>.faiss`` is
                not a FAISS index file.
        """
        path = Path(dirpath) / f"{name}.safetensors"
        tensors = map_tensors(path)  # no copy: pages are read as searches touch them
        meta = read_tensor_metadata(path)
        features = features_of_file(tensors, meta, path)
        saved_nlist = int(meta["nlist"]) if meta.get("nlist") else None
        saved_nprobe = int(meta["nprobe"]) if meta.get("nprobe") else 8
        settings = {
            "metric": metric or meta.get("metric", "l2"),
            "kind": kind or meta.get("kind", "flat"),
            "nlist": nlist or saved_nlist,
        }
        index = cls(
            features,
            tensors.get("indices"),
            nprobe=nprobe or saved_nprobe,
            use_gpu=use_gpu,
            backend=backend,
            check_finite=meta.get("finite") != FINITE_CHECKED,
            **settings,  # type: ignore[arg-type]
        )
        if index.kind != "ivf" or index.backend != "faiss":
            return index
        faiss_file = path.with_suffix(FAISS_SUFFIX)
        fingerprint = meta.get("fingerprint")
        info = read_ivf_cache_info(faiss_file) if faiss_file.exists() else None
        if info is not None:
            cached = {"metric": info.get("metric"), "kind": "ivf", "nlist": info.get("nlist")}
            usable = info.get("features_fingerprint") == fingerprint and (nlist is None or cached == settings)
            if usable and cached["metric"] == settings["metric"]:
                index.tuning = info.get("tuning")
                if nprobe is None:
                    index._nprobe = int(info.get("nprobe") or index._nprobe)
                index._adopt_faiss_file(faiss_file)
                return index
        elif faiss_file.exists() and fingerprint is None:
            # A snapshot from before the cache: its bare FAISS file was written with these very features.
            same = settings == {"metric": meta.get("metric"), "kind": meta.get("kind"), "nlist": saved_nlist}
            if same:
                index.tuning = json.loads(meta.get("tuning") or "null")  # the saved index was tuned already
                index._adopt_faiss_file(faiss_file)
                return index
        elif faiss_file.exists():
            raise SnapshotError(f"FAISS index file is corrupted: {faiss_file} (no cache header)")
        if fingerprint is not None:
            index._cache = (faiss_file, fingerprint, None)
        return index

    @classmethod
    def from_snapshot(
        cls,
        dirpath: PathLike,
        dataset: str = "train",
        version: str | int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load the index of one dataset from a ``FeatureSnapshot`` directory.

        Args:
            dirpath: the snapshot directory (``FeatureSnapshot.snapshot_dir``).
            dataset: ``"train"`` or a name from ``FeatureSnapshot(datasets=...)``.
            version: ``None``/``"latest"``, a version name, or a position (``-1`` the last).
            **kwargs: overrides passed to :meth:`load` (``metric``, ``kind``, ``nlist``, ``nprobe``, ``use_gpu``,
                ``backend``).

        Raises:
            SnapshotNotFoundError: if the directory, manifest, version, dataset or file is missing.
            SnapshotError: if the manifest or a file is corrupted, or the manifest names a file outside the
                version's directory.

        Example::

            >>> index = KNNIndex.from_snapshot("runs/fastif_snapshot")  # doctest: +SKIP
            >>> distances, train_ids = index.search(test_features, k=1000)  # doctest: +SKIP
        """
        file, entry = feature_snapshot_file(dirpath, dataset, version)
        index = cls.load(file.parent, file.name.removesuffix(".safetensors"), **kwargs)
        if index._cache is not None:
            # The IVF index built at the first search is recorded in the manifest, with its features' fingerprint.
            cache_file, fingerprint, _ = index._cache
            version_name = str(entry["version"])

            def on_saved(info: dict[str, Any]) -> None:
                record_index_cache(dirpath, version_name, dataset, info)

            index._cache = (cache_file, fingerprint, on_saved)
        return index
