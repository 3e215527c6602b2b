"""The guard of error correction (keep="improved"): the retain set and its tolerance in the lr search and in every
step, the best held-out state, the default retain set, what the callback logs, and bad arguments.

Most answers are exact: ``f(x) = w·x`` with one parameter ``w`` and the squared error, one training point (1, 1),
so a plain SGD step at rate ``lr`` from ``w`` is ``w + 2·lr·(1 - w)``.
"""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_fastif import ExactInverse
from lightning_fastif.core.ihvp import LiSSA
from lightning_fastif.errors import ArgumentError
from lightning_fastif.lightning.arguments import AUTO_LR_GRID
from lightning_fastif.lightning.correction import ErrorCorrection, accuracy, correct_errors
from lightning_fastif.lightning.correction_guard import (
    RETAIN_SAMPLE,
    CorrectionGuard,
    check_retain_tolerance,
    retain_sample,
    within_tolerance,
)
from lightning_fastif.lightning.correction_lr import SEARCH_HALVINGS, search_lr
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.snapshots import FeatureSnapshot
from tests.helpers.correction_models import CueNet, cue_problem


class _Scalar(torch.nn.Module):
    def __init__(self, w: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def per_example_loss(self, batch):
        x, y = batch
        return (self.w * x - y) ** 2


def _loss(m, b):
    return m.per_example_loss(b)


def _points(y, n=1):
    return TensorDataset(torch.ones(n), torch.full((n,), float(y)))


def _influence(model):
    return InfluenceModule(model, train_dataset=_points(1.0), num_candidates=None, ihvp=ExactInverse(damping=0.0))


def _step(w, lr):
    return w + 2 * lr * (1 - w)


def _retain_loss(w):  # the retain point (1, -0.2): loss (w + 0.2)², 0.04 at w = 0; tolerance 1.0 allows 0.08
    return (w + 0.2) ** 2


def test_search_rejects_a_rate_that_helps_the_anchors_but_breaks_the_retain_tolerance():
    """The anchors (1, 1) gain most at lr 0.3 of the grid (without a retain check the answer is the grid point below,
    0.1). The retain point (1, -0.2) may rise from 0.04 to 0.08: the best rate 0.3 gives (0.6 + 0.2)² = 0.64, half of
    it 0.25, a quarter 0.1225, an eighth (0.0375) 0.075625, the first within the tolerance and the answer."""
    model = _Scalar()
    batch = (torch.ones(1), torch.ones(1))
    assert search_lr(model, _loss, batch, batch)[0] == 0.1
    guard = CorrectionGuard(holdout=None, retain=_points(-0.2), tolerance=1.0, loss_fn=_loss)
    guard.start(model)
    assert guard.retain_metric == "loss"
    assert guard.retain_before == pytest.approx(0.04)
    lr, trials = search_lr(model, _loss, batch, batch, guard=guard)
    assert lr == 0.0375
    grid, checked = trials[:10], trials[10:]
    assert [t["lr"] for t in grid] == [0.0, *AUTO_LR_GRID]
    assert all(t["retain"] is None for t in grid)  # only the best and its halves are measured on the retain set
    assert [t["lr"] for t in checked] == [0.3, 0.15, 0.075, 0.0375]
    assert [t["retain"] for t in checked] == pytest.approx([0.64, 0.25, 0.1225, 0.075625])
    assert [t["allowed"] for t in checked] == [False, False, False, True]
    assert checked[0]["anchor_loss"] < checked[-1]["anchor_loss"]  # it helps the anchors more, and is refused
    assert model.w.item() == 0.0
    # A tolerance no step meets (0): the grid's smallest rate.
    strict = CorrectionGuard(holdout=None, retain=_points(-0.2), tolerance=0.0, loss_fn=_loss)
    strict.start(model)
    lr, trials = search_lr(model, _loss, batch, batch, guard=strict)
    assert lr == 1e-4
    assert len(trials) == 10 + SEARCH_HALVINGS + 1


def test_each_step_is_held_to_the_retain_tolerance_and_retried_at_half_the_rate():
    """lr="auto" takes 0.0375 (above). Step 1: w = 0.075, retain 0.0756 (kept). Step 2 at 0.0375, 0.01875 and
    0.009375 gives 0.1186, 0.0959, 0.0855, all above 0.08: undone (the rate goes on halved, 0.0046875). Step 3 at
    that gives 0.0805, at 0.00234375 0.0780 (kept). The held-out anchors' loss falls at each state kept."""
    model = _Scalar()
    report = correct_errors(
        model,
        _influence(model),
        _points(1.0, n=4),
        retain_dataset=_points(-0.2),
        retain_tolerance=1.0,
        num_anchors=1,
        top_m=1,
        num_steps=3,
    )
    assert report.lr == 0.0375
    assert [s.lr for s in report.steps] == pytest.approx([0.0375, 0.009375, 0.00234375])
    assert [s.undone for s in report.steps] == [False, True, False]
    assert report.steps[1].retain is None
    assert report.steps[1].holdout is None
    w = 0.0
    for s in report.steps:
        if s.undone:
            continue
        w = _step(w, s.lr)
        assert s.retain == pytest.approx(_retain_loss(w), rel=1e-5)
        assert within_tolerance("loss", 0.04, s.retain, 1.0)
    assert model.w.item() == pytest.approx(w, rel=1e-5)
    assert report.retain_before == pytest.approx(0.04)
    assert report.retain_kept == report.retain_after == pytest.approx(_retain_loss(w), rel=1e-5)
    assert report.retain_size == 1
    assert report.retain_tolerance == 1.0
    assert report.kept is True
    assert report.kept_steps == 2
    assert report.holdout_kept == report.holdout_after == pytest.approx((w - 1) ** 2, rel=1e-5)
    assert report.holdout_before == 1.0


def test_a_correction_that_breaks_the_retain_tolerance_at_every_rate_is_rolled_back():
    """A tolerance of 0 on the retain point: every step raises its loss, at every rate tried, so each step is undone
    and the weights are exactly those from before (not kept, though the held-out anchors would have gained)."""
    model = _Scalar()
    report = correct_errors(
        model,
        _influence(model),
        _points(1.0, n=4),
        retain_dataset=_points(-0.2),
        retain_tolerance=0.0,
        lr=0.1,
        num_anchors=1,
        top_m=1,
        num_steps=2,
    )
    assert [s.undone for s in report.steps] == [True, True]
    assert [s.lr for s in report.steps] == pytest.approx([0.1 / 4, 0.1 / 32])  # the last rate tried, lowered on
    assert report.kept is False
    assert report.kept_steps == 0
    assert model.w.item() == 0.0
    assert report.retain_kept == report.retain_before == pytest.approx(0.04)
    # Without the retain check the same correction is kept.
    model = _Scalar()
    report = correct_errors(
        model,
        _influence(model),
        _points(1.0, n=4),
        retain_tolerance=None,
        lr=0.1,
        num_anchors=1,
        top_m=1,
        num_steps=2,
    )
    assert report.kept is True
    assert report.retain_before is None
    assert model.w.item() == pytest.approx(_step(_step(0.0, 0.1), 0.1))


def test_the_state_with_the_best_held_out_metric_is_kept():
    """Held-out target y = 0.1 while the steps pull w to 1: w = 0.06, 0.1164, 0.1695 at lr 0.03; the held-out loss
    (w - 0.1)² is lowest after step 2, so those weights are kept (exactly), not the last ones; the report has both."""
    model = _Scalar()
    report = correct_errors(
        model,
        _influence(model),
        _points(1.0, n=2),
        holdout_dataset=_points(0.1),
        eval_dataset=_points(0.1),
        retain_tolerance=None,
        lr=0.03,
        num_anchors=1,
        top_m=1,
        num_steps=3,
    )
    w1 = _step(0.0, 0.03)
    w2 = _step(w1, 0.03)
    w3 = _step(w2, 0.03)
    assert [s.holdout for s in report.steps] == pytest.approx([(w - 0.1) ** 2 for w in (w1, w2, w3)], rel=1e-4)
    assert report.kept is True
    assert report.kept_steps == 2
    assert model.w.item() == pytest.approx(w2, rel=1e-6)
    assert report.holdout_after == pytest.approx((w3 - 0.1) ** 2, rel=1e-4)
    assert report.holdout_kept == pytest.approx((w2 - 0.1) ** 2, rel=1e-4)
    assert report.metric == "loss"
    assert report.metric_after == pytest.approx((w2 - 0.1) ** 2, rel=1e-4)  # the kept weights' metric
    assert report.metric_corrected == pytest.approx((w3 - 0.1) ** 2, rel=1e-4)  # the last steps' metric


def test_keep_always_measures_a_given_retain_set_and_judges_nothing():
    model = _Scalar()
    report = correct_errors(
        model,
        _influence(model),
        _points(1.0, n=2),
        keep="always",
        retain_dataset=_points(-0.2),
        retain_tolerance=0.0,
        lr=0.1,
        num_anchors=1,
        top_m=1,
        num_steps=1,
    )
    assert report.kept is True
    assert report.kept_steps == 1
    assert report.retain_tolerance is None
    assert report.retain_after == pytest.approx(_retain_loss(0.2))  # above the tolerance, kept all the same
    assert model.w.item() == pytest.approx(0.2)


def test_default_retain_set_is_a_seeded_sample_of_the_training_data():
    """Without retain_dataset the guard holds the correction to the accuracy on 512 training examples (all of them
    when there are fewer): here the 240 training points of the cue problem, measured before the steps."""
    pl.seed_everything(0)
    train, anchors, challenge = cue_problem()
    model = CueNet()
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    m = copy.deepcopy(model)
    influence = InfluenceModule(m, train_dataset=train, num_candidates=None, ihvp=_lissa(), progress=False)
    report = correct_errors(m, influence, anchors, num_steps=2, eval_dataset=challenge)
    assert report.retain_size == len(train) == 240
    assert report.retain_metric == "accuracy"
    assert report.retain_before == accuracy(model, train)
    assert report.retain_tolerance == 0.02
    assert report.retain_kept >= report.retain_before - 0.02
    big = TensorDataset(torch.arange(1000.0))
    from lightning_fastif.core.batches import IndexedData

    sample = retain_sample(IndexedData(big), seed=3)
    rows = sample.gather(torch.arange(len(sample)))[0]
    assert len(sample) == RETAIN_SAMPLE
    assert rows.unique().numel() == RETAIN_SAMPLE
    assert torch.equal(rows, retain_sample(IndexedData(big), seed=3).gather(torch.arange(RETAIN_SAMPLE))[0])
    assert not torch.equal(rows, retain_sample(IndexedData(big), seed=4).gather(torch.arange(RETAIN_SAMPLE))[0])


def _lissa() -> LiSSA:
    return LiSSA(damping=0.01, scale=20.0, recursion_depth=60, batch_size=16, residual_examples=0)


def test_callback_logs_the_retain_metric_and_the_steps_kept(tmp_path):
    pl.seed_everything(11)
    train, anchors, challenge = cue_problem()
    correction = ErrorCorrection(
        anchors=anchors,
        eval_dataset=challenge,
        retain_dataset=challenge,  # any in-distribution set the user has; here simply a given one
        retain_tolerance=0.05,
        epochs=[0],
        on_fit_end=False,
        num_candidates=60,
        ihvp=_lissa(),
        dirpath=str(tmp_path / "corr"),
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[FeatureSnapshot(dirpath=tmp_path / "snap", every_n_epochs=1), correction],
    )
    trainer.fit(CueNet(), DataLoader(train, batch_size=32, shuffle=True))
    (entry,) = correction.history
    assert entry["retain_size"] == len(challenge)
    assert entry["retain_tolerance"] == 0.05
    assert entry["retain_kept"] >= entry["retain_before"] - 0.05
    assert entry["kept"] == (entry["kept_steps"] > 0)
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    for key in ("fastif/correction/retain_acc_before", "fastif/correction/retain_acc_after", "kept_steps"):
        assert key in logged


@pytest.mark.parametrize("value", [-0.1, float("nan"), "2%", True])
def test_bad_retain_tolerance_names_the_argument(value):
    anchors = cue_problem(n=10)[1]
    with pytest.raises(ArgumentError, match="retain_tolerance: expected"):
        ErrorCorrection(anchors=anchors, retain_tolerance=value)
    with pytest.raises(ArgumentError, match="retain_tolerance: expected"):
        check_retain_tolerance(value)
    model = _Scalar()
    with pytest.raises(ArgumentError, match="retain_tolerance: expected"):
        correct_errors(model, _influence(model), _points(1.0, n=2), retain_tolerance=value)
    assert model.w.item() == 0.0


def test_empty_retain_dataset_names_the_argument():
    anchors = cue_problem(n=10)[1]
    empty = TensorDataset(torch.zeros(0, 5), torch.zeros(0).long())
    with pytest.raises(ArgumentError, match="retain_dataset: expected a non-empty Dataset"):
        ErrorCorrection(anchors=anchors, retain_dataset=empty)
    model = _Scalar()
    with pytest.raises(ArgumentError, match="retain_dataset: expected a non-empty Dataset"):
        correct_errors(model, _influence(model), _points(1.0, n=2), retain_dataset=TensorDataset(torch.zeros(0)))


def test_within_tolerance():
    assert within_tolerance("accuracy", 0.9, 0.88, 0.02)
    assert not within_tolerance("accuracy", 0.9, 0.87, 0.02)
    assert within_tolerance("loss", 2.0, 2.04, 0.02)
    assert not within_tolerance("loss", 2.0, 2.05, 0.02)
    assert not within_tolerance("loss", 2.0, float("nan"), 0.02)
