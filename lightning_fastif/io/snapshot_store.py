"""The snapshot directory: the one reader and writer of its layout (no Lightning needed to read it back).

The snapshot callbacks (:mod:`lightning_fastif.lightning.snapshots`) write, and the influence module, the kNN
index and users read, one directory::

    <dirpath>/manifest.json                                   runs and versions of each kind (below)
    <dirpath>/features/<version>/<dataset>.safetensors        "features" [N, D] float32, "indices" [N] int64 (sorted)
    <dirpath>/features/<version>/<dataset>.faiss              a FAISS IVF index built from those features, cached
                                                              at its first search (see ``record_index_cache``)
    <dirpath>/features/<version>/last_layer_hessian.safetensors   "last_layer_hessian" [P, P] (loss gradients)
    <dirpath>/features/<version>/last_layer_kfac/             the last layer's K-FAC factors instead (KFACFactors.save)
    <dirpath>/checkpoints/<version>.safetensors               model weights (parameter name -> tensor)
    <dirpath>/curvature/<version>/                            K-FAC/EK-FAC factors (KFACFactors.save; CurvatureSnapshot)

The manifest (``format_version`` 2)::

    {"format": "lightning_fastif.snapshot", "format_version": 2,
     "features":    {"run": <current run id>, "runs": [<run id>, ...], "latest": <version>, "versions": {...}},
     "checkpoints": {... the same ...}}

**Versions** are named ``epoch=<E>-step=<S>``: ``E`` is Lightning's 0-based ``trainer.current_epoch`` of the epoch
the weights come from (the last finished epoch for a snapshot at the end of fit, so ``epochs=[2]`` and the end of a
3-epoch fit name the same epoch) and ``S`` is ``trainer.global_step``. Every file a version entry names
(``file``, ``index_file``) is a plain file name inside the version's own directory (``features/<version>/``, or
``checkpoints/`` for weights); any other path in a manifest raises :class:`SnapshotError` naming the manifest and the
field (:func:`~lightning_fastif.io.atomic.manifest_member`). Manifests of format version 1, whose ``file`` fields
held the path relative to ``<dirpath>`` (``features/<version>/train.safetensors``), still read, as long as that path
is exactly the one the layout gives.

**Runs.** Each ``fit`` that writes into the directory is a run (its id is recorded in every entry it writes, as
``run_id``). A second fit into a directory that already holds another run's versions of a kind starts a new run:
its versions are named ``epoch=<E>-step=<S>-run=<K>`` (``K`` the run's position, from 1; the first run has no
suffix), so nothing of the earlier run is overwritten, and ``"latest"``, positions and ``"all"`` see the current run
only. Earlier runs' versions stay readable by name (and through ``snapshot_versions(..., all_runs=True)``). A fit
resumed from a Lightning checkpoint (``ckpt_path``) continues its own run. Runs are counted per kind: the features and
the checkpoints sections each keep their own list.

This module imports no Lightning.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from lightning_fastif.core.factored_grads import FactoredGradients
from lightning_fastif.errors import ArgumentError, SnapshotError, SnapshotNotFoundError
from lightning_fastif.io.atomic import (
    PathLike,
    is_plain_name,
    load_tensors,
    manifest_member,
    manifest_path,
    map_tensors,
    read_manifest,
    read_tensor_metadata,
    write_manifest,
)

SNAPSHOT_FORMAT = "lightning_fastif.snapshot"
SNAPSHOT_FORMAT_VERSION = 2
"""2: file names in entries are plain names inside the version's directory, and runs are kept apart."""
FEATURES_DIR = "features"
CHECKPOINTS_DIR = "checkpoints"
CURVATURE_DIR = "curvature"
LAST_LAYER_HESSIAN = "last_layer_hessian"
"""Manifest key, file stem and tensor name of the Hessian stored with loss-gradient features."""
LAST_LAYER_KFAC = "last_layer_kfac"
"""Directory (``KFACFactors.save``) of the last layer's K-FAC factors stored with loss-gradient features, named by
the ``last_layer_hessian`` entry's ``file`` when its ``curvature`` is ``"kfac"`` or ``"ekfac"``."""
FACTORED = "factored"
"""The ``layout`` header value of a features file holding loss gradients as their two factors."""
FACTOR_TENSORS = ("out_grads", "inputs")
"""The tensors of a factored features file, ``[N, C]`` and ``[N, D]`` (see ``core/factored_grads.py``)."""
TENSOR_SUFFIX = ".safetensors"
FAISS_SUFFIX = ".faiss"

SnapshotKind = Literal["features", "checkpoints", "curvature"]
_KINDS = (FEATURES_DIR, CHECKPOINTS_DIR, CURVATURE_DIR)

__all__ = [
    "CHECKPOINTS_DIR",
    "CURVATURE_DIR",
    "FEATURES_DIR",
    "LAST_LAYER_HESSIAN",
    "LAST_LAYER_KFAC",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_FORMAT_VERSION",
    "apply_checkpoint",
    "checkpoint_file",
    "curvature_dir",
    "dataset_record",
    "empty_snapshot_manifest",
    "feature_dir",
    "feature_file",
    "feature_snapshot_file",
    "last_layer_hessian_file",
    "load_checkpoint",
    "read_feature_snapshot",
    "read_snapshot_manifest",
    "record_index_cache",
    "record_version",
    "resolve_version",
    "snapshot_versions",
    "start_run",
    "version_name",
]


# ---------------------------------------------------------------------------------------------------------------------
# Names and paths (the layout, in one place)
# ---------------------------------------------------------------------------------------------------------------------


def version_name(epoch: int, global_step: int, run_index: int = 0) -> str:
    """``epoch=<E>-step=<S>`` for the first run in a directory, ``epoch=<E>-step=<S>-run=<K>`` for later ones.

    Example::

        >>> version_name(2, 12), version_name(0, 4, run_index=1)
        ('epoch=2-step=12', 'epoch=0-step=4-run=1')
    """
    name = f"epoch={int(epoch)}-step={int(global_step)}"
    return f"{name}-run={int(run_index)}" if run_index else name


def _plain(argument: str, value: Any) -> str:
    """A version or dataset name given to a writer: it becomes a file or directory name, so it must be plain."""
    if not is_plain_name(value):
        raise ArgumentError(f"{argument}: expected a plain file name (no directory part), got {value!r}")
    return value


def feature_dir(dirpath: PathLike, version: str) -> Path:
    """Directory of one features version: ``<dirpath>/features/<version>``."""
    return Path(dirpath) / FEATURES_DIR / _plain("version", version)


def feature_file(dirpath: PathLike, version: str, dataset: str) -> Path:
    """Path of one dataset's features in one version: ``<dirpath>/features/<version>/<dataset>.safetensors``.

    Example::

        >>> feature_file("snap", "epoch=0-step=4", "train").as_posix()
        'snap/features/epoch=0-step=4/train.safetensors'
    """
    return feature_dir(dirpath, version) / f"{_plain('dataset', dataset)}{TENSOR_SUFFIX}"


def checkpoint_file(dirpath: PathLike, version: str) -> Path:
    """Path of one weights snapshot: ``<dirpath>/checkpoints/<version>.safetensors``."""
    return Path(dirpath) / CHECKPOINTS_DIR / f"{_plain('version', version)}{TENSOR_SUFFIX}"


def curvature_dir(dirpath: PathLike, version: str) -> Path:
    """Directory of one curvature version (``KFACFactors.save``): ``<dirpath>/curvature/<version>``.

    Example::

        >>> curvature_dir("snap", "epoch=2-step=12").as_posix()
        'snap/curvature/epoch=2-step=12'
    """
    return Path(dirpath) / CURVATURE_DIR / _plain("version", version)


def dataset_record(dirpath: PathLike, version: str, dataset: str, n: int, dim: int) -> dict[str, Any]:
    """The manifest record of one dataset's features, once its files are written (``FeatureSnapshot`` uses it).

    Returns:
        ``{"file", "index_file", "n", "dim"}``: plain file names inside ``features/<version>/``; ``index_file`` is
        ``None`` unless a FAISS index was saved next to the features (an index built later, at the first search,
        is added by :func:`record_index_cache`).
    """
    path = feature_file(dirpath, version, dataset)
    faiss_file = path.with_suffix(FAISS_SUFFIX)
    return {
        "file": path.name,
        "index_file": faiss_file.name if faiss_file.exists() else None,
        "n": int(n),
        "dim": int(dim),
    }


def _member(dirpath: PathLike, kind: str, version: str, field: str, value: Any) -> Path:
    """The file an entry field names, inside the version's directory; format-1 values (the path relative to
    ``dirpath``) are accepted when they are exactly the path the layout gives."""
    if kind == FEATURES_DIR:
        inside = Path(dirpath) / FEATURES_DIR / version
        legacy = f"{FEATURES_DIR}/{version}/"
    elif kind == CURVATURE_DIR:
        inside, legacy = Path(dirpath) / CURVATURE_DIR, f"{CURVATURE_DIR}/"
    else:
        inside = Path(dirpath) / CHECKPOINTS_DIR
        legacy = f"{CHECKPOINTS_DIR}/"
    if isinstance(value, str) and value.startswith(legacy) and is_plain_name(value[len(legacy) :]):
        value = value[len(legacy) :]
    return manifest_member(dirpath, f"{kind}.versions[{version!r}].{field}", value, inside=inside)


def _check_entry(dirpath: PathLike, kind: str, version: Any, entry: Any) -> None:
    """Every name an entry holds stays inside its own directory (raises ``SnapshotError`` otherwise)."""
    if not is_plain_name(version):
        raise SnapshotError(
            f"manifest {manifest_path(dirpath)}: field '{kind}.versions' holds the version name {version!r}, which is "
            "not a plain name (a version is a directory or file name inside the snapshot directory)"
        )
    if not isinstance(entry, Mapping):
        raise SnapshotError(
            f"manifest {manifest_path(dirpath)}: field '{kind}.versions[{version!r}]' is a "
            f"{type(entry).__name__}, expected an object"
        )
    if kind in (CHECKPOINTS_DIR, CURVATURE_DIR):
        _member(dirpath, kind, version, "file", entry.get("file"))
        return
    datasets = entry.get("datasets", {})
    if not isinstance(datasets, Mapping):
        raise SnapshotError(
            f"manifest {manifest_path(dirpath)}: field 'features.versions[{version!r}].datasets' is not an object"
        )
    for name, record in datasets.items():
        field = f"datasets[{name!r}]"
        if not is_plain_name(name) or not isinstance(record, Mapping):
            raise SnapshotError(
                f"manifest {manifest_path(dirpath)}: field 'features.versions[{version!r}].{field}' is not a dataset "
                "record with a plain name"
            )
        _member(dirpath, kind, version, f"{field}.file", record.get("file"))
        if record.get("index_file") is not None:
            _member(dirpath, kind, version, f"{field}.index_file", record["index_file"])
    hessian = entry.get(LAST_LAYER_HESSIAN)
    if isinstance(hessian, Mapping) and hessian.get("file") is not None:
        _member(dirpath, kind, version, f"{LAST_LAYER_HESSIAN}.file", hessian["file"])


# ---------------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------------


def _empty_section() -> dict[str, Any]:
    return {"run": None, "runs": [], "latest": None, "versions": {}}


def empty_snapshot_manifest() -> dict[str, Any]:
    """A manifest with no versions, in the layout the snapshot callbacks write."""
    return {
        "format": SNAPSHOT_FORMAT,
        "format_version": SNAPSHOT_FORMAT_VERSION,
        FEATURES_DIR: _empty_section(),
        CHECKPOINTS_DIR: _empty_section(),
        CURVATURE_DIR: _empty_section(),
    }


def read_snapshot_manifest(dirpath: PathLike, *, missing_ok: bool = False) -> dict[str, Any]:
    """Read a snapshot manifest and check its layout; with ``missing_ok`` a missing one reads as empty.

    Every version name and every file name in it is checked to stay inside the snapshot directory.

    Raises:
        SnapshotNotFoundError: if the directory or manifest does not exist (and ``missing_ok`` is False).
        SnapshotError: if the manifest is corrupted, not a snapshot manifest, or names a file outside its place.
    """
    if missing_ok and not manifest_path(dirpath).exists():
        return empty_snapshot_manifest()
    manifest = read_manifest(dirpath)
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"not a lightning_fastif snapshot manifest: {manifest_path(dirpath)} has format "
            f"{manifest.get('format')!r}, expected {SNAPSHOT_FORMAT!r}"
        )
    for kind in _KINDS:
        section = manifest.setdefault(kind, _empty_section())
        if not isinstance(section, dict) or not isinstance(section.get("versions"), dict):
            raise SnapshotError(f"manifest is corrupted: {manifest_path(dirpath)} has no '{kind}.versions' object")
        if not isinstance(section.get("runs", []), list):
            raise SnapshotError(f"manifest is corrupted: {manifest_path(dirpath)} has a '{kind}.runs' that is no list")
        for version, entry in section["versions"].items():
            _check_entry(dirpath, kind, version, entry)
    return manifest


def _check_kind(kind: Any) -> None:
    if kind not in _KINDS:
        raise ArgumentError(f"kind: expected one of {list(_KINDS)}, got {kind!r}")


def _ordered(section: Mapping[str, Any], *, all_runs: bool) -> list[dict[str, Any]]:
    run = section.get("run")
    entries = [
        dict(entry, version=name)
        for name, entry in section["versions"].items()
        # Manifests without a current run (format 1, or written by hand) show every version.
        if all_runs or run is None or entry.get("run_id") == run
    ]
    return sorted(entries, key=lambda e: (int(e.get("global_step", 0)), float(e.get("created", 0.0))))


def snapshot_versions(dirpath: PathLike, kind: SnapshotKind, *, all_runs: bool = False) -> list[dict[str, Any]]:
    """Manifest entries of one kind (``"features"``, ``"checkpoints"``, ``"curvature"``), by global step, then time.

    Args:
        dirpath: snapshot directory.
        kind: ``"features"``, ``"checkpoints"`` or ``"curvature"``.
        all_runs: also list the versions of earlier runs in this directory (default: the current run only).

    Returns:
        The entries, each with its name under ``"version"``.

    Raises:
        SnapshotNotFoundError: if the directory or its manifest does not exist.
        SnapshotError: if the manifest is corrupted.

    Example::

        >>> import tempfile
        >>> snapshot_versions(tempfile.mkdtemp(), "features")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_fastif.errors.SnapshotNotFoundError: manifest (manifest.json) of ... not found: ...
    """
    _check_kind(kind)
    return _ordered(read_snapshot_manifest(dirpath)[kind], all_runs=all_runs)


def resolve_version(dirpath: PathLike, kind: SnapshotKind, version: str | int | None = None) -> dict[str, Any]:
    """Return the manifest entry of one version.

    Args:
        dirpath: snapshot directory.
        kind: ``"features"``, ``"checkpoints"`` or ``"curvature"``.
        version: ``None`` or ``"latest"`` for the latest version of the current run, a position among the current
            run's versions ordered by global step (``0`` the first, ``-1`` the last), or a version name (of any run).

    Raises:
        SnapshotNotFoundError: if the directory, manifest or that version does not exist.
    """
    _check_kind(kind)
    section = read_snapshot_manifest(dirpath)[kind]
    if isinstance(version, str) and version != "latest":
        if version in section["versions"]:
            return dict(section["versions"][version], version=version)
        names = [e["version"] for e in _ordered(section, all_runs=True)]
        raise SnapshotNotFoundError(f"version: {version!r} not found in {dirpath}; available {kind} versions: {names}")
    entries = _ordered(section, all_runs=False)
    if not entries:
        raise SnapshotNotFoundError(
            f"no {kind} snapshot in {dirpath} (its manifest lists no version of the current run)"
        )
    if version is None or version == "latest":
        by_name = {e["version"]: e for e in entries}
        return by_name.get(section.get("latest"), entries[-1])
    if isinstance(version, int) and not isinstance(version, bool):
        if not -len(entries) <= version < len(entries):
            raise SnapshotNotFoundError(
                f"version: position {version} out of range; {dirpath} holds {len(entries)} {kind} versions "
                f"(accepted: {-len(entries)}..{len(entries) - 1})"
            )
        return entries[version]
    raise ArgumentError(f"version: expected None, 'latest', a version name or a position, got {version!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Writing (rank 0 of the snapshot callbacks)
# ---------------------------------------------------------------------------------------------------------------------


def _runs(section: Mapping[str, Any]) -> list[Any]:
    """The runs of a section in the order they started; run ids found only in entries (format 1, or entries written
    by hand) follow the recorded ones, oldest first, so recorded runs keep their positions."""
    runs = list(section.get("runs", []))
    entries = sorted(section["versions"].values(), key=lambda e: float(e.get("created", 0.0)))
    runs += [run for run in dict.fromkeys(e.get("run_id") for e in entries) if run not in runs]
    return runs


def start_run(dirpath: PathLike, kind: SnapshotKind, run_id: str) -> int:
    """Make ``run_id`` the current run of ``kind`` and return its position (0 for the first run in the directory).

    A run seen before (a resumed fit) keeps its position; a new one in a directory holding other runs' versions
    gets the next position, and from now on ``"latest"``, positions and ``"all"`` see only its versions. Nothing is
    written while the directory has no manifest (the first version registers the run).

    Example::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> start_run(d, "checkpoints", "a")
        0
    """
    _check_kind(kind)
    if not manifest_path(dirpath).exists():
        return 0
    manifest = read_snapshot_manifest(dirpath)
    section = manifest[kind]
    runs = _runs(section)
    if run_id not in runs:
        if not runs and not section["versions"]:
            return 0
        runs.append(run_id)
    if section.get("run") != run_id:
        latest = section["versions"].get(section.get("latest"), {})
        section["latest"] = section.get("latest") if latest.get("run_id") == run_id else None
    section.update(run=run_id, runs=runs)
    manifest["format_version"] = SNAPSHOT_FORMAT_VERSION
    write_manifest(dirpath, manifest)
    return runs.index(run_id)


def record_version(dirpath: PathLike, kind: SnapshotKind, version: str, entry: Mapping[str, Any]) -> None:
    """Add ``entry`` (its files already written) as ``version`` of ``kind``, the latest of its run.

    The entry's ``run_id`` becomes the current run. Its file names are checked like a reader checks them.

    Raises:
        SnapshotError: if the existing manifest is corrupted or the entry names a file outside its place.
    """
    _check_kind(kind)
    manifest = read_snapshot_manifest(dirpath, missing_ok=True)
    entry = dict(entry)
    entry.setdefault("created", time.time())
    _check_entry(dirpath, kind, version, entry)
    section = manifest[kind]
    run = entry.get("run_id")
    runs = _runs(section)
    if run not in runs:
        runs.append(run)
    section["versions"][version] = entry
    section.update(run=run, runs=runs, latest=version)
    manifest["format_version"] = SNAPSHOT_FORMAT_VERSION
    write_manifest(dirpath, manifest)


def record_index_cache(dirpath: PathLike, version: str, dataset: str, index: Mapping[str, Any]) -> bool:
    """Record a kNN index built after the snapshot (at its first search) in the dataset's manifest record.

    Sets the record's ``index_file`` (the cache's plain file name) and updates its ``index`` settings with
    ``index`` (``kind``, ``nlist``, ``nprobe``, ``tuning``, ``features_fingerprint``: the fingerprint of the
    features file the cache was built from, the same as the record's ``fingerprint``, so a reader can tell a
    stale cache). Nothing is written when the version or dataset is gone, or the record's ``fingerprint``
    differs from ``index["features_fingerprint"]`` (the features were rewritten meanwhile).

    Returns:
        True when the manifest was updated.

    Raises:
        SnapshotError: if the manifest is corrupted or ``index["file"]`` is not a plain name.
    """
    manifest = read_snapshot_manifest(dirpath, missing_ok=True)
    record = manifest[FEATURES_DIR]["versions"].get(version, {}).get("datasets", {}).get(dataset)
    if not isinstance(record, dict) or record.get("fingerprint") != index.get("features_fingerprint"):
        return False
    settings = dict(index)
    file = settings.pop("file", None)
    _member(dirpath, FEATURES_DIR, version, f"datasets[{dataset!r}].index_file", file)
    record["index_file"] = file
    record["index"] = {**dict(record.get("index") or {}), **settings}
    write_manifest(dirpath, manifest)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def feature_snapshot_file(
    dirpath: PathLike, dataset: str = "train", version: str | int | None = None
) -> tuple[Path, dict[str, Any]]:
    """The features file of one dataset in one version, and the version's entry.

    Args:
        dirpath: snapshot directory.
        dataset: dataset name (``"train"`` or a name given in ``FeatureSnapshot(datasets=...)``).
        version: see :func:`resolve_version` (default: the latest of the current run).

    Raises:
        SnapshotNotFoundError: if the directory, manifest, version or dataset is missing.
        SnapshotError: if the manifest is corrupted or names a file outside the version's directory.
    """
    entry = resolve_version(dirpath, FEATURES_DIR, version)
    datasets = entry.get("datasets", {})
    if dataset not in datasets:
        raise SnapshotNotFoundError(
            f"dataset: {dataset!r} not in features version {entry['version']!r} of {dirpath}; "
            f"available: {sorted(datasets)}"
        )
    path = _member(dirpath, FEATURES_DIR, entry["version"], f"datasets[{dataset!r}].file", datasets[dataset]["file"])
    return path, entry


def last_layer_hessian_file(dirpath: PathLike, entry: Mapping[str, Any]) -> Path | None:
    """The ``last_layer_hessian`` file a features entry lists, or ``None`` when it stored none.

    A dense Hessian is a safetensors file; K-FAC factors (the entry's ``curvature`` is ``"kfac"``/``"ekfac"``) are
    a directory written by ``KFACFactors.save``.

    Args:
        dirpath: snapshot directory.
        entry: a features entry, as :func:`resolve_version` returns it (with ``"version"``).

    Raises:
        SnapshotError: if the entry names a file outside the version's directory.
    """
    record = entry.get(LAST_LAYER_HESSIAN)
    if not isinstance(record, Mapping) or not record.get("file"):
        return None
    return _member(dirpath, FEATURES_DIR, str(entry["version"]), f"{LAST_LAYER_HESSIAN}.file", record["file"])


def features_of_file(tensors: Mapping[str, Tensor], meta: Mapping[str, str], path: PathLike) -> Any:
    """The features a features file holds: its ``features`` tensor, or :class:`FactoredGradients` over its factors
    (header ``layout: factored``; ``bias`` says whether the dense rows end with the bias gradient).

    Raises:
        SnapshotError: neither the ``features`` tensor nor both factors are there.
    """
    if meta.get("layout") == FACTORED:
        if any(name not in tensors for name in FACTOR_TENSORS):
            raise SnapshotError(f"feature file {path} lacks tensors {list(FACTOR_TENSORS)} (holds {sorted(tensors)})")
        return FactoredGradients(tensors[FACTOR_TENSORS[0]], tensors[FACTOR_TENSORS[1]], bias=meta.get("bias") == "1")
    if "features" not in tensors:
        raise SnapshotError(f"feature file {path} lacks tensors ['features'] (holds {sorted(tensors)})")
    return tensors["features"].float()


def read_feature_snapshot(
    dirpath: PathLike, dataset: str = "train", version: str | int | None = None
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Load the features of one dataset from a snapshot directory.

    Args:
        dirpath: snapshot directory (the ``snapshot_dir`` of ``FeatureSnapshot``).
        dataset: dataset name (``"train"`` or a name given in ``FeatureSnapshot(datasets=...)``).
        version: see :func:`resolve_version` (default: the latest of the current run).

    Returns:
        ``(features [N, D] float32, indices [N] int64, manifest entry)``; rows are sorted by dataset index. Loss
        gradients stored as their factors (``out_grads``, ``inputs``) are returned as dense rows, formed in memory;
        otherwise the tensors are copy-on-write memory maps of the file (pages load as they are read; writing to
        them never changes the file).

    Raises:
        SnapshotNotFoundError: if the directory, manifest, version, dataset or file is missing.
        SnapshotError: if the file is corrupted or lacks the ``features``/``indices`` tensors.

    Example::

        >>> features, indices, entry = read_feature_snapshot("runs/fastif_snapshot")  # doctest: +SKIP
    """
    path, entry = feature_snapshot_file(dirpath, dataset, version)
    tensors = map_tensors(path)  # memory-mapped: reading a large set costs no copy
    if "indices" not in tensors:
        raise SnapshotError(f"feature file {path} lacks tensors ['indices'] (holds {sorted(tensors)})")
    features, indices = features_of_file(tensors, read_tensor_metadata(path), path), tensors["indices"]
    if isinstance(features, FactoredGradients):
        features = features[:]  # the dense rows, formed here (N x C·(D+1))
    if features.dim() != 2 or indices.dim() != 1 or features.shape[0] != indices.shape[0]:
        raise SnapshotError(
            f"feature file {path} is inconsistent: features {tuple(features.shape)}, indices {tuple(indices.shape)}"
        )
    return features.float(), indices.long(), entry


def load_checkpoint(
    dirpath: PathLike, which: Literal["latest", "all"] | int | str | Sequence[int | str] = "latest"
) -> list[tuple[dict[str, Tensor], dict[str, Any]]]:
    """Load weight snapshots written by ``CheckpointSnapshot``.

    Args:
        dirpath: snapshot directory.
        which: ``"latest"``, ``"all"`` (the current run's, ordered by global step), a version name, a position
            (``0`` first, ``-1`` last) or a sequence of names/positions, e.g. for TracIn-style sums over checkpoints.

    Returns:
        A list of ``(weights, manifest entry)``; weights map parameter names to CPU tensors.

    Raises:
        SnapshotNotFoundError: if the directory, manifest or a version is missing.
        SnapshotError: if a weights file is corrupted or the manifest names a file outside ``checkpoints/``.

    Example::

        >>> for weights, entry in load_checkpoint("runs/fastif_snapshot", "all"):  # doctest: +SKIP
        ...     apply_checkpoint(model, weights)
    """
    if which == "all":
        entries = snapshot_versions(dirpath, CHECKPOINTS_DIR)
        if not entries:
            raise SnapshotNotFoundError(
                f"no checkpoints snapshot in {dirpath} (its manifest lists no version of the current run)"
            )
    elif isinstance(which, (list, tuple)):
        entries = [resolve_version(dirpath, CHECKPOINTS_DIR, w) for w in which]
    else:
        entries = [resolve_version(dirpath, CHECKPOINTS_DIR, which)]  # type: ignore[arg-type]
    return [(load_tensors(_member(dirpath, CHECKPOINTS_DIR, e["version"], "file", e.get("file"))), e) for e in entries]


def apply_checkpoint(model: nn.Module, weights: Mapping[str, Tensor]) -> nn.Module:
    """Copy ``weights`` (a full or partial state dict) into ``model`` in place, keeping its devices and dtypes.

    Parameters and buffers absent from ``weights`` are left unchanged (a snapshot of selected parameters).

    Returns:
        ``model``.

    Raises:
        KeyError: if ``weights`` names a tensor the model does not have (the message lists a few it has).
        RuntimeError: if a shape does not match.

    Example::

        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> _ = apply_checkpoint(net, {"bias": torch.tensor([3.0])})
        >>> net.bias.item()
        3.0
    """
    result = model.load_state_dict(dict(weights), strict=False)
    if result.unexpected_keys:
        known = list(model.state_dict())
        raise KeyError(
            f"weights: {result.unexpected_keys[:10]} not found in {type(model).__name__}; its state dict has "
            f"{len(known)} entries, e.g. {known[:10]}"
        )
    return model
