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
exactly in float32 only what the bound cannot rule out: the (row, query) pairs whose bound still reaches the query's
``k``-th best score found so far (either sign), pair by pair when they are few, else their rows with every query in
one product. Each query stops once no row left can reach its ``k`` best (Cauchy-Schwarz with ``σ_1``), the search
once all have. A pair skipped cannot be among the ``k`` best, so the answer is the full search's up to ties within
float32 rounding: the bounds carry an allowance for the rounding of both the bounds and the scores
(:data:`ROUNDING_SLACK`). Measured at N = 200,000 (``C = 10``, ``D = 128``, 100 EK-FAC-preconditioned queries,
``k = 100`` and 200 of ``-q``, one thread): 0.26 s against 1.0 s for the full products
(``benchmarks/bench_knn_prefilter.py``). On CPU; elsewhere the full products run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_fastif.core.factored_grads import FactoredGradients

BLOCK_ELEMENTS = 1 << 24
"""Numbers in one distance block of the search: 64 MB of float32."""
DB_CHUNK = 1 << 16
"""Rows of the indexed set per block (and per chunk of anything done row-wise over it)."""
PREFILTER_TOLERANCE = 0.1
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
        prefilter: with ``norm_order`` (on CPU), bound the scores by the queries' low-rank parts first and score
            exactly only what the bounds keep (see the module's text), whenever the queries are close enough to low
            rank (:data:`PREFILTER_TOLERANCE`): the same answer, faster. False: the full products always.

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
            assert isinstance(db, FactoredGradients)
            assert norm_order is not None
            rows = norm_order[0][start:stop]
            grads, inputs = db.out_grads.index_select(0, rows), db.inputs.index_select(0, rows)
            return FactoredGradients(grads, inputs, bias=db.bias).dot(qc).neg_()
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

    def search(qc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
        found = (*best, *(worst if worst is not None else empty))
        if ordered and norm_order is not None:  # positions in the visiting order -> row numbers
            found = (found[0], norm_order[0][found[1]], found[2], norm_order[0][found[3]])
        return found

    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for qs in range(0, q.shape[0], q_chunk):
        qc = q[qs : qs + q_chunk]
        low_rank = None
        if ordered and prefilter and isinstance(db, FactoredGradients) and db.device.type == "cpu":
            low_rank = LowRankQueries.of(db, qc)
        if low_rank is not None and isinstance(db, FactoredGradients) and norm_order is not None:
            parts.append(low_rank.search(db, k, k_negated, norm_order, db_chunk))
        else:
            parts.append(search(qc))
    out = []
    for i in (0, 2):
        out.append(torch.cat([p[i] for p in parts]).float().cpu())
        out.append(torch.cat([p[i + 1].cpu() for p in parts]))
    return out[0], out[1], out[2], out[3]


class LowRankQueries:
    """Queries on factored rows as matrices ``Q = U S Vᵀ``: the prefilter's bounds and the search that uses them.

    Args:
        queries: ``[Q, C·D (+C)]`` the dense queries.
        mats: ``[Q, C, D(+1)]`` the same as matrices (the bias column last), float32.
        u, s, vh: their SVD (``[Q, C, m]``, ``[Q, m]``, ``[Q, m, D(+1)]``), float64.
        rank: ``r``.
        bias: whether the rows' dense form ends with a bias gradient (``ã = [a; 1]``).
    """

    def __init__(
        self, queries: Tensor, mats: Tensor, u: Tensor, s: Tensor, vh: Tensor, rank: int, *, bias: bool
    ) -> None:
        self.dense, self.rank, self.bias = queries, rank, bias
        self.weight_t = mats[:, :, : mats.shape[2] - 1 if bias else None].transpose(1, 2).contiguous()  # [Q, D, C]
        self.bias_part = mats[:, :, -1].contiguous() if bias else None  # [Q, C]
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

    def only(self, keep: Tensor) -> None:
        """Bound only the queries still searched that ``keep [Q]`` (a bool mask over all) keeps."""
        self.queries = self.queries[keep[self.queries]]
        self._flat = self._flatten()

    @classmethod
    def of(cls, db: FactoredGradients, q: Tensor) -> LowRankQueries | None:
        """The queries ``q [Q, P]`` on ``db``'s rows, or None when their spectra are too flat for the prefilter.

        The rank is the smallest ``r`` with ``σ_{r+1} <= PREFILTER_TOLERANCE · σ_1`` for 90% of the queries, at most
        :data:`PREFILTER_MAX_RANK` and below ``C / 2`` (beyond, the bounds save too little of the products).
        """
        q = q.to(db.dtype)
        weight, bias = db.query_factors(q)
        mats = weight if bias is None else torch.cat([weight, bias.unsqueeze(2)], 2)
        u, s, vh = torch.linalg.svd(mats.double(), full_matrices=False)
        limit = min(PREFILTER_MAX_RANK, (db.num_outputs - 1) // 2, s.shape[1] - 1)
        ratios = s / s[:, :1].clamp_min(torch.finfo(s.dtype).tiny)
        for rank in range(1, limit + 1):
            if float(ratios[:, rank].quantile(0.9)) <= PREFILTER_TOLERANCE:
                return cls(q, mats, u, s, vh, rank, bias=db.bias)
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

    def reaches(self, grads: Tensor, inputs: Tensor, norms: Tensor, sides: list[_Best]) -> Tensor:
        """``[rows, Q']`` bool: whether a row's score may reach the ``k`` best of a query still searched, either sign.

        Args:
            grads: ``[rows, C]`` the rows' ``δ``.
            inputs: ``[rows, D]`` their ``a``.
            norms: ``[rows]`` their dense norms ``|δ| |ã|``.
            sides: the best rows so far of ``q`` and (when searched) of ``-q``, each full (``k`` rows).
        """
        approx = self.approximate(grads, inputs)
        margin = torch.outer(norms, self._flat[2])
        keep = torch.add(approx, margin) >= sides[0].threshold()[self.queries]
        if len(sides) > 1:  # -q: its score -approx, within the same margin
            keep |= margin.sub_(approx) >= sides[1].threshold()[self.queries]
        return keep

    def scores(self, grads: Tensor, inputs: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Exact float32 scores of the pairs ``pairs [rows, Q']`` (True: score row with query), query by query.

        Returns:
            ``(scores, positions, padding)``, ``[Q', M]`` each (``M``: the most rows of one query): the scores, the
            rows' positions among ``grads``/``inputs``, and True where a query has fewer than ``M`` rows.
        """
        per_query = pairs.T
        counts = per_query.sum(1)
        width = int(counts.max())
        query, column = per_query.nonzero(as_tuple=True)
        slot = torch.arange(query.shape[0]) - (counts.cumsum(0) - counts)[query]
        positions = torch.zeros(per_query.shape[0], width, dtype=torch.long)
        positions[query, slot] = column
        padding = torch.ones(per_query.shape[0], width, dtype=torch.bool)
        padding[query, slot] = False
        flat = positions.reshape(-1)
        a = inputs.index_select(0, flat).view(*positions.shape, -1)
        g = grads.index_select(0, flat).view(*positions.shape, -1)
        projected = torch.bmm(a, self.weight_t[self.queries])  # [Q', M, C]: Q_W a
        if self.bias_part is not None:
            projected += self.bias_part[self.queries].unsqueeze(1)
        return (projected * g).sum(2), positions, padding

    def search(
        self, db: FactoredGradients, k: int, k_negated: int, norm_order: tuple[Tensor, Tensor], chunk: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:func:`exact_search`'s answer for these queries: the rows by decreasing norm, blocks of ``chunk``."""
        order, norms = norm_order
        n, nq = len(db), self.cap.shape[0]
        sides = [_Best(nq, k, 1.0)] + ([_Best(nq, k_negated, -1.0)] if k_negated else [])
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            rows = order[start:stop]
            # index_select: several times faster than indexing with a tensor (0.24 against 2.0 ms for 4k x 128)
            grads, inputs = db.out_grads.index_select(0, rows), db.inputs.index_select(0, rows)
            if not all(side.full for side in sides):  # the first rows: every one scored, to set the thresholds
                sim = FactoredGradients(grads, inputs, bias=db.bias).dot(self.dense)
                for side in sides:
                    side.add(sim, rows)
            else:
                pairs = self.reaches(grads, inputs, norms[start:stop], sides)
                wanted = pairs.any(1)
                union = int(wanted.sum())
                if union == 0:
                    pass
                elif 8 * pairs.shape[1] * int(pairs.sum(0).max()) <= union * nq:  # the pairs alone: far fewer
                    sim, positions, padding = self.scores(grads, inputs, pairs)
                    for side in sides:
                        side.add(sim, rows[positions], self.queries, padding)
                else:  # most rows wanted by several queries: every query's score of those rows, in one product
                    keep = wanted.nonzero()[:, 0]
                    part = FactoredGradients(grads.index_select(0, keep), inputs.index_select(0, keep), bias=db.bias)
                    sim = part.dot(self.dense)
                    for side in sides:
                        side.add(sim, rows[keep])
            if stop >= n:
                break
            if not all(side.full for side in sides):
                continue
            bound = self.cap * norms[stop]  # the largest |score| of any row left, per query
            finished = sides[0].threshold() >= bound
            for side in sides[1:]:
                finished &= side.threshold() >= bound
            if bool(finished.all()):
                break
            if bool(finished[self.queries].any()):
                self.only(~finished)  # no row left can enter these queries' k best: no more bounds for them
        found: list[Tensor] = []
        for side in sides:
            found += [side.values.neg(), side.rows]  # distances: the negated (signed) similarity
        if not k_negated:
            found += [torch.zeros(nq, 0), torch.zeros(nq, 0, dtype=torch.long)]
        return found[0], found[1], found[2], found[3]


class _Best:
    """One sign's ``k`` best rows of each query so far.

    ``values [Q, k]``: ``sign`` times the similarity, best first; ``rows [Q, k]``: those rows' positions in ``db``.
    """

    def __init__(self, queries: int, k: int, sign: float) -> None:
        self.k, self.sign = k, sign
        self.values = torch.empty(queries, 0)
        self.rows = torch.empty(queries, 0, dtype=torch.long)

    @property
    def full(self) -> bool:
        return self.values.shape[1] == self.k

    def threshold(self) -> Tensor:
        """``[Q]`` the ``k``-th best value (a row needs at least this to enter); only once :attr:`full`."""
        return self.values[:, -1]

    def add(self, sim: Tensor, rows: Tensor, queries: Tensor | None = None, padding: Tensor | None = None) -> None:
        """Merge similarities ``sim [Q', M]`` of ``rows`` (``[M]``, or ``[Q', M]`` per query) into the best so far.

        Args:
            sim: the similarities.
            rows: their rows.
            queries: the ``Q'`` queries they are of (default all).
            padding: True where there is no row.
        """
        values = sim * self.sign
        if padding is not None:
            values.masked_fill_(padding, -torch.inf)
        current = (self.values, self.rows) if queries is None else (self.values[queries], self.rows[queries])
        kk = min(self.k, current[0].shape[1] + values.shape[1])
        if values.shape[1] > kk:
            values, pos = values.topk(kk, 1)
            rows = rows[pos] if rows.dim() == 1 else rows.gather(1, pos)
        elif rows.dim() == 1:
            rows = rows.expand(values.shape[0], -1)
        top, pos = torch.cat([current[0], values], 1).topk(kk, 1)
        best = torch.cat([current[1], rows], 1).gather(1, pos)
        if queries is None:
            self.values, self.rows = top, best
        else:
            self.values[queries], self.rows[queries] = top, best
