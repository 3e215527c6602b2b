"""The exact nearest-neighbour search in torch: chunked products and a running top-k, both signs in one pass.

:class:`~lightning_fastif.search.knn.KNNIndex` uses it on CPU (and on a GPU without a FAISS GPU build) over its
features as they are: a tensor (a memory-mapped snapshot file stays mapped) or
:class:`~lightning_fastif.core.factored_grads.FactoredGradients`, whose inner products are formed from the factors.
Memory stays at one ``[queries, rows]`` block plus the running top-k. This module imports no Lightning.

The inner-product search over factored rows has a faster exact path, the low-rank prefilter. A query on a
``Linear`` layer's gradients is a ``C x (D+1)`` matrix ``Q`` (weight and bias columns) and a row's score is
``δᵀ Q ã`` (``ã = [a; 1]``). Preconditioned loss gradients are close to rank one (``σ_2 / σ_1`` about 0.1), so
the rank-``r`` part ``Q_r = Σ_{j<=r} σ_j u_j v_jᵀ`` of the query's SVD gives every row's score up to

    ``|δᵀ Q ã - δᵀ Q_r ã| <= σ_{r+1} |δ| |ã|``

at ``r / C`` of the products' cost. The search visits the rows by decreasing norm, as the full one does, and scores
exactly (the same float32 products) only the rows whose bound can still reach some query's ``k``-th best score
found so far (either sign); it stops once no row left can reach it (Cauchy-Schwarz with ``σ_1``). A row skipped
cannot be among the ``k`` best, so the answer is the full search's (up to ties): the bounds carry an allowance for
the float32 rounding of both the bounds and the scores (:data:`ROUNDING_SLACK`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_fastif.core.factored_grads import FactoredGradients

BLOCK_ELEMENTS = 1 << 24
"""Numbers in one distance block of the search: 64 MB of float32."""
DB_CHUNK = 1 << 16
"""Rows of the indexed set per block (and per chunk of anything done row-wise over it)."""
PREFILTER_TOLERANCE = 0.05
"""The prefilter's rank ``r``: the smallest with ``σ_{r+1} <= PREFILTER_TOLERANCE · σ_1`` for 90% of the queries."""
PREFILTER_MAX_RANK = 4
"""Above this rank (or at ``C / 2`` and above) the prefilter saves too little: the full products run instead."""
ROUNDING_SLACK = 1e-4
"""Float32 rounding allowance of the bounds, per unit of ``(|Q|_F + Σ_{j<=r} σ_j) |δ| |ã|``: the products' own
error is below ``γ_{C+D+1} <= 1e-5`` of that (recursive summation), so the bounds hold with ten times to spare."""


def exact_search(
    db: Tensor | FactoredGradients,
    q: Tensor,
    k: int,
    k_negated: int = 0,
    *,
    sq_norms: Tensor | None = None,
    inv_norms: Tensor | None = None,
    norm_order: tuple[Tensor, Tensor] | None = None,
    prefilter: bool = True,
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
        prefilter: with ``norm_order``, bound the scores by the queries' low-rank parts first and score exactly only
            the rows the bounds keep (see the module's text), whenever the queries are close enough to low rank
            (:data:`PREFILTER_TOLERANCE`); the same answer, faster. False: the full products always.

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

    def block(qc: Tensor, start: int, low_rank: LowRankQueries | None, wanted: tuple[Tensor, Tensor | None] | None):
        """The distances of the rows of block ``start`` and those rows (by decreasing norm when ``ordered``)."""
        stop = min(n, start + db_chunk)
        if ordered:
            assert isinstance(db, FactoredGradients)
            assert norm_order is not None
            rows = norm_order[0][start:stop]
            # index_select: several times faster than indexing with a tensor (measured: 0.24 against 2.0 ms here)
            grads, inputs = db.out_grads.index_select(0, rows), db.inputs.index_select(0, rows)
            if low_rank is not None and wanted is not None:
                keep = low_rank.reaches(grads, inputs, norm_order[1][start:stop], *wanted).nonzero()[:, 0]
                rows, grads, inputs = rows[keep], grads.index_select(0, keep), inputs.index_select(0, keep)
            return FactoredGradients(grads, inputs, bias=db.bias).dot(qc).neg_(), rows
        rows = torch.arange(start, stop, device=qc.device)
        sim = db.dot(qc, start, stop) if factored else qc @ db[start:stop].T
        if inv_norms is not None:
            sim.mul_(inv_norms[start:stop])
        if sq_norms is not None:
            return ((qc * qc).sum(1, keepdim=True) - 2.0 * sim + sq_norms[start:stop]).clamp_min_(0), rows
        return sim.neg_(), rows  # negative similarity: smaller is nearer

    def merge(best: tuple[Tensor, Tensor] | None, dist: Tensor, rows: Tensor, kk: int) -> tuple[Tensor, Tensor]:
        vals, pos = dist.topk(min(kk, dist.shape[1]), dim=1, largest=False)
        pos = rows[pos]
        if best is None:
            return vals, pos
        merged = torch.cat([best[0], vals], 1)
        top, order = merged.topk(min(kk, merged.shape[1]), dim=1, largest=False)
        return top, torch.cat([best[1], pos], 1).gather(1, order)

    def last(found: tuple[Tensor, Tensor] | None, kk: int) -> Tensor | None:
        """Each query's ``kk``-th best distance so far, or None before ``kk`` rows were seen."""
        return found[0][:, -1] if found is not None and found[1].shape[1] == kk else None

    def search(qc: Tensor, low_rank: LowRankQueries | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        best: tuple[Tensor, Tensor] | None = None
        worst: tuple[Tensor, Tensor] | None = None
        # The largest |<q, x>| per unit of row norm: |q|, or the prefilter's σ_1 (with its rounding allowance)
        cap = (qc.norm(dim=1) if low_rank is None else low_rank.cap) if ordered else None
        for start in range(0, n, db_chunk):
            above, below = last(best, k), last(worst, k_negated)
            # The least similarity a row needs to enter (-above) and, for -q, the greatest (below); none at first
            wanted = (-above, below) if above is not None and (below is not None or not k_negated) else None
            dist, rows = block(qc, start, low_rank, wanted)
            if dist.shape[1]:
                best = merge(best, dist, rows, k)
                if k_negated:
                    worst = merge(worst, dist.neg_(), rows, k_negated)  # -q's distances: the negated similarity
            if cap is None or norm_order is None or start + db_chunk >= n:
                continue
            above, below = last(best, k), last(worst, k_negated)
            if above is None or (k_negated and below is None):
                continue
            bound = cap * norm_order[1][start + db_chunk]  # the largest |<q, x>| of any row left
            finished = -above >= bound
            if k_negated:
                assert below is not None
                finished &= -below >= bound
            if bool(finished.all()):
                break
            if low_rank is not None and bool(finished.any()):
                low_rank = low_rank.only(~finished)  # no row left can enter a finished query's k best
        assert best is not None
        empty = (torch.zeros(qc.shape[0], 0, device=q.device), torch.zeros(qc.shape[0], 0, dtype=torch.long))
        return (*best, *(worst if worst is not None else empty))

    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for qs in range(0, q.shape[0], q_chunk):
        qc = q[qs : qs + q_chunk]
        low_rank = LowRankQueries.of(db, qc) if ordered and prefilter and isinstance(db, FactoredGradients) else None
        parts.append(search(qc, low_rank))
    out = []
    for i in (0, 2):
        out.append(torch.cat([p[i] for p in parts]).float().cpu())
        out.append(torch.cat([p[i + 1].cpu() for p in parts]))
    return out[0], out[1], out[2], out[3]


class LowRankQueries:
    """Queries on factored rows as matrices ``Q = U S Vᵀ`` and their rank-``r`` parts, for the prefilter's bounds.

    Args:
        mats: ``[Q, C, D(+1)]`` the queries as matrices (the bias column last), float32.
        u, s, vh: their SVD (``[Q, C, m]``, ``[Q, m]``, ``[Q, m, D(+1)]``), float64.
        rank: ``r``.
        bias: whether the rows' dense form ends with a bias gradient (``ã = [a; 1]``).
    """

    def __init__(self, mats: Tensor, u: Tensor, s: Tensor, vh: Tensor, rank: int, *, bias: bool) -> None:
        self.rank, self.bias = rank, bias
        frobenius = mats.double().flatten(1).norm(dim=1)
        # [C, r, Q] and [D(+1), r, Q] (σ_j on the left): a product with the rows gives each j as a [rows, Q] block
        self.left = (u[:, :, :rank] * s[:, None, :rank]).permute(1, 2, 0).float().contiguous()
        self.right = vh[:, :rank, :].permute(2, 1, 0).float().contiguous()
        rest = s[:, rank] if rank < s.shape[1] else torch.zeros_like(s[:, 0])
        # |score - approximation| <= (σ_{r+1} + slack) |δ| |ã|; the slack covers the float32 rounding of both
        self.margin = (rest + ROUNDING_SLACK * (frobenius + s[:, :rank].sum(1))).float()
        # The largest float32 |score| per unit of row norm: σ_1, with the rounding of the score and of the norm
        self.cap = (s[:, 0] + 2 * ROUNDING_SLACK * frobenius).float()
        self.queries = torch.arange(mats.shape[0])  # those still searched (see only)
        self._flat = self._flatten()

    def _flatten(self) -> tuple[Tensor, Tensor, Tensor]:
        active = self.queries
        left = self.left[:, :, active].reshape(self.left.shape[0], -1)
        right = self.right[:, :, active].reshape(self.right.shape[0], -1)
        return left, right, self.margin[active]

    def only(self, keep: Tensor) -> LowRankQueries:
        """The bounds for the queries still searched among these where ``keep [Q]`` (a bool mask over all)."""
        self.queries = self.queries[keep[self.queries]]
        self._flat = self._flatten()
        return self

    @classmethod
    def of(cls, db: FactoredGradients, q: Tensor) -> LowRankQueries | None:
        """The queries ``q [Q, P]`` on ``db``'s rows, or None when their spectra are too flat for the prefilter.

        The rank is the smallest ``r`` with ``σ_{r+1} <= PREFILTER_TOLERANCE · σ_1`` for 90% of the queries, at most
        :data:`PREFILTER_MAX_RANK` and below ``C / 2`` (beyond, the bounds save too little of the products).
        """
        weight, bias = db.query_factors(q.to(db.dtype))
        mats = weight if bias is None else torch.cat([weight, bias.unsqueeze(2)], 2)
        u, s, vh = torch.linalg.svd(mats.double(), full_matrices=False)
        limit = min(PREFILTER_MAX_RANK, (db.num_outputs - 1) // 2, s.shape[1] - 1)
        ratios = s / s[:, :1].clamp_min(torch.finfo(s.dtype).tiny)
        for rank in range(1, limit + 1):
            if float(ratios[:, rank].quantile(0.9)) <= PREFILTER_TOLERANCE:
                return cls(mats, u, s, vh, rank, bias=db.bias)
        return None

    def approximate(self, grads: Tensor, inputs: Tensor) -> Tensor:
        """``[rows, Q']``: ``δᵀ Q_r ã`` of the queries still searched, for the rows ``(grads [rows, C], inputs)``."""
        left, right, _ = self._flat
        rows, nq, d = grads.shape[0], self.queries.shape[0], inputs.shape[1]
        if self.bias:
            along_a = torch.addmm(right[d:], inputs, right[:d]).view(rows, self.rank, nq)
        else:
            along_a = (inputs @ right).view(rows, self.rank, nq)
        along_g = (grads @ left).view(rows, self.rank, nq)
        approx = along_a[:, 0] * along_g[:, 0]
        for j in range(1, self.rank):
            approx.addcmul_(along_a[:, j], along_g[:, j])
        return approx

    def reaches(self, grads: Tensor, inputs: Tensor, norms: Tensor, above: Tensor, below: Tensor | None) -> Tensor:
        """``[rows]`` bool: the rows whose score may reach ``above [Q]`` (or, with ``below``, fall to it) for a query.

        Args:
            grads: ``[rows, C]`` the rows' ``δ``.
            inputs: ``[rows, D]`` their ``a``.
            norms: ``[rows]`` their dense norms ``|δ| |ã|``.
            above: each query's least similarity still wanted.
            below: each query's greatest similarity still wanted by the search of ``-q``, or None.
        """
        approx = self.approximate(grads, inputs)
        margin = torch.outer(norms, self._flat[2])
        # the most by which a row may pass a query's threshold, over the queries (amax: faster than any over bools)
        over = torch.add(approx, margin).sub_(above[self.queries]).amax(1)
        if below is not None:
            over = torch.maximum(over, margin.sub_(approx).add_(below[self.queries]).amax(1))
        return over >= 0
