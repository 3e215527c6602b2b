"""The fitted K-FAC / EK-FAC factors: products with the curvature and its damped inverse, and their files.

A :class:`KFACFactors` holds, per factored layer, ``A``, ``S``, their eigendecompositions and (after
:func:`~lightning_fastif.core.curvature.ekfac_correct`) the EK-FAC eigenvalues, plus the diagonal fallback of the
unsupported parameters; :mod:`lightning_fastif.core.curvature` says what they are and fits them. Stored as
``factors.safetensors`` (tensors, never pickle) and ``manifest.json`` (names, shapes, layer specs) in one directory.
This module imports no Lightning.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_fastif.core.curvature_layers import LayerSpec, compute_dtype
from lightning_fastif.errors import ArgumentError, SnapshotError, SnapshotNotFoundError, check_number, check_path

FORMAT = "lightning_fastif.kfac"
MANIFEST = "manifest.json"
TENSORS = "factors.safetensors"


@dataclass
class KFACLayer:
    """One layer's factors and their eigendecompositions (``a_basis`` is ``None`` where ``A`` is diagonal)."""

    spec: LayerSpec
    A: Tensor
    S: Tensor
    a_values: Tensor
    a_basis: Tensor | None
    s_values: Tensor
    s_basis: Tensor
    num_positions: int
    corrected: Tensor | None = None

    def eigenvalues(self) -> Tensor:
        """``[rows, cols]``: the EK-FAC eigenvalues when corrected, else K-FAC's ``s_j · a_k``."""
        return self.corrected if self.corrected is not None else torch.outer(self.s_values, self.a_values)

    def rotate(self, m: Tensor) -> Tensor:
        """``Q_Sᵀ m Q_A`` for matrices ``m [..., rows, cols]``."""
        out = self.s_basis.T.to(m) @ m
        return out if self.a_basis is None else out @ self.a_basis.to(m)

    def unrotate(self, m: Tensor) -> Tensor:
        """``Q_S m Q_Aᵀ``, the inverse of :meth:`rotate`."""
        out = self.s_basis.to(m) @ m
        return out if self.a_basis is None else out @ self.a_basis.T.to(m)


class KFACFactors:
    """K-FAC/EK-FAC factors of the empirical Fisher over a parameter selection, and products with it.

    Made by :func:`fit_kfac` (and :func:`ekfac_correct`), or :meth:`load`. Flat vectors ``[V, P]`` are in the
    parameter order of the selection (:func:`~lightning_fastif.core.params.flatten`).

    Attributes:
        names: the selected parameter names, in order; ``shapes`` their shapes.
        layers: the factored layers (:class:`KFACLayer`).
        unsupported: ``{parameter name: reason}`` for the parameters on the diagonal fallback.
        diagonal: ``{parameter name: (1/N) Σ_i g_i²}`` (flat) for those parameters.
        num_examples: ``N``, the training examples the factors were fitted on.

    Example::

        >>> from torch import nn
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_fastif.core.curvature import fit_kfac
        >>> net = nn.Linear(3, 2).double()
        >>> data = TensorDataset(torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64))
        >>> mse = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(-1)
        >>> factors = fit_kfac(net, mse, data)
        >>> factors.inverse_apply(torch.ones(1, 8, dtype=torch.float64), damping=0.1).shape
        torch.Size([1, 8])
    """

    def __init__(
        self,
        names: list[str],
        shapes: list[tuple[int, ...]],
        layers: list[KFACLayer],
        diagonal: dict[str, Tensor],
        unsupported: dict[str, str],
        num_examples: int,
    ) -> None:
        self.names, self.shapes = list(names), [tuple(s) for s in shapes]
        self.layers, self.diagonal, self.unsupported = layers, diagonal, dict(unsupported)
        self.num_examples = int(num_examples)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, shape in zip(self.names, self.shapes):
            size = int(torch.Size(shape).numel())
            self.offsets[name] = (start, size)
            start += size
        self.num_params = start

    @property
    def corrected(self) -> bool:
        """Whether every layer carries EK-FAC eigenvalues (else products use K-FAC's)."""
        return all(layer.corrected is not None for layer in self.layers)

    @property
    def device(self) -> torch.device:
        tensors = [layer.S for layer in self.layers] + list(self.diagonal.values())
        return tensors[0].device if tensors else torch.device("cpu")

    def __repr__(self) -> str:
        return (
            f"KFACFactors(layers={[layer.spec.name for layer in self.layers]}, params={self.num_params}, "
            f"unsupported={list(self.unsupported)}, corrected={self.corrected}, examples={self.num_examples})"
        )

    def check_selection(self, names: list[str], shapes: list[tuple[int, ...]], argument: str = "factors") -> None:
        """Raise :class:`ArgumentError` unless the factors were fitted over exactly these parameters."""
        if list(names) != self.names or [tuple(s) for s in shapes] != self.shapes:
            raise ArgumentError(
                f"{argument}: expected factors fitted over the selected parameters {_short(names)}, got factors over "
                f"{_short(self.names)} (shapes must match too)"
            )

    # -- products ---------------------------------------------------------------------------------------------------
    def apply(self, vectors: Tensor) -> Tensor:
        """``G v`` for each row of ``vectors`` ``[V, P]`` (or one ``[P]``): the factored curvature itself."""
        return self._blockwise(vectors, lambda r, ev: r * ev.to(r))

    def inverse_apply(self, vectors: Tensor, damping: float) -> Tensor:
        """``(G + λI)⁻¹ v`` for each row of ``vectors`` ``[V, P]`` (or one ``[P]``), ``λ = damping > 0``.

        Raises:
            ArgumentError: ``damping`` is not a finite number > 0, or ``vectors`` do not have ``P`` columns.
        """
        lam = check_number("damping", damping, low=0, low_open=True)
        return self._blockwise(vectors, lambda r, ev: r / (ev.to(r) + lam))

    def inverse_sqrt_apply(self, vectors: Tensor, damping: float) -> Tensor:
        """``(G + λI)^{-1/2} v`` for each row of ``vectors``: the symmetric square root of :meth:`inverse_apply`
        (applying it twice is :meth:`inverse_apply`), for preconditioning a symmetric iteration on both sides.

        Raises:
            ArgumentError: ``damping`` is not a finite number > 0, or ``vectors`` do not have ``P`` columns.
        """
        lam = check_number("damping", damping, low=0, low_open=True)
        return self._blockwise(vectors, lambda r, ev: r * (ev.to(r) + lam).rsqrt())

    def _blockwise(self, vectors: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        if not isinstance(vectors, Tensor) or vectors.dim() not in (1, 2) or vectors.shape[-1] != self.num_params:
            shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
            raise ArgumentError(
                f"vectors: expected a tensor [V, {self.num_params}] or [{self.num_params}], got {shape}"
            )
        squeeze = vectors.dim() == 1
        v = vectors.unsqueeze(0) if squeeze else vectors
        dtype = compute_dtype(v.dtype)
        out = torch.empty_like(v)
        for layer in self.layers:
            m = layer.spec.matrices(v, self.offsets).to(dtype)
            rotated = fn(layer.rotate(m), layer.eigenvalues())
            layer.spec.scatter(layer.unrotate(rotated).to(v.dtype), out, self.offsets)
        for name, diag in self.diagonal.items():
            start, size = self.offsets[name]
            out[:, start : start + size] = fn(v[:, start : start + size].to(dtype), diag).to(v.dtype)
        return out[0] if squeeze else out

    def to(self, device: torch.device | str) -> KFACFactors:
        """A copy with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        layers = [
            KFACLayer(
                layer.spec,
                *(move(getattr(layer, k)) for k in ("A", "S", "a_values", "a_basis", "s_values", "s_basis")),
                num_positions=layer.num_positions,
                corrected=move(layer.corrected),
            )
            for layer in self.layers
        ]
        diagonal = {n: d.to(device) for n, d in self.diagonal.items()}
        return KFACFactors(self.names, self.shapes, layers, diagonal, self.unsupported, self.num_examples)

    # -- storage ----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the factors to the directory ``path``: ``factors.safetensors`` and ``manifest.json``.

        Each file is written to a temporary name and renamed (``os.replace``), the manifest last, so a reader sees a
        complete set or the previous one.

        Returns:
            The directory.
        """
        directory = Path(check_path("path", path))
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            for key in ("A", "S", "a_values", "a_basis", "s_values", "s_basis", "corrected"):
                value = getattr(layer, key)
                if value is not None:
                    tensors[f"layers.{i}.{key}"] = value.detach().cpu().contiguous().clone()
        for name, diag in self.diagonal.items():
            tensors[f"diagonal.{name}"] = diag.detach().cpu().contiguous().clone()
        manifest = {
            "format": FORMAT,
            "version": 1,
            "names": self.names,
            "shapes": [list(s) for s in self.shapes],
            "num_examples": self.num_examples,
            "unsupported": self.unsupported,
            "layers": [{**layer.spec.as_dict(), "num_positions": layer.num_positions} for layer in self.layers],
        }
        _atomic_write(directory / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
        _atomic_write(directory / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> KFACFactors:
        """Read factors written by :meth:`save` (onto ``device``, default CPU).

        Raises:
            SnapshotNotFoundError: the directory or one of its files is missing.
            SnapshotError: a file is unreadable or not K-FAC factors.
        """
        directory = Path(check_path("path", path))
        for file in (directory / MANIFEST, directory / TENSORS):
            if not file.is_file():
                raise SnapshotNotFoundError(f"K-FAC factors: missing file {file}")
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
            tensors = load_file(str(directory / TENSORS), device=str(device or "cpu"))
        except (json.JSONDecodeError, SafetensorError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"K-FAC factors: unreadable files in {directory} ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise SnapshotError(f"K-FAC factors: {directory / MANIFEST} is not a {FORMAT} manifest")
        try:
            layers = []
            for i, entry in enumerate(manifest["layers"]):
                entry = dict(entry)
                positions = entry.pop("num_positions")
                t = {k: tensors.get(f"layers.{i}.{k}") for k in ("A", "S", "a_values", "a_basis", "s_values")}
                layers.append(
                    KFACLayer(
                        LayerSpec.from_dict(entry),
                        *t.values(),
                        s_basis=tensors[f"layers.{i}.s_basis"],
                        num_positions=positions,
                        corrected=tensors.get(f"layers.{i}.corrected"),
                    )
                )
            diagonal = {n: tensors[f"diagonal.{n}"] for n in manifest["unsupported"]}
            shapes = [tuple(s) for s in manifest["shapes"]]
            return cls(manifest["names"], shapes, layers, diagonal, manifest["unsupported"], manifest["num_examples"])
        except (KeyError, TypeError) as exc:
            raise SnapshotError(f"K-FAC factors: {directory} is incomplete (missing {exc})") from exc


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    # A local atomic write: core sits below io, so io.atomic's helpers cannot be imported here.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return "[" + shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") + "]"
