"""Which weights influence is computed with: the live model's, or ``CheckpointSnapshot`` versions swapped in turn.

With several checkpoints the scores of the versions are summed (TracIn-style); each version's weights are loaded into
the model for its share, and the live weights come back afterwards, also when the computation fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_fastif.errors import ArgumentError
from lightning_fastif.io.snapshot_store import apply_checkpoint, load_checkpoint

__all__ = ["CheckpointWeights"]

CheckpointSpec = str | int | Sequence[str | int] | None


class CheckpointWeights:
    """The checkpoint versions of a snapshot, loaded and checked against the model once.

    Args:
        model: the model the weights are loaded into.
        snapshot: the snapshot directory of a ``CheckpointSnapshot`` (required unless ``which`` is ``None``).
        which: ``None`` (the live weights), ``"latest"``, ``"all"``, a version name or position, or a list of those.

    Raises:
        ArgumentError: ``which`` is malformed, names a version twice, or needs a snapshot that was not given, or a
            version holds weights the model does not have.
        SnapshotNotFoundError: the snapshot holds no such checkpoint.

    Example::

        >>> live = CheckpointWeights(nn.Linear(2, 1), None, None)
        >>> [version for version, _ in live.states()]
        ['live']
    """

    def __init__(self, model: nn.Module, snapshot: str | None, which: CheckpointSpec) -> None:
        self.model = model
        self.versions: list[tuple[str, dict[str, Tensor]]] = self._load(snapshot, which)

    def _load(self, snapshot: str | None, which: Any) -> list[tuple[str, dict[str, Tensor]]]:
        if which is None:
            return []
        accepted = "None, 'latest', 'all', a version name or position, or a list of those"
        items = list(which) if isinstance(which, (list, tuple)) else [which]
        if not items or not all(isinstance(w, (str, int)) and not isinstance(w, bool) for w in items):
            raise ArgumentError(f"checkpoints: expected {accepted}, got {which!r}")
        if snapshot is None:
            raise ArgumentError(
                f"checkpoints: {which!r} needs the snapshot directory of a CheckpointSnapshot; pass snapshot=<dirpath>"
            )
        loaded = load_checkpoint(snapshot, which if not isinstance(which, tuple) else list(which))
        known = set(self.model.state_dict())
        out = []
        for weights, entry in loaded:
            unknown = sorted(set(weights) - known)
            if unknown:
                raise ArgumentError(
                    f"checkpoints: version {entry['version']!r} holds {unknown[:5]}, which "
                    f"{type(self.model).__name__} does not have; was the snapshot taken from another model? (its state "
                    f"has {sorted(known)[:5]} ...)"
                )
            out.append((str(entry["version"]), weights))
        names = [v for v, _ in out]
        if len(set(names)) != len(names):
            raise ArgumentError(f"checkpoints: expected each version once (each is summed once), got {names}")
        return out

    @property
    def names(self) -> list[str]:
        """The version names, in the order their scores are summed (empty for the live weights)."""
        return [v for v, _ in self.versions]

    def states(self) -> list[tuple[str, dict[str, Tensor] | None]]:
        """``(version, weights)`` to compute with in turn; ``[("live", None)]`` without checkpoints."""
        return list(self.versions) if self.versions else [("live", None)]

    def apply(self, version: str) -> None:
        """Load the weights of ``version`` into the model."""
        apply_checkpoint(self.model, dict(self.versions)[version])

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Inside, versions may be loaded in turn; the live weights they touch come back on exit."""
        if not self.versions:
            yield
            return
        touched = set().union(*(set(w) for _, w in self.versions))
        state = self.model.state_dict()
        saved = {k: state[k].detach().clone() for k in touched}
        try:
            yield
        finally:
            apply_checkpoint(self.model, saved)
