"""The exact search's low-rank prefilter over factored gradients: its bounds hold, and its answer is the full one."""

from __future__ import annotations

import pytest
import torch

import lightning_fastif.search.exact as exact
from lightning_fastif.core.factored_grads import FactoredGradients
from lightning_fastif.search.exact import LowRankQueries, exact_search
from lightning_fastif.search.knn import KNNIndex


def _rows(n: int, c: int, d: int, *, bias: bool = True, seed: int = 0) -> FactoredGradients:
    generator = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=generator) ** 3  # heavy-tailed norms, as loss gradients have
    out_grads = torch.randn(n, c, generator=generator) * scale
    return FactoredGradients(out_grads, torch.randn(n, d, generator=generator), bias=bias)


def _near_rank_one(db: FactoredGradients, count: int, *, seed: int = 1, noise: float = 0.03) -> torch.Tensor:
    """Dense queries whose matrices are a row's gradient plus ``noise`` of it in random other directions."""
    generator = torch.Generator().manual_seed(seed)
    c, d = db.num_outputs, db.num_inputs + (1 if db.bias else 0)
    g = torch.randn(count, c, 1, generator=generator)
    a = torch.randn(count, 1, d, generator=generator)
    mats = (
        g * a
        + noise
        * g.norm(dim=1, keepdim=True)
        * a.norm(dim=2, keepdim=True)
        * torch.randn(count, c, d, generator=generator)
        / (c * d) ** 0.5
    )
    weight = mats[:, :, : db.num_inputs].reshape(count, -1)
    return torch.cat([weight, mats[:, :, db.num_inputs]], 1) if db.bias else weight


def _norm_order(db: FactoredGradients) -> tuple[torch.Tensor, torch.Tensor]:
    norms = db.sq_norms().sqrt()
    order = norms.argsort(descending=True)
    return order, norms[order]


def _brute_force(db: FactoredGradients, queries: torch.Tensor, k: int, k_negated: int):
    sims = queries @ db[:].T
    top, bottom = sims.topk(k, 1), (-sims).topk(k_negated, 1)
    return -top.values, top.indices, -bottom.values, bottom.indices


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_the_bounds_hold_for_every_row_and_query(bias: bool, rank: int) -> None:
    db = _rows(500, 8, 6, bias=bias)
    # Queries of any spectrum, and rows along each query's (r+1)-th singular vectors, where the bound is tight
    queries = torch.randn(5, db.shape[1], generator=torch.Generator().manual_seed(2))
    weight, b = db.query_factors(queries)
    mats = weight if b is None else torch.cat([weight, b.unsqueeze(2)], 2)
    u, s, vh = torch.linalg.svd(mats.double(), full_matrices=False)
    low_rank = LowRankQueries(queries, mats, u, s, vh, rank, bias=bias)
    tight_g = u[:, :, rank].float() * 3.0
    tight_a = vh[:, rank, :].float() * 2.0
    if bias:  # a row's ã ends with 1: scale the singular vector so that it does
        tight_g = tight_g * tight_a[:, -1:]
        tight_a = tight_a / tight_a[:, -1:]
        tight_a = tight_a[:, :-1]
    rows = FactoredGradients(torch.cat([db.out_grads, tight_g]), torch.cat([db.inputs, tight_a]), bias=bias)
    approx = low_rank.approximate(rows.out_grads, rows.inputs)  # [rows, Q]
    exact_scores = (queries @ rows[:].T).T
    margin = torch.outer(rows.sq_norms().sqrt(), low_rank.margin)
    assert bool(((approx - exact_scores).abs() <= margin).all())
    # the bound is attained (to the slack) by the rows along the (r+1)-th pair: not a loose test
    used = (approx - exact_scores).abs()[-5:].diagonal() / margin[-5:].diagonal()
    assert float(used.min()) > 0.95


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k_negated", [0, 9])
@pytest.mark.parametrize("chunk", [7, 64, 10_000])
def test_prefiltered_search_equals_brute_force(monkeypatch, bias: bool, k_negated: int, chunk: int) -> None:
    # Rank one whatever the spectrum: loose bounds, many rows scored both ways (pairs and whole rows)
    monkeypatch.setattr(exact, "PREFILTER_TOLERANCE", 1.0)
    monkeypatch.setattr(exact, "DB_CHUNK", chunk)
    db = _rows(600, 5, 7, bias=bias)
    queries = torch.cat([torch.randn(6, db.shape[1]), _near_rank_one(db, 6)])
    assert LowRankQueries.of(db, queries) is not None
    found = exact_search(db, queries, 9, k_negated, norm_order=_norm_order(db))
    expected = _brute_force(db, queries, 9, k_negated)
    assert torch.equal(found[1], expected[1])
    assert torch.equal(found[3], expected[3])
    torch.testing.assert_close(found[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found[2], expected[2], rtol=1e-5, atol=1e-5)
    full = exact_search(db, queries, 9, k_negated, norm_order=_norm_order(db), prefilter=False)
    assert torch.equal(found[1], full[1])
    assert torch.equal(found[3], full[3])


def test_near_rank_one_queries_take_the_prefilter_and_score_few_rows(monkeypatch) -> None:
    monkeypatch.setattr(exact, "DB_CHUNK", 256)
    db = _rows(20_000, 10, 16)
    queries = _near_rank_one(db, 8)
    low_rank = LowRankQueries.of(db, queries)
    assert low_rank is not None
    assert low_rank.rank == 1
    scored: list[int] = []
    dot, scores = FactoredGradients.dot, LowRankQueries.scores

    def counting_dot(self, q, start=0, stop=None):
        scored.append(len(self) * q.shape[0])
        return dot(self, q, start, stop)

    def counting_scores(self, grads, inputs, pairs):
        scored.append(int(pairs.sum()))
        return scores(self, grads, inputs, pairs)

    monkeypatch.setattr(FactoredGradients, "dot", counting_dot)
    monkeypatch.setattr(LowRankQueries, "scores", counting_scores)
    found = exact_search(db, queries, 20, 40, norm_order=_norm_order(db))
    monkeypatch.undo()
    expected = _brute_force(db, queries, 20, 40)
    assert torch.equal(found[1], expected[1])
    assert torch.equal(found[3], expected[3])
    assert sum(scored) < 0.1 * 20_000 * 8  # exact scores for under a tenth of the (row, query) pairs


def test_near_ties_are_ranked_as_the_full_search_ranks_them() -> None:
    # Many rows one direction apart by relative 1e-5 to 1e-4 (inside the bounds' slack): only the exact scores
    # can order them, and the 10 best of each sign lie among them
    generator = torch.Generator().manual_seed(7)
    base = _rows(400, 10, 12, seed=3)
    g0, a0 = torch.randn(1, 10, generator=generator), torch.randn(1, 12, generator=generator)
    steps = 1.0 + 1e-5 * torch.randperm(60, generator=generator).float().unsqueeze(1)
    close_g = torch.cat([g0 * steps, -g0 * steps]) * 20.0
    close_a = a0.expand(120, -1)
    db = FactoredGradients(torch.cat([base.out_grads, close_g]), torch.cat([base.inputs, close_a]), bias=True)
    dense = torch.cat([(g0.T * a0).reshape(1, -1), g0], 1)
    queries = dense + 1e-3 * torch.randn(3, dense.shape[1], generator=generator)
    assert LowRankQueries.of(db, queries) is not None
    found = exact_search(db, queries, 10, 10, norm_order=_norm_order(db))
    expected = _brute_force(db, queries, 10, 10)
    assert set(found[1][0].tolist()) <= set(range(400, 520))
    assert torch.equal(found[1], expected[1])
    assert torch.equal(found[3], expected[3])


def test_zero_rows_and_queries_tie_without_harm() -> None:
    db = _rows(300, 10, 6)
    db = FactoredGradients(
        torch.cat([db.out_grads, torch.zeros(200, 10)]), torch.cat([db.inputs, db.inputs[:200]]), bias=True
    )
    queries = torch.cat([_near_rank_one(db, 3), torch.zeros(1, db.shape[1])])
    found = exact_search(db, queries, 50, 280, norm_order=_norm_order(db))
    expected = _brute_force(db, queries, 50, 280)
    # the zero rows (and every row for the zero query) tie at 0: the distances are the answer
    torch.testing.assert_close(found[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found[2], expected[2], rtol=1e-5, atol=1e-5)
    sims = queries @ db[:].T
    torch.testing.assert_close(sims.gather(1, found[1]), -found[0], rtol=1e-5, atol=1e-5)  # the rows' own scores
    torch.testing.assert_close(sims.gather(1, found[3]), found[2], rtol=1e-5, atol=1e-5)
    assert all(len(set(row.tolist())) == len(row) for row in [*found[1], *found[3]])  # no row twice in one answer


def test_flat_spectra_fall_back_to_the_full_products() -> None:
    db = _rows(100, 10, 6)
    assert LowRankQueries.of(db, torch.randn(20, db.shape[1])) is None
    assert LowRankQueries.of(_rows(100, 2, 6), torch.randn(3, 14)) is None  # C = 2: nothing to save


def test_knn_index_searches_factored_rows_through_the_prefilter(monkeypatch) -> None:
    db = _rows(3000, 10, 8)
    queries = _near_rank_one(db, 5)
    calls: list[int] = []
    search = LowRankQueries.search

    def counting(self, *args, **kwargs):
        calls.append(1)
        return search(self, *args, **kwargs)

    monkeypatch.setattr(LowRankQueries, "search", counting)
    index = KNNIndex(db, metric="ip", kind="flat", backend="torch")
    found = index.search_signed(queries, 15, "both")
    assert calls == [1]
    dense = KNNIndex(db[:], metric="ip", kind="flat", backend="torch")
    assert torch.equal(found[1], dense.search_signed(queries, 15, "both")[1])


@pytest.mark.parametrize("prefilter", [True, False])
def test_the_search_stops_only_once_no_row_left_can_enter_either_sign(monkeypatch, prefilter: bool) -> None:
    # Against one query σ u vᵀ: rows of norm 5 scoring ±1.7σ (cosine 0.34), then rows of norm 2.5 along +u (2.5σ),
    # then rows of norm 1.9 along -u (the 10 best of -q: 1.9σ > 1.7σ), then small rows. The positive side is done
    # after the 2.5σ rows, the negative one only after the -u rows; a stop any sooner (a bound below σ times the
    # norm, or one side's threshold alone) misses them.
    monkeypatch.setattr(exact, "DB_CHUNK", 5)
    generator = torch.Generator().manual_seed(11)
    c, d = 10, 12
    u = torch.nn.functional.normalize(torch.randn(c, generator=generator), dim=0)
    v = torch.nn.functional.normalize(torch.randn(d, generator=generator), dim=0)

    def away(count: int, cosine: float) -> torch.Tensor:  # unit δ at this cosine to u
        w = torch.randn(count, c, generator=generator)
        w = torch.nn.functional.normalize(w - (w @ u).unsqueeze(1) * u, dim=1)
        return cosine * u + (1 - cosine**2) ** 0.5 * w

    cosines = 0.34 + 0.001 * torch.arange(30).unsqueeze(1)
    grads = [
        5 * away(30, 0.34) * cosines / 0.34,
        -5 * away(30, 0.34) * cosines / 0.34,
        2.5 * u.expand(10, -1) * (1 - 1e-3 * torch.arange(10).unsqueeze(1)),
        -1.9 * u.expand(10, -1) * (1 - 1e-3 * torch.arange(10).unsqueeze(1)),
        0.3 * torch.randn(300, c, generator=generator) / c**0.5,
    ]
    grads = torch.cat(grads)
    inputs = torch.cat(
        [v.expand(80, -1), torch.nn.functional.normalize(torch.randn(300, d, generator=generator), dim=1)]
    )
    db = FactoredGradients(grads, inputs, bias=False)
    query = (3.0 * u.unsqueeze(1) * v + 1e-4 * torch.randn(c, d, generator=generator)).reshape(1, -1)
    if prefilter:
        assert LowRankQueries.of(db, query) is not None
    found = exact_search(db, query, 10, 10, norm_order=_norm_order(db), prefilter=prefilter)
    assert sorted(found[1][0].tolist()) == list(range(60, 70))
    assert sorted(found[3][0].tolist()) == list(range(70, 80))
    expected = _brute_force(db, query, 10, 10)
    assert torch.equal(found[1], expected[1])
    assert torch.equal(found[3], expected[3])


@pytest.mark.parametrize("prefilter", [True, False])
@pytest.mark.parametrize("sign", ["q", "-q"])
def test_no_stop_before_k_rows_were_seen(monkeypatch, prefilter: bool, sign: str) -> None:
    # Rows along the query's top singular pair, by decreasing norm: each scores ±σ times its norm, so after 5 rows
    # the 5th best already beats any row left; the 12 best still need the next 7. For -q, one row along +u first
    # settles q's single best.
    monkeypatch.setattr(exact, "DB_CHUNK", 5)
    generator = torch.Generator().manual_seed(12)
    u = torch.nn.functional.normalize(torch.randn(6, generator=generator), dim=0)
    v = torch.nn.functional.normalize(torch.randn(8, generator=generator), dim=0)
    sizes = (10.0 - 0.1 * torch.arange(40)).unsqueeze(1)
    grads = u * sizes if sign == "q" else torch.cat([20 * u.unsqueeze(0), -u * sizes])
    db = FactoredGradients(grads, v.expand(grads.shape[0], -1), bias=False)
    query = (2.0 * u.unsqueeze(1) * v + 1e-4 * torch.randn(6, 8, generator=generator)).reshape(1, -1)
    k, k_negated = (12, 0) if sign == "q" else (1, 12)
    found = exact_search(db, query, k, k_negated, norm_order=_norm_order(db), prefilter=prefilter)
    if sign == "q":
        assert sorted(found[1][0].tolist()) == list(range(12))
    else:
        assert found[1][0].tolist() == [0]
        assert sorted(found[3][0].tolist()) == list(range(1, 13))
