"""Files on disk: atomic writes, safetensors tensors, a JSON manifest, and the snapshot directory layout.

Everything here is written to a temporary name in the destination directory and then renamed with
``os.replace``, so a reader sees either the old file or the new one, never half a file, and a crash loses at
most the file being written. Tensors are stored as safetensors (never pickle), so loading a file cannot run
code.

The second half of the module describes the directory that the snapshot callbacks write (see
``lightning_fastif.lightning.snapshots``) and reads it back without Lightning::

    <dirpath>/manifest.json                              versions of each kind, and the latest one
    <dirpath>/features/<version>/<dataset>.safetensors   tensors "features" [N, D] float32, "indices" [N] int64
    <dirpath>/checkpoints/<version>.safetensors          model weights (parameter name -> tensor)

This module imports no Lightning.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_fastif.errors import SnapshotError, SnapshotNotFoundError

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside a snapshot (or results) directory."""

SNAPSHOT_FORMAT = "lightning_fastif.snapshot"
SNAPSHOT_FORMAT_VERSION = 1
FEATURES_DIR = "features"
CHECKPOINTS_DIR = "checkpoints"

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is flushed to disk and renamed onto ``path``.

    The parent directory is created when missing. If the body raises, the temporary file is removed and
    ``path`` is left as it was.

    Example::

        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("hello")
        >>> target.read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target, so os.replace is a rename within one file system (atomic on POSIX).
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates owner-only files; give the result the permissions an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, then ``os.replace``).

    Returns:
        The path written.

    Example::

        >>> import tempfile
        >>> p = atomic_write_bytes(Path(tempfile.mkdtemp()) / "x.bin", b"abc")
        >>> p.read_bytes()
        b'abc'
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _storable(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that own their memory: safetensors refuses tensors that share storage."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensors: keys must be str, got {type(name).__name__} ({name!r})")
        if not isinstance(value, Tensor):
            raise TypeError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(value).__name__}")
        t = value.detach().to("cpu")
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()
        if shared or not t.is_contiguous():
            # Tied weights (an embedding shared with an output layer) or views of a larger buffer.
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_tensors(path: PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Save named tensors to a safetensors file, atomically.

    Args:
        path: destination file (its directory is created when missing).
        tensors: name -> tensor; tensors are moved to CPU, and tensors sharing memory are copied.
        metadata: optional str -> str pairs stored in the file header.

    Returns:
        The path written.

    Raises:
        TypeError: if a key is not a str, a value is not a tensor, or a metadata value is not a str.

    Example::

        >>> import tempfile
        >>> p = save_tensors(Path(tempfile.mkdtemp()) / "t.safetensors", {"w": torch.ones(2)}, {"epoch": "3"})
        >>> load_tensors(p)["w"].tolist(), read_tensor_metadata(p)["epoch"]
        ([1.0, 1.0], '3')
    """
    meta = dict(metadata or {})
    bad = {k: v for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"metadata: keys and values must be str (safetensors header), got {bad!r}")
    storable = _storable(tensors)
    with atomic_path(path) as tmp:
        save_file(storable, str(tmp), metadata=meta or None)
    return Path(path)


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise SnapshotNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise SnapshotError(f"{what} is not a file: {path}")


def load_tensors(path: PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load every tensor of a safetensors file (never unpickles anything).

    Raises:
        SnapshotNotFoundError: if the file does not exist (a ``FileNotFoundError``).
        SnapshotError: if it is not a readable safetensors file (truncated, corrupted, another format).

    Example::

        >>> import tempfile
        >>> p = save_tensors(Path(tempfile.mkdtemp()) / "t.safetensors", {"a": torch.arange(3)})
        >>> load_tensors(p)["a"].tolist()
        [0, 1, 2]
    """
    path = Path(path)
    _require_file(path, "tensor file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SnapshotError(f"tensor file is corrupted or not a safetensors file: {path} ({err})") from err


def read_tensor_metadata(path: PathLike) -> dict[str, str]:
    """Return the str -> str metadata stored in a safetensors file header (empty when none).

    Raises:
        SnapshotNotFoundError: if the file does not exist.
        SnapshotError: if it is not a readable safetensors file.
    """
    path = Path(path)
    _require_file(path, "tensor file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SnapshotError(f"tensor file is corrupted or not a safetensors file: {path} ({err})") from err


# ---------------------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------------------


def manifest_path(dirpath: PathLike) -> Path:
    """Path of the manifest file inside ``dirpath``."""
    return Path(dirpath) / MANIFEST_NAME


def read_manifest(dirpath: PathLike) -> dict[str, Any]:
    """Read ``<dirpath>/manifest.json``.

    Raises:
        SnapshotNotFoundError: if the directory or its manifest does not exist.
        SnapshotError: if the manifest is not valid JSON or not a JSON object.

    Example::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = write_manifest(d, {"latest": "v1"})
        >>> read_manifest(d)["latest"]
        'v1'
    """
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        raise SnapshotNotFoundError(f"snapshot directory not found: {dirpath}")
    path = manifest_path(dirpath)
    _require_file(path, f"manifest ({MANIFEST_NAME}) of {dirpath}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SnapshotError(f"manifest is corrupted (not valid JSON): {path} ({err})") from err
    if not isinstance(manifest, dict):
        raise SnapshotError(f"manifest is corrupted: {path} holds a JSON {type(manifest).__name__}, expected an object")
    return manifest


def write_manifest(dirpath: PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest`` (JSON-serialisable) to ``<dirpath>/manifest.json`` atomically.

    Returns:
        The manifest path.

    Raises:
        TypeError: if ``manifest`` holds values JSON cannot encode.
    """
    data = json.dumps(manifest, indent=2, sort_keys=False, allow_nan=True) + "\n"
    return atomic_write_bytes(manifest_path(dirpath), data.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------------
# Snapshot directory layout (written by lightning_fastif.lightning.snapshots, read here without Lightning)
# ---------------------------------------------------------------------------------------------------------------------

SnapshotKind = Literal["features", "checkpoints"]


def empty_snapshot_manifest() -> dict[str, Any]:
    """A manifest with no versions, in the layout the snapshot callbacks write."""
    return {
        "format": SNAPSHOT_FORMAT,
        "format_version": SNAPSHOT_FORMAT_VERSION,
        FEATURES_DIR: {"latest": None, "versions": {}},
        CHECKPOINTS_DIR: {"latest": None, "versions": {}},
    }


def read_snapshot_manifest(dirpath: PathLike, *, missing_ok: bool = False) -> dict[str, Any]:
    """Read a snapshot manifest and check its layout; with ``missing_ok`` a missing one reads as empty.

    Raises:
        SnapshotNotFoundError: if the directory or manifest does not exist (and ``missing_ok`` is False).
        SnapshotError: if the manifest is corrupted or not a snapshot manifest.
    """
    if missing_ok and not manifest_path(dirpath).exists():
        return empty_snapshot_manifest()
    manifest = read_manifest(dirpath)
    if manifest.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"not a lightning_fastif snapshot manifest: {manifest_path(dirpath)} has format "
            f"{manifest.get('format')!r}, expected {SNAPSHOT_FORMAT!r}"
        )
    for kind in (FEATURES_DIR, CHECKPOINTS_DIR):
        section = manifest.setdefault(kind, {"latest": None, "versions": {}})
        if not isinstance(section, dict) or not isinstance(section.get("versions"), dict):
            raise SnapshotError(f"manifest is corrupted: {manifest_path(dirpath)} has no '{kind}.versions' object")
    return manifest


def snapshot_versions(dirpath: PathLike, kind: SnapshotKind) -> list[dict[str, Any]]:
    """Manifest entries of one kind (``"features"`` or ``"checkpoints"``), ordered by global step, then time.

    Example::

        >>> import tempfile
        >>> snapshot_versions(tempfile.mkdtemp(), "features")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_fastif.io.storage.SnapshotNotFoundError: manifest (manifest.json) of ... not found: ...
    """
    if kind not in (FEATURES_DIR, CHECKPOINTS_DIR):
        raise ValueError(f"kind: expected 'features' or 'checkpoints', got {kind!r}")
    versions = read_snapshot_manifest(dirpath)[kind]["versions"]
    entries = [dict(entry, version=name) for name, entry in versions.items()]
    return sorted(entries, key=lambda e: (int(e.get("global_step", 0)), float(e.get("created", 0.0))))


def resolve_version(dirpath: PathLike, kind: SnapshotKind, version: str | int | None = None) -> dict[str, Any]:
    """Return the manifest entry of one version.

    Args:
        dirpath: snapshot directory.
        kind: ``"features"`` or ``"checkpoints"``.
        version: ``None`` or ``"latest"`` for the latest one, a version name, or a position in the list
            ordered by global step (``0`` the first, ``-1`` the last).

    Raises:
        SnapshotNotFoundError: if the directory, manifest or that version does not exist.
    """
    entries = snapshot_versions(dirpath, kind)
    if not entries:
        raise SnapshotNotFoundError(f"no {kind} snapshot in {dirpath} (its manifest lists no version)")
    if version is None or version == "latest":
        latest = read_snapshot_manifest(dirpath)[kind].get("latest")
        by_name = {e["version"]: e for e in entries}
        return by_name.get(latest, entries[-1])
    if isinstance(version, int) and not isinstance(version, bool):
        if not -len(entries) <= version < len(entries):
            raise SnapshotNotFoundError(
                f"version: position {version} out of range; {dirpath} holds {len(entries)} {kind} versions "
                f"(accepted: {-len(entries)}..{len(entries) - 1})"
            )
        return entries[version]
    for entry in entries:
        if entry["version"] == version:
            return entry
    names = [e["version"] for e in entries]
    raise SnapshotNotFoundError(f"version: {version!r} not found in {dirpath}; available {kind} versions: {names}")


def feature_file(dirpath: PathLike, version: str, dataset: str) -> Path:
    """Path of one dataset's features in one version: ``<dirpath>/features/<version>/<dataset>.safetensors``."""
    return Path(dirpath) / FEATURES_DIR / version / f"{dataset}.safetensors"


def checkpoint_file(dirpath: PathLike, version: str) -> Path:
    """Path of one weights snapshot: ``<dirpath>/checkpoints/<version>.safetensors``."""
    return Path(dirpath) / CHECKPOINTS_DIR / f"{version}.safetensors"


def read_feature_snapshot(
    dirpath: PathLike, dataset: str = "train", version: str | int | None = None
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Load the features of one dataset from a snapshot directory.

    Args:
        dirpath: snapshot directory (the ``dirpath`` of ``FeatureSnapshot``).
        dataset: dataset name (``"train"`` or a name given in ``FeatureSnapshot(datasets=...)``).
        version: see :func:`resolve_version` (default: the latest).

    Returns:
        ``(features [N, D] float32, indices [N] int64, manifest entry)``; rows are sorted by dataset index.

    Raises:
        SnapshotNotFoundError: if the directory, manifest, version, dataset or file is missing.
        SnapshotError: if the file is corrupted or lacks the ``features``/``indices`` tensors.
    """
    entry = resolve_version(dirpath, "features", version)
    datasets = entry.get("datasets", {})
    if dataset not in datasets:
        raise SnapshotNotFoundError(
            f"dataset: {dataset!r} not in features version {entry['version']!r} of {dirpath}; "
            f"available: {sorted(datasets)}"
        )
    path = Path(dirpath) / datasets[dataset]["file"]
    tensors = load_tensors(path)
    missing = {"features", "indices"} - set(tensors)
    if missing:
        raise SnapshotError(f"feature file {path} lacks tensors {sorted(missing)} (holds {sorted(tensors)})")
    features, indices = tensors["features"], tensors["indices"]
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
        which: ``"latest"``, ``"all"`` (ordered by global step), a version name, a position (``0`` first,
            ``-1`` last) or a sequence of names/positions, e.g. for TracIn-style sums over checkpoints.

    Returns:
        A list of ``(weights, manifest entry)``; weights map parameter names to CPU tensors.

    Raises:
        SnapshotNotFoundError: if the directory, manifest or a version is missing.
        SnapshotError: if a weights file is corrupted.

    Example::

        >>> for weights, entry in load_checkpoint("runs/fastif_snapshot", "all"):  # doctest: +SKIP
        ...     apply_checkpoint(model, weights)
    """
    if which == "all":
        entries = snapshot_versions(dirpath, "checkpoints")
        if not entries:
            raise SnapshotNotFoundError(f"no checkpoints snapshot in {dirpath} (its manifest lists no version)")
    elif isinstance(which, (list, tuple)):
        entries = [resolve_version(dirpath, "checkpoints", w) for w in which]
    else:
        entries = [resolve_version(dirpath, "checkpoints", which)]  # type: ignore[arg-type]
    return [(load_tensors(Path(dirpath) / e["file"]), e) for e in entries]


def apply_checkpoint(model: nn.Module, weights: Mapping[str, Tensor]) -> nn.Module:
    """Copy ``weights`` (a full or partial state dict) into ``model`` in place, keeping its devices and dtypes.

    Parameters and buffers absent from ``weights`` are left unchanged (a snapshot of selected parameters).

    Returns:
        ``model``.

    Raises:
        KeyError: if ``weights`` names a tensor the model does not have (the message lists a few it has).
        RuntimeError: if a shape does not match.

    Example::

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
