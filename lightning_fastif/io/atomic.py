"""Files on disk that never appear half-written: atomic writes, safetensors tensors and JSON manifests.

Everything here is written to a temporary name in the destination directory and then renamed with
``os.replace``, so a reader sees either the old file or the new one, never half a file, and a crash loses at
most the file being written. Tensors are stored as safetensors (never pickle), so loading a file cannot run
code. A manifest is one JSON object, ``<dir>/manifest.json``; the files it names are plain file names inside a
directory of its own (:func:`manifest_member`), so a manifest cannot point a reader elsewhere on the disk.

The snapshot directory layout lives in :mod:`lightning_fastif.io.snapshot_store`. This module imports no Lightning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_fastif.errors import SnapshotError, SnapshotNotFoundError

MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside a snapshot (or results) directory."""

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


def is_plain_name(value: Any) -> bool:
    """True when ``value`` is a file name with no directory part: not absolute, no ``/`` or ``\\``, not ``..``.

    Example::

        >>> [is_plain_name(v) for v in ("a.safetensors", "../a", "/tmp/a", "sub/a", "..", "")]
        [True, False, False, False, False, False]
    """
    if not isinstance(value, str) or value in ("", ".", "..") or "\x00" in value:
        return False
    # Both path flavours: a manifest written on one system may be read on the other.
    return PurePosixPath(value).name == value and PureWindowsPath(value).name == value


def manifest_member(dirpath: PathLike, field: str, value: Any, *, inside: PathLike | None = None) -> Path:
    """The file a manifest field names: ``<inside>/<value>``, where ``value`` must be a plain file name.

    Manifests are data read from disk; a hostile or corrupted one could name ``../other_run/x.safetensors`` or an
    absolute path. Only a plain name inside the manifest's own directory (or the subdirectory ``inside`` the
    layout assigns to that field) is accepted.

    Args:
        dirpath: the directory holding the manifest (named in the error).
        field: where in the manifest the value sits, e.g. ``"file"`` or ``"features.versions['v'].datasets"``.
        value: the name read from the manifest.
        inside: the directory the name must be in (default ``dirpath``).

    Returns:
        ``Path(inside) / value``.

    Raises:
        SnapshotError: if ``value`` is not a plain file name; the message names the manifest and the field.

    Example::

        >>> manifest_member("run", "file", "result.safetensors").as_posix()
        'run/result.safetensors'
        >>> manifest_member("run", "file", "../other/result.safetensors")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_fastif.errors.SnapshotError: manifest run/manifest.json: field 'file' must be a plain file name ...
    """
    if not is_plain_name(value):
        folder = Path(inside if inside is not None else dirpath)
        raise SnapshotError(
            f"manifest {manifest_path(dirpath)}: field {field!r} must be a plain file name inside {folder}, got "
            f"{value!r} (a path elsewhere, a subdirectory or an absolute path is refused)"
        )
    return Path(inside if inside is not None else dirpath) / value


# ---------------------------------------------------------------------------------------------------------------------
# Streamed safetensors files and memory-mapped reading
# ---------------------------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.float64: ("F64", "<f8"),
    torch.float32: ("F32", "<f4"),
    torch.float16: ("F16", "<f2"),
    torch.int64: ("I64", "<i8"),
    torch.int32: ("I32", "<i4"),
    torch.int16: ("I16", "<i2"),
    torch.int8: ("I8", "i1"),
    torch.uint8: ("U8", "u1"),
    torch.bool: ("BOOL", "?"),
}
_NUMPY_OF_SAFETENSORS = dict(_SAFETENSORS_DTYPES.values())


class TensorFileWriter:
    """Write a safetensors file piece by piece, atomically: the whole set never has to be in memory at once.

    The shapes and dtypes are declared up front, so the header (and every tensor's place in the file) is known
    before any data; :meth:`write` then puts rows of one tensor at their position as they come (in any order, each
    row once). The file is a temporary one next to ``path`` until the ``with`` block ends with every row of every
    tensor written: it is then flushed to disk and renamed onto ``path``. An exception inside the block (or rows left
    unwritten) removes the temporary file and leaves ``path`` as it was. The result reads with ``safetensors`` like
    any other file, and :func:`map_tensors` maps it without copying.

    Args:
        path: destination file (its directory is created when missing).
        tensors: name -> ``(dtype, shape)``, in the order they lie in the file; dtypes of fixed width with a numpy
            equivalent (float16/32/64, int8-64, uint8, bool).
        metadata: optional str -> str pairs stored in the header.

    Raises:
        TypeError: a dtype without a safetensors/numpy equivalent, or metadata that is not str -> str.
        ValueError: (at the end of the block, or from :meth:`write`) rows written twice, outside the declared
            shape, of the wrong dtype or trailing shape, or rows left unwritten.

    Example::

        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> with TensorFileWriter(p, {"x": (torch.float32, (4, 2))}) as writer:
        ...     writer.write("x", torch.ones(2, 2), row=2)
        ...     writer.write("x", torch.zeros(2, 2), row=0)
        >>> load_tensors(p)["x"][:, 0].tolist()
        [0.0, 0.0, 1.0, 1.0]
    """

    def __init__(
        self,
        path: PathLike,
        tensors: Mapping[str, tuple[torch.dtype, tuple[int, ...] | list[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        meta = dict(metadata or {})
        if any(not isinstance(k, str) or not isinstance(v, str) for k, v in meta.items()):
            raise TypeError(f"metadata: keys and values must be str (safetensors header), got {meta!r}")
        self.path = Path(path)
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        header: dict[str, Any] = {"__metadata__": meta} if meta else {}
        offset = 0
        for name, (dtype, shape) in tensors.items():
            if dtype not in _SAFETENSORS_DTYPES:
                raise TypeError(f"tensors[{name!r}]: dtype {dtype} has no fixed-width safetensors/numpy equivalent")
            shape = tuple(int(s) for s in shape)
            row_bytes = math.prod(shape[1:]) * torch.empty(0, dtype=dtype).element_size()
            size = (shape[0] if shape else 1) * row_bytes
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype][0],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._layout[name] = (dtype, shape, offset, row_bytes)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # as safetensors pads it: the data starts 8-byte aligned
        self._header = len(raw).to_bytes(8, "little") + raw
        self._data_bytes = offset
        self._written = {
            name: torch.zeros(shape[0] if shape else 1, dtype=torch.bool)
            for name, (_, shape, _, _) in self._layout.items()
        }
        self._file: Any = None
        self._context: Any = None

    def __enter__(self) -> TensorFileWriter:
        self._context = atomic_path(self.path)
        tmp = self._context.__enter__()
        self._file = open(tmp, "wb")  # noqa: SIM115 - closed in __exit__, before the rename
        self._file.write(self._header)
        self._file.truncate(len(self._header) + self._data_bytes)  # sparse until written
        return self

    def write(self, name: str, rows: Tensor, row: int = 0) -> None:
        """Write ``rows`` (``[r, *shape[1:]]``) of tensor ``name`` from row ``row`` on.

        Raises:
            ValueError: unknown name, wrong dtype/trailing shape, rows outside the tensor or already written.
        """
        if self._file is None:
            raise ValueError("TensorFileWriter.write: use it inside its with block")
        if name not in self._layout:
            raise ValueError(f"name: expected one of {sorted(self._layout)}, got {name!r}")
        dtype, shape, start, row_bytes = self._layout[name]
        rows = rows.detach().cpu()
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:]:
            raise ValueError(
                f"rows: expected {dtype} rows of shape {shape[1:]} for {name!r}, got {rows.dtype} {tuple(rows.shape)}"
            )
        count = int(rows.shape[0])
        written = self._written[name]
        if row < 0 or row + count > written.numel():
            raise ValueError(f"row: rows {row}..{row + count - 1} are outside {name!r}'s {written.numel()} rows")
        if bool(written[row : row + count].any()):
            raise ValueError(f"row: some of the rows {row}..{row + count - 1} of {name!r} were written already")
        self._file.seek(len(self._header) + start + row * row_bytes)
        # A view of the tensor's own memory: nothing is copied on the way to the file.
        self._file.write(memoryview(rows.contiguous().numpy()).cast("B"))
        written[row : row + count] = True

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        context, self._context = self._context, None
        file, self._file = self._file, None
        file.close()
        if exc_type is None:
            missing = {name: int((~w).sum()) for name, w in self._written.items() if not bool(w.all())}
            if missing:
                err = ValueError(f"TensorFileWriter: rows left unwritten in {self.path.name}: {missing}")
                context.__exit__(ValueError, err, None)
                raise err
        context.__exit__(exc_type, exc, tb)


def map_tensors(path: PathLike) -> dict[str, Tensor]:
    """The tensors of a safetensors file, memory-mapped: reading costs no copy, pages load as they are touched.

    Each tensor is a copy-on-write map of its bytes in the file (``numpy.memmap(mode="c")``): writing to it changes
    this process's pages, never the file. Dtypes without a numpy equivalent (bfloat16) are read with
    :func:`load_tensors` instead.

    Raises:
        SnapshotNotFoundError: if the file does not exist.
        SnapshotError: if it is not a readable safetensors file.

    Example::

        >>> import tempfile
        >>> p = save_tensors(Path(tempfile.mkdtemp()) / "t.safetensors", {"a": torch.arange(3.0)})
        >>> map_tensors(p)["a"].tolist()
        [0.0, 1.0, 2.0]
    """
    import numpy as np

    path = Path(path)
    _require_file(path, "tensor file")
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        size = path.stat().st_size
        out: dict[str, Tensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _NUMPY_OF_SAFETENSORS:
                return load_tensors(path)
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if 8 + length + end > size:
                raise ValueError(f"tensor {name!r} ends past the end of the file")
            if begin == end:
                out[name] = torch.from_numpy(np.zeros(shape, dtype=_NUMPY_OF_SAFETENSORS[info["dtype"]]))
                continue
            array = np.memmap(
                path, dtype=_NUMPY_OF_SAFETENSORS[info["dtype"]], mode="c", offset=8 + length + begin, shape=shape
            )
            out[name] = torch.from_numpy(array)
        return out
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SnapshotError(f"tensor file is corrupted or not a safetensors file: {path} ({err})") from err
