"""Influence results people can read: per test point, its candidate training points and their scores.

**Positive = helpful**: a training point with a positive score lowered the test point's loss (removing it from the
``n`` training points would raise that loss by about ``score / n``).

* :class:`BatchInfluence` is what ``InfluenceModule.score_batch`` returns for one batch of test points:
  ``candidates [T, K]`` (dataset indices), ``scores [T, K]`` and the diagnostics of the computation.
* :class:`InfluenceResult` holds a whole run, sorted by test index: ``test_indices [T]``, ``candidate_indices [T, K]``
  and ``scores [T, K]``, with :meth:`~InfluenceResult.top_helpful` / :meth:`~InfluenceResult.top_harmful`, a long
  table (:meth:`~InfluenceResult.to_pandas`) and a ``manifest`` (settings, time per stage, inverse-HVP diagnostics
  per test batch). It is saved as ``result.safetensors`` plus ``manifest.json`` (safetensors and JSON only, so
  loading a result never runs pickled code)::

      <dir>/manifest.json          {"format": "lightning_fastif.influence", "settings": {...}, "timings": {...}, ...}
      <dir>/result.safetensors     "test_indices" [T] int64, "candidate_indices" [T, K] int64, "scores" [T, K]
                                   (+ "original_test_indices" [T], "original_candidate_indices" [T, K], see below)

**Index spaces.** ``test_indices`` and ``candidate_indices`` are positions in the datasets handed to the library
(the predict loader's dataset and ``train_dataset``), as always. When either is a ``torch.utils.data.Subset``
(nested ones included) the result also holds ``original_test_indices`` / ``original_candidate_indices``: the same
points as indices into the dataset at the bottom of the Subset chain, the indices you know. The manifest's
``index_space`` names the space of each array (``"given"`` or ``"original"``) and the chain
(:func:`original_index_map` maps positions to original indices). Without a Subset the original indices are the
given ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_fastif.errors import SnapshotError
from lightning_fastif.io.atomic import (
    PathLike,
    load_tensors,
    manifest_member,
    manifest_path,
    read_manifest,
    save_tensors,
    write_manifest,
)

RESULT_FORMAT = "lightning_fastif.influence"
RESULT_FORMAT_VERSION = 1
RESULT_FILE = "result.safetensors"

__all__ = ["BatchInfluence", "InfluenceResult", "Ranked", "jsonable", "original_index_map"]


class Ranked(NamedTuple):
    """Training points ranked for one test point: dataset ``indices [n]`` and their ``scores [n]``."""

    indices: Tensor
    scores: Tensor


def jsonable(value: Any) -> Any:
    """Convert ``value`` to plain JSON types (tensors and numpy scalars to numbers/lists, NaN/inf to str).

    Example::

        >>> jsonable({"a": torch.tensor(1.5), "b": (1, float("nan"))})
        {'a': 1.5, 'b': [1, 'nan']}
    """
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        return jsonable(value.item() if value.dim() == 0 else value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def original_index_map(dataset: Any) -> tuple[Tensor, list[str]] | None:
    """For a (nested) ``torch.utils.data.Subset``: position ``i`` of ``dataset`` -> index into the innermost dataset.

    Args:
        dataset: any dataset; only ``torch.utils.data.Subset`` layers are unwrapped.

    Returns:
        ``(map [len(dataset)] int64, chain)`` where ``chain`` names each layer's class from the outside in (the
        last is the dataset the indices point into); None when ``dataset`` is not a Subset.

    Example::

        >>> from torch.utils.data import Subset, TensorDataset
        >>> base = TensorDataset(torch.arange(10))
        >>> index_map, chain = original_index_map(Subset(Subset(base, [9, 7, 5, 3]), [3, 0]))
        >>> index_map.tolist(), chain
        ([3, 9], ['Subset', 'Subset', 'TensorDataset'])
    """
    from torch.utils.data import Subset

    if not isinstance(dataset, Subset):
        return None
    index_map: Tensor | None = None
    chain = []
    while isinstance(dataset, Subset):
        chain.append(type(dataset).__name__)
        layer = torch.as_tensor(list(dataset.indices), dtype=torch.long).reshape(-1)
        index_map = layer if index_map is None else layer[index_map]
        dataset = dataset.dataset
    chain.append(type(dataset).__name__)
    assert index_map is not None
    return index_map, chain


def _rank(candidates: Tensor, scores: Tensor, n: int | None, helpful: bool) -> Ranked:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ValueError(f"n: expected a positive integer or None (all candidates), got {n!r}")
    # A stable sort keeps ties in candidate order (nearest kNN neighbour first), so rankings are reproducible.
    order = torch.sort(scores, descending=helpful, stable=True).indices
    if n is not None:
        order = order[:n]
    return Ranked(candidates[order], scores[order])


@dataclass
class BatchInfluence:
    """Influence of candidate training points on the test points of one batch. **Positive = helpful.**

    Attributes:
        candidates: ``[T, K]`` int64 dataset indices of the candidates of each test point (kNN order, nearest
            first; ``0..N-1`` when every training point is a candidate). With a candidate pool they index the pool.
        scores: ``[T, K]`` influence of each candidate on each test point.
        diagnostics: timings per stage (``seconds``), inverse-HVP diagnostics (``ihvp``) and what was computed.
        test_indices: ``[T]`` dataset indices of the test points when known (``None`` for an ad-hoc batch;
            ``[-1]`` for a combined anchor batch).

    Example::

        >>> b = BatchInfluence(torch.tensor([[4, 7, 9]]), torch.tensor([[0.5, -2.0, 1.0]]))
        >>> b.top_helpful(0, 2).indices.tolist(), b.top_harmful(0, 1).indices.tolist()
        ([9, 4], [7])
    """

    candidates: Tensor
    scores: Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
    test_indices: Tensor | None = None

    def __post_init__(self) -> None:
        if self.candidates.shape != self.scores.shape or self.candidates.dim() != 2:
            raise ValueError(
                f"candidates, scores: expected two [T, K] tensors of the same shape, got "
                f"{tuple(self.candidates.shape)} and {tuple(self.scores.shape)}"
            )

    def top_helpful(self, t: int = 0, n: int | None = 10) -> Ranked:
        """The ``n`` highest-scoring candidates of row ``t`` (most helpful first)."""
        return _rank(self.candidates[t], self.scores[t], n, helpful=True)

    def top_harmful(self, t: int = 0, n: int | None = 10) -> Ranked:
        """The ``n`` lowest-scoring candidates of row ``t`` (most harmful first)."""
        return _rank(self.candidates[t], self.scores[t], n, helpful=False)


class InfluenceResult:
    """The influence of candidate training points on a set of test points. **Positive = helpful.**

    Rows are sorted by test index; a test index may appear only once, and a candidate only once per row.

    Args:
        test_indices: ``[T]`` dataset indices of the test points.
        candidate_indices: ``[T, K]`` dataset indices of each test point's candidates (kNN order).
        scores: ``[T, K]`` scores aligned with ``candidate_indices``.
        manifest: settings, timings and diagnostics (JSON-serialisable; converted with :func:`jsonable`).
        original_test_indices: ``[T]`` the test points' indices in the dataset under the test Subset chain (None:
            the given ones; see the module's *Index spaces*).
        original_candidate_indices: ``[T, K]`` the candidates' indices in the dataset under the train Subset chain.

    Raises:
        ValueError: inconsistent shapes, a test index that appears twice, or a candidate twice in one row.

    Example::

        >>> r = InfluenceResult(torch.tensor([3, 1]), torch.tensor([[0, 2], [1, 0]]), torch.tensor([[1.0, -1.0],
        ...     [0.2, 0.3]]))
        >>> r.test_indices.tolist(), r.top_helpful(3, 1).indices.tolist()
        ([1, 3], [0])
        >>> r.to_pandas().columns.tolist()
        ['test_index', 'rank', 'train_index', 'score']
        >>> r.original_test_indices.tolist()  # no Subset: the given indices
        [1, 3]
    """

    def __init__(
        self,
        test_indices: Tensor,
        candidate_indices: Tensor,
        scores: Tensor,
        manifest: Mapping[str, Any] | None = None,
        *,
        original_test_indices: Tensor | None = None,
        original_candidate_indices: Tensor | None = None,
    ) -> None:
        test_indices = torch.as_tensor(test_indices).detach().cpu().long().reshape(-1)
        candidate_indices = torch.as_tensor(candidate_indices).detach().cpu().long()
        scores = torch.as_tensor(scores).detach().cpu()
        if candidate_indices.dim() != 2 or scores.shape != candidate_indices.shape:
            raise ValueError(
                f"candidate_indices, scores: expected two [T, K] tensors of the same shape, got "
                f"{tuple(candidate_indices.shape)} and {tuple(scores.shape)}"
            )
        if candidate_indices.shape[0] != test_indices.numel():
            raise ValueError(
                f"test_indices: {test_indices.numel()} test points, but candidate_indices has "
                f"{candidate_indices.shape[0]} rows"
            )
        if original_test_indices is not None:
            original_test_indices = torch.as_tensor(original_test_indices).detach().cpu().long().reshape(-1)
            if original_test_indices.shape != test_indices.shape:
                raise ValueError(
                    f"original_test_indices: expected {tuple(test_indices.shape)} like test_indices, got "
                    f"{tuple(original_test_indices.shape)}"
                )
        if original_candidate_indices is not None:
            original_candidate_indices = torch.as_tensor(original_candidate_indices).detach().cpu().long()
            if original_candidate_indices.shape != candidate_indices.shape:
                raise ValueError(
                    f"original_candidate_indices: expected {tuple(candidate_indices.shape)} like candidate_indices, "
                    f"got {tuple(original_candidate_indices.shape)}"
                )
        order = torch.sort(test_indices, stable=True).indices
        test_indices, candidate_indices, scores = test_indices[order], candidate_indices[order], scores[order]
        if original_test_indices is not None:
            original_test_indices = original_test_indices[order]
        if original_candidate_indices is not None:
            original_candidate_indices = original_candidate_indices[order]
        repeated = test_indices[1:][test_indices[1:] == test_indices[:-1]]
        if repeated.numel():
            raise ValueError(
                f"test_indices: {sorted(set(repeated.tolist()))[:10]} appear more than once; every test point must "
                "be scored exactly once (duplicate shards or overlapping runs)"
            )
        if candidate_indices.shape[1] > 1:
            ranked = candidate_indices.sort(dim=1).values
            rows = ((ranked[:, 1:] == ranked[:, :-1]).any(dim=1)).nonzero().reshape(-1)
            if rows.numel():
                raise ValueError(
                    f"candidate_indices: test points {test_indices[rows][:10].tolist()} list a candidate more than "
                    "once; every (test, candidate) pair must be scored exactly once"
                )
        self.test_indices = test_indices
        self.candidate_indices = candidate_indices
        self.scores = scores
        self._original_test = original_test_indices
        self._original_candidates = original_candidate_indices
        self.manifest: dict[str, Any] = jsonable(dict(manifest or {}))
        self._rows = {int(t): i for i, t in enumerate(test_indices.tolist())}

    # ------------------------------------------------------------------------------------------ index spaces
    @property
    def original_test_indices(self) -> Tensor:
        """``[T]`` the test points' indices under the test set's Subset chain (the given ones without a Subset)."""
        return self.test_indices if self._original_test is None else self._original_test

    @property
    def original_candidate_indices(self) -> Tensor:
        """``[T, K]`` the candidates' indices under the training set's Subset chain (the given ones without one)."""
        return self.candidate_indices if self._original_candidates is None else self._original_candidates

    @property
    def has_original_indices(self) -> bool:
        """Whether the test or the training set was a Subset, so original indices differ from the given ones."""
        return self._original_test is not None or self._original_candidates is not None

    def with_original_indices(self, train_dataset: Any = None, test_dataset: Any = None) -> InfluenceResult:
        """This result with the original indices of the datasets it was computed on (see *Index spaces*).

        Args:
            train_dataset: the dataset ``candidate_indices`` index (the training set, or the candidate pool).
            test_dataset: the dataset ``test_indices`` index (the predict loader's dataset).

        Returns:
            A new result; its manifest's ``index_space`` says which array is in which space. The same result when
            neither dataset is a Subset.

        Example::

            >>> from torch.utils.data import Subset, TensorDataset
            >>> train = Subset(TensorDataset(torch.arange(10)), [8, 6, 4])
            >>> r = InfluenceResult(torch.tensor([0]), torch.tensor([[2, 0]]), torch.tensor([[1.0, 2.0]]))
            >>> r.with_original_indices(train).original_candidate_indices.tolist()
            [[4, 8]]
        """
        train_map = original_index_map(train_dataset) if train_dataset is not None else None
        test_map = original_index_map(test_dataset) if test_dataset is not None else None
        if train_map is None and test_map is None:
            return self
        space: dict[str, Any] = {"test_indices": "given", "candidate_indices": "given"}
        original_test = original_candidates = None
        if test_map is not None:
            original_test = test_map[0][self.test_indices]
            space["original_test_indices"] = "original"
            space["test_chain"] = test_map[1]
        if train_map is not None:
            original_candidates = train_map[0][self.candidate_indices]
            space["original_candidate_indices"] = "original"
            space["train_chain"] = train_map[1]
        return type(self)(
            self.test_indices,
            self.candidate_indices,
            self.scores,
            {**self.manifest, "index_space": space},
            original_test_indices=original_test,
            original_candidate_indices=original_candidates,
        )

    # ------------------------------------------------------------------------------------------------- access
    @property
    def num_test(self) -> int:
        """T, the number of test points."""
        return int(self.test_indices.numel())

    @property
    def num_candidates(self) -> int:
        """K, the number of candidates per test point."""
        return int(self.candidate_indices.shape[1])

    def __len__(self) -> int:
        return self.num_test

    def row(self, t: int) -> int:
        """The row of test point ``t`` (a test dataset index).

        Raises:
            KeyError: if ``t`` is not one of :attr:`test_indices`.
        """
        try:
            return self._rows[int(t)]
        except KeyError:
            shown = self.test_indices[:10].tolist()
            raise KeyError(
                f"t: test index {t} is not in this result ({self.num_test} test points, e.g. {shown})"
            ) from None

    def _default_n(self, n: int | None) -> int | None:
        if n is not None:
            return n
        return int(self.manifest.get("top_k") or 10)

    def top_helpful(self, t: int, n: int | None = None) -> Ranked:
        """The ``n`` candidates with the highest scores for test point ``t`` (a test dataset index), best first.

        ``n`` defaults to the run's ``top_k`` (10). When fewer than ``n`` candidates have a positive score the list
        continues with the least harmful ones.
        """
        i = self.row(t)
        return _rank(self.candidate_indices[i], self.scores[i], self._default_n(n), helpful=True)

    def top_harmful(self, t: int, n: int | None = None) -> Ranked:
        """The ``n`` candidates with the lowest (most negative) scores for test point ``t``, worst first."""
        i = self.row(t)
        return _rank(self.candidate_indices[i], self.scores[i], self._default_n(n), helpful=False)

    def to_pandas(self) -> Any:
        """A long table, one row per (test point, candidate): ``test_index, rank, train_index, score``.

        ``rank`` is 1 for the most helpful candidate of each test point (rows sorted by test index, then rank).
        ``test_index``/``train_index`` are positions in the datasets handed to the library; when one was a Subset
        (:attr:`has_original_indices`) the table adds ``original_test_index`` and ``original_train_index``, the
        indices into the dataset under the Subset chain.
        """
        import pandas as pd

        order = torch.sort(self.scores, dim=1, descending=True, stable=True).indices
        k = self.num_candidates
        columns = {
            "test_index": self.test_indices.repeat_interleave(k).numpy(),
            "rank": torch.arange(1, k + 1).repeat(self.num_test).numpy(),
            "train_index": self.candidate_indices.gather(1, order).reshape(-1).numpy(),
            "score": self.scores.gather(1, order).reshape(-1).double().numpy(),
        }
        if self.has_original_indices:
            columns["original_test_index"] = self.original_test_indices.repeat_interleave(k).numpy()
            columns["original_train_index"] = self.original_candidate_indices.gather(1, order).reshape(-1).numpy()
        return pd.DataFrame(columns)

    def __repr__(self) -> str:
        return f"InfluenceResult(num_test={self.num_test}, num_candidates={self.num_candidates})"

    def summary(self, n: int = 3, tests: int = 5) -> str:
        """A short text table: for the first ``tests`` test points, up to ``n`` helpful and ``n`` harmful candidates.

        Labelled by sign: "helpful" lists only positive scores (highest first), "harmful" only negative ones (most
        negative first); a side with no such candidate says ``none``. The indices shown are the original ones
        (:attr:`original_test_indices`, :attr:`original_candidate_indices`), and the first line says so when a
        dataset was a Subset.
        """
        train_of = dict[int, int]()
        if self._original_candidates is not None:
            pairs = zip(self.candidate_indices.reshape(-1).tolist(), self._original_candidates.reshape(-1).tolist())
            train_of = dict(pairs)
        test_of = dict(zip(self.test_indices.tolist(), self.original_test_indices.tolist(), strict=True))

        def listed(ranked: Ranked, keep: Any) -> str:
            pairs = [(i, s) for i, s in zip(ranked.indices.tolist(), ranked.scores.tolist(), strict=True) if keep(s)]
            return ", ".join(f"{train_of.get(i, i)}({s:+.3g})" for i, s in pairs[:n]) or "none"

        space = "; indices: original (under the Subset chain)" if self.has_original_indices else ""
        lines = [f"{self!r} (positive = helpful{space})"]
        for t in self.test_indices[:tests].tolist():
            good = listed(self.top_helpful(t, None), lambda s: s > 0)
            bad = listed(self.top_harmful(t, None), lambda s: s < 0)
            lines.append(f"  test {test_of[t]}: helpful {good} | harmful {bad}")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------- combine
    @classmethod
    def merge(cls, parts: Iterable[InfluenceResult], manifest: Mapping[str, Any] | None = None) -> InfluenceResult:
        """Concatenate results over disjoint test points (sorted by test index; a duplicate is an error).

        Raises:
            ValueError: no parts, different numbers of candidates, or a test index in two parts.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("parts: nothing to merge (no result)")
        widths = {p.num_candidates for p in parts}
        if len(widths) > 1:
            raise ValueError(f"parts: results with different numbers of candidates {sorted(widths)} cannot be merged")
        dtype = torch.promote_types(parts[0].scores.dtype, parts[-1].scores.dtype)
        # Original indices survive a merge only when every part has them (a part without would be in another space).
        test = [p._original_test for p in parts]
        cands = [p._original_candidates for p in parts]
        return cls(
            torch.cat([p.test_indices for p in parts]),
            torch.cat([p.candidate_indices for p in parts]),
            torch.cat([p.scores.to(dtype) for p in parts]),
            manifest if manifest is not None else parts[0].manifest,
            original_test_indices=torch.cat(test) if all(t is not None for t in test) else None,
            original_candidate_indices=torch.cat(cands) if all(c is not None for c in cands) else None,
        )

    # --------------------------------------------------------------------------------------------------- disk
    def tensors(self) -> dict[str, Tensor]:
        """The tensors as stored on disk (the three, plus the original indices a Subset gave)."""
        out = {
            "test_indices": self.test_indices,
            "candidate_indices": self.candidate_indices,
            "scores": self.scores,
        }
        if self._original_test is not None:
            out["original_test_indices"] = self._original_test
        if self._original_candidates is not None:
            out["original_candidate_indices"] = self._original_candidates
        return out

    def save(self, dirpath: PathLike) -> Path:
        """Write ``result.safetensors`` and ``manifest.json`` into ``dirpath`` (each atomically).

        The tensors are written first, so a manifest that says ``"complete"`` always has its tensors.

        Returns:
            The directory.
        """
        dirpath = Path(dirpath)
        save_tensors(dirpath / RESULT_FILE, self.tensors(), {"format": RESULT_FORMAT})
        manifest = dict(self.manifest)
        manifest.update(
            format=RESULT_FORMAT,
            format_version=RESULT_FORMAT_VERSION,
            status="complete",
            file=RESULT_FILE,
            num_test=self.num_test,
            num_candidates=self.num_candidates,
        )
        write_manifest(dirpath, manifest)
        self.manifest = manifest
        return dirpath

    @classmethod
    def load(cls, dirpath: PathLike) -> InfluenceResult:
        """Read a result written by :meth:`save` (or by an ``InfluenceModule`` run with ``output_dir``).

        Raises:
            SnapshotNotFoundError: the directory, its manifest or the tensor file is missing.
            SnapshotError: the manifest is not an influence result, the run did not complete (its shards are
                there, but not the merged result: run ``trainer.predict`` again with the same ``output_dir``), or its
                ``file`` is not a plain file name inside ``dirpath``.
        """
        manifest = read_manifest(dirpath)
        if manifest.get("format") != RESULT_FORMAT:
            raise SnapshotError(
                f"not an influence result: {manifest_path(dirpath)} has format {manifest.get('format')!r}, expected "
                f"{RESULT_FORMAT!r}"
            )
        if manifest.get("status") != "complete":
            raise SnapshotError(
                f"the influence run in {dirpath} did not complete (status {manifest.get('status')!r}); run "
                "trainer.predict again with the same output_dir to finish it (finished shards are skipped)"
            )
        path = manifest_member(dirpath, "file", manifest.get("file", RESULT_FILE))
        tensors = load_tensors(path)
        missing = {"test_indices", "candidate_indices", "scores"} - set(tensors)
        if missing:
            raise SnapshotError(f"result file {path} lacks tensors {sorted(missing)} (holds {sorted(tensors)})")
        return cls(
            tensors["test_indices"],
            tensors["candidate_indices"],
            tensors["scores"],
            manifest,
            original_test_indices=tensors.get("original_test_indices"),
            original_candidate_indices=tensors.get("original_candidate_indices"),
        )

    def equals(self, other: InfluenceResult, *, rtol: float = 0.0, atol: float = 0.0) -> bool:
        """Same test points and candidates, and scores equal within ``rtol``/``atol``."""
        return (
            torch.equal(self.test_indices, other.test_indices)
            and torch.equal(self.candidate_indices, other.candidate_indices)
            and bool(torch.allclose(self.scores, other.scores.to(self.scores.dtype), rtol=rtol, atol=atol))
        )
