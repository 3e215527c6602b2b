"""The kNN query preconditioner ``q = (H_last + λI)⁻¹ g``: loss-gradient queries turned into influence directions.

A ``FeatureSnapshot(features="loss_gradient")`` indexes the training points' loss gradients over one layer's
parameters and stores a curvature ``H_last`` of the mean training loss over those parameters. Searching the index by
inner product with ``q = (H_last + λI)⁻¹ g_test`` ranks training points by ``<q, g_train>``, the influence score
restricted to that layer, instead of by the raw gradient similarity ``<g_test, g_train>``. ``H_last`` is either

* **K-FAC factors** of the layer (``query_curvature="kfac"``, the default;
  :class:`~lightning_fastif.core.curvature.KFACFactors`): the layer's empirical Fisher as ``A ⊗ S``
  (``A = E[a aᵀ]`` ``(D+1)²``, ``S = E[g gᵀ]`` ``C²``), applied in its
  eigenbasis as ``Q_S ((Q_Sᵀ G Q_A) / (s aᵀ + λ)) Q_Aᵀ`` (EK-FAC's eigenvalues when corrected):
  ``O(C² + D²)`` memory, so a 1000-class head works; or
* the **dense Hessian** (``query_curvature="hessian"``, ``[P, P]``, ``P = C·(D+1)``), solved by Cholesky (LU when
  indefinite): exact, for small layers.

λ is raised to at least ``KNN_DAMPING_FLOOR · tr(H_last) / P`` (``1e-6`` of the mean eigenvalue): a last-layer Hessian
is often singular (cross-entropy's always is: adding one vector to every class's weights leaves the loss unchanged),
so ``λ = 0`` must still factorise; the floor only bounds the gain of such null directions, in which training
gradients have no component anyway. This module imports no Lightning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_fastif.core.curvature import KFACFactors
from lightning_fastif.errors import ArgumentError, SnapshotError
from lightning_fastif.io.atomic import load_tensors

__all__ = ["KNN_DAMPING_FLOOR", "Factorisation", "QueryPreconditioner"]

KNN_DAMPING_FLOOR = 1e-6
"""The preconditioner's damping is at least this times ``tr(H_last) / P``."""

HESSIAN_TENSOR = "last_layer_hessian"
"""The tensor name under which ``FeatureSnapshot`` stores ``H_last``."""


@dataclass(frozen=True)
class Factorisation:
    """``H_last + λI`` factorised in float64: ``kind="cholesky"`` (``factors = (L,)``), ``"lu"`` (``(LU, pivots)``), or
    ``"kfac"`` (``factors = ()``: K-FAC factors are inverted in their eigenbasis, nothing to factorise).

    ``requested`` is the λ asked for, ``damping`` the λ used (at least the floor).
    """

    requested: float
    damping: float
    kind: Literal["cholesky", "lu", "kfac"]
    factors: tuple[Tensor, ...]


class QueryPreconditioner:
    """``(H_last + λI)⁻¹ g`` for the rows ``g`` of a query matrix, with ``H_last`` read on first use.

    Args:
        hessian: ``H_last`` as a dense ``[P, P]`` tensor or as :class:`KFACFactors` over the layer's parameters, or the
            path ``FeatureSnapshot`` wrote it to: a safetensors file (dense) or a directory (``KFACFactors.save``),
            read on first use, so building a preconditioner costs nothing.
        layer: the layer ``H_last`` is over, named in error messages.

    Example::

        >>> h = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
        >>> [round(v, 4) for v in QueryPreconditioner(h)(torch.tensor([[2.0, 4.0]]), damping=0.0)[0].tolist()]
        [1.0, 1.0]
    """

    def __init__(self, hessian: Tensor | str | os.PathLike, *, layer: str | None = None) -> None:
        if not isinstance(hessian, (Tensor, KFACFactors, str, os.PathLike)):
            raise ArgumentError(
                f"hessian: expected a [P, P] tensor, KFACFactors or a path, got {type(hessian).__name__}"
            )
        self._source = hessian
        self.layer = layer
        self.factorisation: Factorisation | None = None
        """The last factorisation (kept until λ changes; not pickled: cheaper to refactor than to send P² floats)."""
        self._factors: KFACFactors | None = None

    @property
    def kind(self) -> Literal["hessian", "kfac"]:
        """``"kfac"`` when ``H_last`` is K-FAC factors (a directory or :class:`KFACFactors`), else ``"hessian"``."""
        source = self._source
        if isinstance(source, KFACFactors) or (not isinstance(source, Tensor) and os.path.isdir(source)):
            return "kfac"
        return "hessian"

    def _kfac(self) -> KFACFactors:
        if self._factors is None:
            source = self._source
            factors = source if isinstance(source, KFACFactors) else KFACFactors.load(source)  # type: ignore[arg-type]
            self._factors = factors.to("cpu")
        return self._factors

    def _matrix(self) -> Tensor:
        if isinstance(self._source, Tensor):
            h = self._source
        else:
            tensors = load_tensors(self._source)
            if HESSIAN_TENSOR not in tensors:
                raise SnapshotError(f"snapshot: {os.fspath(self._source)} holds no {HESSIAN_TENSOR!r} tensor")
            h = tensors[HESSIAN_TENSOR]
        if h.dim() != 2 or h.shape[0] != h.shape[1]:
            raise SnapshotError(f"snapshot: the last-layer Hessian must be a square matrix, got {list(h.shape)}")
        return h.detach().to("cpu", torch.float64)

    def factorise(self, damping: float) -> Factorisation:
        """The factorisation of ``H_last + λI`` for ``λ = max(damping, floor)``; computed once per ``damping``.

        Raises:
            ArgumentError: ``H_last + λI`` is singular (``H_last`` has the eigenvalue ``-λ``); the message names
                ``knn_damping``.
        """
        if self.factorisation is not None and self.factorisation.requested == damping:
            return self.factorisation
        if self.kind == "kfac":
            factors = self._kfac()
            # tr(H_last) / P: the mean of the eigenvalues (K-FAC's s_j a_k, or EK-FAC's) and of the diagonal fallback.
            total = sum(float(layer.eigenvalues().sum()) for layer in factors.layers)
            total += sum(float(d.sum()) for d in factors.diagonal.values())
            scale = total / max(factors.num_params, 1)
            lam = max(damping, KNN_DAMPING_FLOOR * (scale if scale > 0 else 1.0))
            self.factorisation = Factorisation(damping, lam, "kfac", ())
            return self.factorisation
        h = self._matrix()
        scale = float(h.diagonal().abs().mean())
        lam = max(damping, KNN_DAMPING_FLOOR * (scale if scale > 0 else 1.0))
        a = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            self.factorisation = Factorisation(damping, lam, "cholesky", (factor,))
            return self.factorisation
        # Not positive definite (a last layer whose Hessian is indefinite beyond λ): still (H + λI)⁻¹, by LU.
        lu, pivots, info = torch.linalg.lu_factor_ex(a)
        if int(info) != 0:
            raise ArgumentError(
                f"knn_damping: expected a λ for which H_last + λ·I is invertible (the snapshot's last-layer Hessian "
                f"has the eigenvalue -{lam:g}), got {damping!r}"
            )
        self.factorisation = Factorisation(damping, lam, "lu", (lu, pivots))
        return self.factorisation

    def __call__(self, queries: Tensor, damping: float) -> Tensor:
        """``(H_last + λI)⁻¹ g`` for each row ``g`` of ``queries`` (``[Q, P]`` or ``[P]``), as float32 on the CPU.

        Raises:
            ArgumentError: ``queries`` do not have ``P`` columns.
        """
        fact = self.factorise(damping)
        g = queries.detach().to("cpu", torch.float64)
        rows = g.unsqueeze(0) if g.dim() == 1 else g
        size = self._kfac().num_params if fact.kind == "kfac" else fact.factors[0].shape[0]
        if rows.dim() != 2 or rows.shape[1] != size:
            raise ArgumentError(
                f"queries: expected [Q, {size}] loss gradients of layer {self.layer!r}, got {list(queries.shape)}"
            )
        if fact.kind == "kfac":
            out = self._kfac().inverse_apply(rows, fact.damping)
        elif fact.kind == "cholesky":
            out = torch.cholesky_solve(rows.T, fact.factors[0]).T
        else:
            out = torch.linalg.lu_solve(fact.factors[0], fact.factors[1], rows.T).T
        return (out[0] if g.dim() == 1 else out).float()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["factorisation"] = None
        state["_factors"] = None
        return state
