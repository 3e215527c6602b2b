"""The stateless pieces of one test batch's computation in ``InfluenceModule``: stage timing and chunked scoring.

:class:`Stages` times each stage of a batch (features, kNN, test gradients, ``s_test``, scoring) and records its peak
memory, as the manifest reports them. :func:`score_columns` scores a range of candidate columns against ``s_test`` in
chunks (forward-mode JVPs, or materialised gradients where many test points share the candidates), with a progress
bar. :func:`check_loss` fails early, with the batch's structure in the message, when the loss cannot take a batch.
"""

from __future__ import annotations

import contextlib
import reprlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from lightning_utilities import apply_to_collection
from torch import Tensor

from lightning_fastif.core.batches import Batch, IndexedData
from lightning_fastif.core.grads import FunctionalLoss
from lightning_fastif.core.influence import GRADS_MIN_TEST_POINTS, score_candidates
from lightning_fastif.core.memory import measure_stage
from lightning_fastif.lightning.writer import STAGES

__all__ = ["Stages", "check_loss", "describe_batch", "score_columns"]


class Stages:
    """Seconds and peak memory per stage of one batch (``memory.measure_stage``), as the manifest records them.

    Example::

        >>> stages = Stages()
        >>> with stages("knn"):
        ...     _ = torch.zeros(10).sum()
        >>> stages.seconds["knn"] > 0, stages.memory["knn"]["calls"]
        (True, 1)
    """

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.memory: dict[str, dict[str, Any]] = {}
        self.device: torch.device | None = None
        """The device the stages compute on (CUDA peaks are measured for a CUDA device)."""

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with measure_stage(stage, self.memory, device=self.device):
                yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


class _Shape:
    """A tensor shown by its shape in a batch description."""

    def __init__(self, t: Tensor) -> None:
        self.text = f"Tensor{list(t.shape)}"

    def __repr__(self) -> str:
        return self.text


def describe_batch(batch: Batch) -> str:
    """A batch's structure with its tensors shown as their shapes (long collections cut short), for messages.

    Example::

        >>> describe_batch((torch.zeros(4, 2), torch.zeros(4)))
        '(Tensor[4, 2], Tensor[4])'
    """
    return reprlib.repr(apply_to_collection(batch, Tensor, _Shape))


def check_loss(function: FunctionalLoss, batch: Batch) -> None:
    """Evaluate the loss once on ``batch``.

    Raises:
        ValueError: the loss cannot take the batch (no labels, another structure); the message shows the batch.
    """
    try:
        function.losses(batch)
    except Exception as err:
        raise ValueError(
            f"batch: the loss function cannot take this test batch {describe_batch(batch)} "
            f"({type(err).__name__}: {err}); test batches must have the structure of the training batches, "
            "labels included (e.g. (x, y) or a dict with 'labels'), as loss_fn(model, batch) expects"
        ) from err


def score_columns(
    function: FunctionalLoss,
    data: IndexedData,
    s_test: Tensor,
    candidates: Tensor | None,
    lo: int,
    hi: int,
    *,
    chunk_size: int,
    method: str,
    progress: bool,
    gradient_chunk_size: int | None = None,
) -> Tensor:
    """Scores of candidate columns ``[lo, hi)``: ``[T, hi - lo]``.

    Args:
        function: the loss as a function of the selected parameters.
        data: the dataset the candidates index (training set or pool).
        s_test: ``[T, P]``.
        candidates: ``[T, K]`` candidate ids per test point, or ``None`` for every example of ``data`` (columns are
            then dataset indices).
        lo: the first column.
        hi: one past the last column.
        chunk_size: candidates per forward pass when scoring by JVP.
        gradient_chunk_size: candidates per pass when per-example gradients are materialised (``None``:
            ``chunk_size``); a memory budget sets it from its own plan, since a gradient costs ``P`` numbers per
            example where a JVP costs a forward pass.
        method: ``"auto"``, ``"jvp"`` or ``"grads"`` (``"auto"`` materialises gradients only when every test point
            shares the candidates and there are at least ``GRADS_MIN_TEST_POINTS`` of them).
        progress: show a progress bar.
    """
    rows = s_test.shape[0]
    bar = None
    if progress and hi > lo:
        from tqdm.auto import tqdm

        bar = tqdm(total=(hi - lo) * rows, desc="fastif: candidates", leave=False, unit="pair")
    use_grads = method == "grads" or (candidates is None and method == "auto" and rows >= GRADS_MIN_TEST_POINTS)
    step = (gradient_chunk_size or chunk_size) if use_grads else chunk_size
    parts = []
    try:
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            if candidates is None:
                chunk = data.gather(torch.arange(start, stop))
                if use_grads:
                    # One parameter's gradients at a time: no [chunk, P] matrix beside its parts.
                    parts.append(function.gradient_dots(chunk, s_test).to(s_test.dtype))
                else:
                    parts.append(function.directional_derivatives(chunk, s_test))
            else:
                parts.append(
                    score_candidates(
                        function,
                        data,
                        s_test,
                        candidates[:, start:stop],
                        batch_size=step,
                        method="grads" if use_grads else "jvp",
                    )
                )
            if bar is not None:
                bar.update((stop - start) * rows)
    finally:
        if bar is not None:
            bar.close()
    return torch.cat(parts, dim=1) if parts else s_test.new_zeros(rows, 0)
