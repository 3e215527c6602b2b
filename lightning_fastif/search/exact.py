"""The exact nearest-neighbour search in torch: chunked products and a running top-k, both signs in one pass.

:class:`~lightning_fastif.search.knn.KNNIndex` uses it on CPU (and on a GPU without a FAISS GPU build) over its
features as they are: a tensor (a memory-mapped snapshot file stays mapped) or
:class:`~lightning_fastif.core.factored_grads.FactoredGradients`, whose inner products are formed from the factors.
Memory stays at one ``[queries, rows]`` block plus the running top-k. This module imports no Lightning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_fastif.core.factored_grads import FactoredGradients

BLOCK_ELEMENTS = 1 << 24
"""Numbers in one distance block of the search: 64 MB of float32."""
DB_CHUNK = 1 << 16
"""Rows of the indexed set per block (and per chunk of anything done row-wise over it)."""


def exact_search(
    db: Tensor | FactoredGradients,
    q: Tensor,
    k: int,
    k_negated: int = 0,
    *,
    sq_norms: Tensor | None = None,
    inv_norms: Tensor | None = None,
    norm_order: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``k`` nearest rows of ``db`` for each query and, from the same products, the ``k_negated`` nearest of ``-q``.

    Distances: with ``sq_norms`` (the rows' squared norms) squared L2; otherwise the negated similarity
    ``-<q, x>``, scaled by ``inv_norms`` (the rows' inverse norms) when given, i.e. the cosine of normalised queries
    negated. A block of products serves both signs: the nearest of ``-q`` are the rows of smallest similarity.

    Args:
        db: ``[N, D]`` rows (a tensor or factored loss gradients).
        q: ``[Q, D]`` queries on ``db``'s device.
        k: neighbours of ``q``.
        k_negated: neighbours of ``-q`` (0: none; not for L2).
        sq_norms: ``[N]`` squared row norms (L2 search).
        inv_norms: ``[N]`` inverse row norms (cosine search over unnormalised rows).
        norm_order: for the inner-product search of factored rows (neither norms above): ``(order, norms)``, the rows
            by decreasing norm and those norms. Rows are then visited in that order and a block of queries stops once
            its ``k``-th best similarity (each sign) is at least ``|q|`` times the largest norm left: by
            Cauchy-Schwarz no row left can enter, so the answer is exactly the full search's (up to ties).

    Returns:
        ``(distances, positions)`` of ``q`` then of ``-q`` (``[Q, 0]`` when ``k_negated`` is 0), float32 and int64
        on CPU, nearest first; positions are row numbers of ``db``.

    Example::

        >>> d, p, _, _ = exact_search(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0]]), 1)
        >>> p.tolist(), d.tolist()
        ([[1]], [[-2.0]])
    """
    q = q.to(db.device)
    n = db.shape[0]
    factored = isinstance(db, FactoredGradients)
    if factored:
        # A factored block also holds [rows, queries, C] products: all queries (up to 256) per block and fewer rows,
        # so the product keeps its queries together and the block stays in cache (measured at 200k x (10 + 128),
        # 100 queries: blocks of ~4k rows 0.9 s, of 64k rows and 25 queries 1.8 s; the dense rows 1.0 s).
        q_chunk = max(1, min(q.shape[0], 256))
        db_chunk = min(n, DB_CHUNK, max(1024, (BLOCK_ELEMENTS // 4) // (q_chunk * db.num_outputs)))
    else:
        db_chunk = min(n, DB_CHUNK)
        q_chunk = max(1, BLOCK_ELEMENTS // db_chunk)
    ordered = norm_order is not None and factored and sq_norms is None and inv_norms is None

    def block(qc: Tensor, start: int) -> Tensor:
        stop = start + db_chunk
        if ordered:
            assert norm_order is not None
            assert isinstance(db, FactoredGradients)
            rows = norm_order[0][start:stop]
            part = FactoredGradients(db.out_grads[rows], db.inputs[rows], bias=db.bias)
            return part.dot(qc).neg_()
        sim = db.dot(qc, start, stop) if factored else qc @ db[start:stop].T
        if inv_norms is not None:
            sim.mul_(inv_norms[start:stop])
        if sq_norms is not None:
            return ((qc * qc).sum(1, keepdim=True) - 2.0 * sim + sq_norms[start:stop]).clamp_min_(0)
        return sim.neg_()  # negative similarity: smaller is nearer

    def merge(best: tuple[Tensor, Tensor] | None, dist: Tensor, start: int, kk: int) -> tuple[Tensor, Tensor]:
        vals, pos = dist.topk(min(kk, dist.shape[1]), dim=1, largest=False)
        pos = pos + start
        if best is None:
            return vals, pos
        merged = torch.cat([best[0], vals], 1)
        top, order = merged.topk(min(kk, merged.shape[1]), dim=1, largest=False)
        return top, torch.cat([best[1], pos], 1).gather(1, order)

    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for qs in range(0, q.shape[0], q_chunk):
        qc = q[qs : qs + q_chunk]
        best: tuple[Tensor, Tensor] | None = None
        worst: tuple[Tensor, Tensor] | None = None
        norms = qc.norm(dim=1) if ordered else None
        for start in range(0, n, db_chunk):
            dist = block(qc, start)
            best = merge(best, dist, start, k)
            if k_negated:
                worst = merge(worst, dist.neg_(), start, k_negated)  # -q's distances: the negated similarity
            if norms is not None and norm_order is not None and start + db_chunk < n:
                bound = norms * norm_order[1][start + db_chunk]  # the largest |<q, x>| of any row left
                done = best[1].shape[1] == k and bool((-best[0][:, -1] >= bound).all())
                if k_negated:
                    assert worst is not None
                    done = done and worst[1].shape[1] == k_negated and bool((-worst[0][:, -1] >= bound).all())
                if done:
                    break
        assert best is not None
        empty = (torch.zeros(qc.shape[0], 0, device=q.device), torch.zeros(qc.shape[0], 0, dtype=torch.long))
        parts.append((*best, *(worst if worst is not None else empty)))
    out = []
    for i in (0, 2):
        out.append(torch.cat([p[i] for p in parts]).float().cpu())
        positions = torch.cat([p[i + 1].cpu() for p in parts])
        out.append(norm_order[0].cpu()[positions] if ordered and norm_order is not None else positions)
    return out[0], out[1], out[2], out[3]
