"""ErrorCorrection: the core (correct_errors), the callback in a Trainer (CPU and DDP), resume, bad input, models
without classes or with a whole-batch forward, and a step that diverges."""

import copy
import json
import socket

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_fastif.core.batches import labels_of
from lightning_fastif.core.ihvp import LiSSA
from lightning_fastif.errors import ArgumentError, NonFiniteError
from lightning_fastif.lightning.arguments import AUTO_LR_GRID, CorrectionArguments
from lightning_fastif.lightning.correction import (
    ErrorCorrection,
    accuracy,
    compare_selections,
    correct_errors,
    evaluation_metric,
    misclassified_indices,
    model_outputs,
)
from lightning_fastif.lightning.correction_lr import SEARCH_HALVINGS
from lightning_fastif.lightning.module import InfluenceModule
from lightning_fastif.lightning.snapshots import FeatureSnapshot
from tests.helpers.correction_models import (
    ChoicesPerRank,
    CueNet,
    DictDataset,
    LinearRegressor,
    WeightsPerRank,
    WholeBatchNet,
    cue_problem,
    regression_problem,
)

AUTO_RATES = {rate / 2**k for rate in AUTO_LR_GRID for k in range(SEARCH_HALVINGS + 1)}
"""The rates lr='auto' can answer: a grid rate, or under the retain check one halved up to SEARCH_HALVINGS times."""


def fast_lissa() -> LiSSA:
    return LiSSA(damping=0.01, scale=20.0, recursion_depth=60, batch_size=16, residual_examples=0)


def fit(model, train, tmp_path, epochs=8, callbacks=(), **kwargs):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        logger=kwargs.pop("logger", False),
        enable_progress_bar=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cue")
    pl.seed_everything(0)
    train, anchors, challenge = cue_problem()
    model = CueNet()
    fit(model, train, tmp, epochs=10, callbacks=[FeatureSnapshot(dirpath=tmp / "snap")])
    return model, train, anchors, challenge, tmp / "snap"


def test_helpful_beats_random_on_planted_cue(trained):
    """Same steps, same lr: the most helpful points raise challenge accuracy more than random points.

    Measured here (seed 0, 6 steps of SGD at lr 0.1 on 10 points, 120 kNN candidates): challenge accuracy gain
    helpful +0.07, random +0.00. The assertion keeps 0.03 of that margin for noise.
    """
    model, train, anchors, challenge, snap = trained
    gains = {}
    for selection in ("helpful", "random"):
        m = copy.deepcopy(model)
        influence = InfluenceModule(
            m, train_dataset=train, snapshot=snap, num_candidates=120, ihvp=fast_lissa(), compute={"progress": False}
        )
        report = correct_errors(
            m, influence, anchors, num_steps=6, lr=0.1, selection=selection, eval_dataset=challenge, seed=0
        )
        assert len(report.steps) == 6
        assert all(len(s.chosen_indices) == 10 for s in report.steps)
        gains[selection] = report.accuracy_after - report.accuracy_before
    assert gains["helpful"] > gains["random"] + 0.03, gains


def test_selection_orders_by_score(trained):
    model, train, anchors, challenge, snap = trained
    m = copy.deepcopy(model)
    influence = InfluenceModule(
        m, train_dataset=train, snapshot=snap, num_candidates=50, ihvp=fast_lissa(), compute={"progress": False}
    )
    helpful = correct_errors(m, influence, anchors, num_steps=1, lr=1e-12, selection="helpful", top_m=5)
    harmful = correct_errors(m, influence, anchors, num_steps=1, lr=1e-12, selection="harmful", top_m=5)
    h, b = helpful.steps[0].chosen_scores, harmful.steps[0].chosen_scores
    assert h == sorted(h, reverse=True)
    assert b == sorted(b)
    assert min(h) > max(b)
    assert set(helpful.steps[0].chosen_indices).isdisjoint(harmful.steps[0].chosen_indices)


def test_callback_in_trainer_runs_changes_weights_and_logs(tmp_path):
    pl.seed_everything(1)
    train, anchors, challenge = cue_problem()
    model = CueNet()
    correction = ErrorCorrection(
        anchors=anchors,
        eval_dataset=challenge,
        epochs=[0],
        on_fit_end=True,
        steps=CorrectionArguments(num_steps=2, lr=0.05),
        num_candidates=60,
        ihvp=fast_lissa(),
        dirpath=str(tmp_path / "corr"),
    )

    class Watch(pl.Callback):
        """Records the weights just before and after the epoch-0 correction, and that training continued."""

        def __init__(self) -> None:
            self.epochs_started = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.epochs_started.append(trainer.current_epoch)

    watch = Watch()
    logger = CSVLogger(tmp_path, name="logs")
    trainer = fit(
        model,
        train,
        tmp_path,
        epochs=2,
        callbacks=[FeatureSnapshot(dirpath=tmp_path / "snap", every_n_epochs=1), correction, watch],
        logger=logger,
    )
    assert watch.epochs_started == [0, 1]  # the Trainer went on fitting after the correction
    assert [h["moment"] for h in correction.history] == ["epoch=0", "fit_end"]
    first = correction.history[0]
    assert len(first["steps"]) == 2
    assert first["metric"] == "accuracy"
    assert first["accuracy_before"] == first["metric_before"]
    assert any(s["anchor_loss_after"] != s["anchor_loss_before"] for s in first["steps"])  # the weights moved
    saved = json.loads((tmp_path / "corr" / "correction.json").read_text())
    assert saved["done"] == ["epoch=0", "fit_end"]
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "fastif/correction/acc_before" in logged
    assert "fastif/correction/acc_after" in logged
    assert trainer.state.finished


def test_auto_scale_is_estimated_once_and_restored(trained):
    model, train, anchors, challenge, snap = trained
    m = copy.deepcopy(model)
    auto = LiSSA(damping=0.1, scale="auto", recursion_depth=30, batch_size=16, residual_examples=0, scale_batches=2)
    influence = InfluenceModule(
        m, train_dataset=train, snapshot=snap, num_candidates=40, ihvp=auto, compute={"progress": False}
    )
    seen, reused = [], []
    original = influence.score_batch

    def spy(*args, **kwargs):
        seen.append(influence.ihvp.scale)
        reused.append(influence.ihvp._reused_scale)
        return original(*args, **kwargs)

    influence.score_batch = spy
    correct_errors(m, influence, anchors, num_steps=3, lr=0.01)
    assert seen == ["auto", "auto", "auto"]  # still "auto": a divergence may double the scale
    assert reused[1] is not None
    assert reused[1] == reused[2]
    assert influence.ihvp is auto  # the caller's estimator is given back unchanged
    assert auto.scale == "auto"


def test_misclassified_anchors_and_downweight(trained, tmp_path):
    model, train, anchors, challenge, snap = trained
    m = copy.deepcopy(model)
    wrong = misclassified_indices(m, challenge)
    assert 0 < wrong.numel() < len(challenge)
    before = accuracy(m, challenge)
    influence = InfluenceModule(
        m, train_dataset=train, snapshot=snap, num_candidates=60, ihvp=fast_lissa(), compute={"progress": False}
    )
    report = correct_errors(
        m,
        influence,
        torch.utils.data.Subset(challenge, wrong.tolist()),
        num_steps=2,
        lr=0.05,
        selection="downweight_harmful",
        eval_dataset=challenge,
    )
    assert report.accuracy_before == pytest.approx(before)
    assert len(report.used_indices) == 20


def test_resume_does_not_repeat_a_correction(tmp_path):
    pl.seed_everything(2)
    train, anchors, challenge = cue_problem(n=120)

    def make_cb():
        return ErrorCorrection(
            anchors=anchors,
            epochs=[0],
            on_fit_end=False,
            steps={"num_steps": 1, "lr": 0.05},
            num_candidates=None,
            ihvp=fast_lissa(),
            dirpath=str(tmp_path / "corr"),
        )

    first = make_cb()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(CueNet(), train, tmp_path, epochs=1, callbacks=[first, ckpt], enable_checkpointing=True)
    assert len(first.history) == 1
    resumed = make_cb()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[resumed],
    )
    trainer.fit(CueNet(), DataLoader(train, batch_size=32), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["moment"] for h in resumed.history] == ["epoch=0"]  # restored, not redone
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]  # primitive state loads safely


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"anchors": TensorDataset(torch.zeros(0, 5), torch.zeros(0).long())}, "anchors: expected a non-empty Dataset"),
        ({"num_steps": 0}, "num_steps: expected an integer >= 1, got 0"),
        ({"steps": {"num_steps": 0}}, "num_steps: expected an integer >= 1, got 0"),
        ({"steps": {"numsteps": 3}}, r"steps: CorrectionArguments has no field\(s\) \['numsteps'\]"),
        ({"top_m": 50, "num_candidates": 20}, r"num_candidates: expected None .* >= top_m \(50\), got 20"),
        ({"selection": "best"}, "selection: expected one of .*, got 'best'"),
        ({"harmful_weight": float("nan")}, "harmful_weight: expected a finite number >= 0, got nan"),
        ({"harmful_weight": -1.0}, "harmful_weight: expected a finite number >= 0, got -1.0"),
        ({"harmful_weight": "1"}, "harmful_weight: expected a finite number >= 0, got '1'"),
        ({"anchors": None}, "anchors: expected a Dataset of anchor examples .*, got None"),
        ({"anchors_from": "errors"}, "anchors_from: expected one of \\['dataset', 'misclassified'\\], got 'errors'"),
        ({"epochs": [0, -1]}, r"epochs\[1\]: expected an integer >= 0, got -1"),
        ({"every_n_epochs": 0}, "every_n_epochs: expected an integer >= 1 or None, got 0"),
        ({"on_fit_end": False}, "on_fit_end: expected True when .* never runs"),
        ({"snapshot_dir": 3}, "snapshot_dir: expected a directory path or None, got 3"),
    ],
)
def test_callback_bad_arguments(kwargs, match):
    base = {"anchors": cue_problem(n=10)[1]}
    with pytest.raises(ArgumentError, match=match):
        ErrorCorrection(**{**base, **kwargs})


def test_legacy_flat_arguments_warn_and_equal_the_group():
    anchors = cue_problem(n=10)[1]
    with pytest.warns(
        DeprecationWarning, match=r"steps=CorrectionArguments\(num_steps=\.\.\., lr=\.\.\., seed"
    ) as seen:
        legacy = ErrorCorrection(anchors=anchors, num_steps=3, lr=0.5, seed=4, optimizer="model")
    assert seen[0].filename == __file__  # the warning points at the caller's line
    grouped = ErrorCorrection(
        anchors=anchors, steps=CorrectionArguments(num_steps=3, lr=0.5, seed=4, optimizer="model")
    )
    assert legacy.steps == grouped.steps == CorrectionArguments(num_steps=3, lr=0.5, seed=4, optimizer="model")
    assert (
        legacy.state_key == grouped.state_key == "ErrorCorrection{'selection': 'helpful', 'top_m': 10, 'num_steps': 3}"
    )
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['num_step'\]"):
        ErrorCorrection(anchors=anchors, num_step=3)


def test_core_bad_input(trained):
    model, train, anchors, challenge, snap = trained
    m = copy.deepcopy(model)
    influence = InfluenceModule(
        m, train_dataset=train, snapshot=snap, num_candidates=20, ihvp=fast_lissa(), compute={"progress": False}
    )
    with pytest.raises(ArgumentError, match="anchors: expected a non-empty Dataset, got an empty TensorDataset"):
        correct_errors(m, influence, TensorDataset(torch.zeros(0, 5), torch.zeros(0).long()))
    with pytest.raises(ArgumentError, match="top_m: expected at most the 20 kNN candidates, got 30"):
        correct_errors(m, influence, anchors, top_m=30)
    with pytest.raises(ArgumentError, match="num_steps: expected an integer >= 1, got 0"):
        correct_errors(m, influence, anchors, num_steps=0)
    with pytest.raises(ArgumentError, match="harmful_weight: expected a finite number >= 0, got nan"):
        correct_errors(m, influence, anchors, steps=CorrectionArguments(), harmful_weight=float("nan"))
    bad_anchors = TensorDataset(torch.zeros(4, 3), torch.zeros(4).long())  # wrong feature size for the model
    with pytest.raises(ArgumentError, match="anchors: expected examples the loss function accepts"):
        correct_errors(m, influence, bad_anchors)
    torch.testing.assert_close(
        torch.cat([p.reshape(-1) for p in m.parameters()]),
        torch.cat([p.reshape(-1) for p in model.parameters()]),
        rtol=0,
        atol=0,
    )  # refused input leaves the model as it was


def test_steps_group_equals_flat_keywords(trained):
    model, train, anchors, challenge, snap = trained
    reports = []
    for kwargs in (
        {"num_steps": 2, "lr": 0.05, "top_m": 4},
        {"steps": CorrectionArguments(num_steps=2, lr=0.05, top_m=4)},
    ):
        m = copy.deepcopy(model)
        influence = InfluenceModule(
            m, train_dataset=train, snapshot=snap, num_candidates=30, ihvp=fast_lissa(), progress=False
        )
        reports.append(correct_errors(m, influence, anchors, **kwargs))
    assert reports[0].used_indices == reports[1].used_indices
    assert len(reports[0].used_indices) == 8


class _NaNOnStep:
    """A per-example loss that turns NaN on the ``nan_step``-th training-mode call (the step's gradient)."""

    def __init__(self, nan_step: int) -> None:
        self.nan_step, self.train_calls = nan_step, 0

    def __call__(self, model, batch):
        losses = model.per_example_loss(batch)
        if model.training:
            self.train_calls += 1
            if self.train_calls == self.nan_step + 1:
                return losses * float("nan")
        return losses


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_a_step_that_makes_weights_non_finite_restores_them_and_raises(trained, with_optimizer):
    model, train, anchors, challenge, snap = trained
    settings = CorrectionArguments(num_steps=3, lr=0.05, top_m=5, selection="random", seed=7)
    reference = copy.deepcopy(model)  # the same draws with a finite loss: the points step 1 takes
    full = InfluenceModule(reference, train_dataset=train, num_candidates=None, ihvp=fast_lissa(), progress=False)
    expected = correct_errors(reference, full, anchors, steps=settings).steps[1].chosen_indices

    m = copy.deepcopy(model)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    influence = InfluenceModule(m, train_dataset=train, num_candidates=None, ihvp=fast_lissa(), progress=False)
    optimizer = torch.optim.Adam(m.parameters(), lr=0.05) if with_optimizer else None
    with pytest.raises(NonFiniteError, match=r"step 1 \(selection 'random'.*\) on training indices (\[.*\])") as err:
        correct_errors(m, influence, anchors, steps=settings, loss_fn=_NaNOnStep(1), optimizer=optimizer)
    assert str(expected) in str(err.value)
    assert "body.0.weight" in str(err.value)
    after = m.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # the weights from before step 0, not before step 1
    if optimizer is not None:
        assert optimizer.state_dict()["state"] == {}  # Adam's moments from steps 0 and 1 are gone too


def test_regression_model_with_eval_dataset_reports_the_mean_loss(tmp_path):
    pl.seed_everything(4)
    train, evaluation = regression_problem()
    model = LinearRegressor()
    fit(model, train, tmp_path, epochs=1)
    x, y = evaluation.tensors

    def mse(m):
        with torch.no_grad():
            return float(((m(x) - y) ** 2).mean())

    before = mse(model)
    influence = InfluenceModule(model, train_dataset=train, num_candidates=None, ihvp=fast_lissa(), progress=False)
    report = correct_errors(
        model, influence, evaluation, steps=CorrectionArguments(num_steps=3, lr=0.05, top_m=8), eval_dataset=evaluation
    )
    assert report.metric == "loss"
    assert report.accuracy_before is None
    assert report.accuracy_after is None
    assert report.metric_before == pytest.approx(before, rel=1e-5)
    assert report.metric_after == pytest.approx(mse(model), rel=1e-5)
    assert report.gain == pytest.approx(report.metric_before - report.metric_after)
    assert report.metric_after < report.metric_before  # the most helpful points for the evaluation loss lower it
    with pytest.raises(ArgumentError, match=r"model: expected class scores .* got outputs of shape \(60,\)"):
        accuracy(model, evaluation)


def test_regression_model_in_the_callback(tmp_path):
    pl.seed_everything(5)
    train, evaluation = regression_problem()
    correction = ErrorCorrection(
        anchors=evaluation,
        eval_dataset=evaluation,
        steps=CorrectionArguments(num_steps=2, lr=0.05, top_m=8),
        num_candidates=None,
        ihvp=fast_lissa(),
        dirpath=str(tmp_path / "corr"),
    )
    logger = CSVLogger(tmp_path, name="logs")
    fit(LinearRegressor(), train, tmp_path, epochs=2, callbacks=[correction], logger=logger)
    (entry,) = correction.history
    assert entry["metric"] == "loss"
    assert entry["accuracy_before"] is None
    assert entry["metric_after"] < entry["metric_before"]
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "fastif/correction/loss_before" in logged
    assert "fastif/correction/acc_before" not in logged


def test_whole_batch_forward_with_dict_batches(trained):
    model, train, anchors, challenge, snap = trained
    pl.seed_everything(6)
    net = WholeBatchNet()
    dict_train, dict_challenge = DictDataset(train), DictDataset(challenge)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):  # trained (full batch), so the Hessian is near positive definite for LiSSA
        optimizer.zero_grad()
        net.per_example_loss({"x": train.tensors[0], "label": train.tensors[1]}).mean().backward()
        optimizer.step()
    x, y = challenge.tensors
    with torch.no_grad():
        expected = float((net({"x": x}).argmax(-1) == y).float().mean())
    assert accuracy(net, dict_challenge) == pytest.approx(expected, abs=1e-6)
    assert evaluation_metric(net, dict_challenge) == ("accuracy", pytest.approx(expected, abs=1e-6))
    wrong = misclassified_indices(net, dict_challenge)
    assert wrong.numel() == round((1 - expected) * len(challenge))
    influence = InfluenceModule(net, train_dataset=dict_train, num_candidates=None, ihvp=fast_lissa(), progress=False)
    report = correct_errors(
        net,
        influence,
        DictDataset(anchors),
        steps=CorrectionArguments(num_steps=2, lr=0.05, top_m=5),
        eval_dataset=dict_challenge,
    )
    assert report.metric == "accuracy"
    assert report.metric_before == pytest.approx(expected, abs=1e-6)
    assert report.metric_after == pytest.approx(accuracy(net, dict_challenge))
    assert len(report.used_indices) == 10


def test_model_outputs_hook_order():
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 1, 0])

    class WithLogits(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("logits(batch) comes first")

        def logits(self, batch):
            return torch.ones(len(batch[0]), 3)

    class WithPredictStep(pl.LightningModule):
        def forward(self, x):
            raise AssertionError("predict_step comes before the forward")

        def predict_step(self, batch, batch_idx, dataloader_idx=0):
            return torch.tensor([1, 1, 1, 1])

    class Keywords(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0], -x[:, 0]], 1)

    assert model_outputs(WithLogits(), (x, y)).shape == (4, 3)
    assert model_outputs(WithPredictStep(), (x, y)).tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(model_outputs(Keywords(), {"x": x, "label": y}), torch.stack([x[:, 0], -x[:, 0]], 1))
    data = TensorDataset(x, y)
    assert accuracy(WithPredictStep(), data) == 0.5  # integer predictions [B] count as labels


def test_labels_of():
    y = torch.tensor([1, 0])
    assert labels_of((torch.zeros(2, 3), y)) is y
    assert labels_of([torch.zeros(2, 3), torch.zeros(2), y]) is y
    for key in ("labels", "label", "y", "target", "targets"):
        assert labels_of({"input_ids": torch.zeros(2, 4), key: y}) is y
    assert labels_of({"label": y, "labels": torch.zeros(2)}) is not y  # "labels" is looked up first
    with pytest.raises(ArgumentError, match=r"batch: expected a dict with one of the label keys .*, got a dict"):
        labels_of({"input_ids": torch.zeros(2, 4)})
    with pytest.raises(ArgumentError, match="batch: expected a tuple/list .* got Tensor"):
        labels_of(torch.zeros(2, 3))


def _fitted_line(tmp_path):
    """A LinearRegressor fitted one epoch (seed 8), its evaluation set, and an influence module factory over it."""
    pl.seed_everything(8)
    train, evaluation = regression_problem()
    model = LinearRegressor()
    fit(model, train, tmp_path, epochs=1)

    def make(m):
        return InfluenceModule(m, train_dataset=train, num_candidates=None, ihvp=fast_lissa(), progress=False)

    return model, evaluation, make


def test_compare_selections_on_a_regression_model(tmp_path):
    model, evaluation, make = _fitted_line(tmp_path)
    table = compare_selections(
        model, evaluation, evaluation, make_influence=make, seeds=[0], steps={"num_steps": 2, "lr": 0.05, "top_m": 8}
    )
    for selection in ("helpful", "harmful", "random"):
        row = table[selection]
        assert row["metric"] == "loss"
        assert row["gain_mean"] == pytest.approx(row["before"] - row["after_mean"])
    gains = {k: v["gain_mean"] for k, v in table.items()}
    # Measured (seed 8): helpful 3.84, random 1.19, harmful 0.12; every step on an underfit line lowers the loss.
    assert gains["helpful"] > gains["random"] + 1.0, gains
    assert gains["random"] > gains["harmful"] + 0.5, gains


def test_random_points_at_the_rate_the_helpful_run_chose(tmp_path):
    model, evaluation, make = _fitted_line(tmp_path)
    steps = {"num_steps": 2, "lr": "auto", "top_m": 8}
    common = {"make_influence": make, "seeds": [0, 1], "steps": steps}
    table = compare_selections(
        model, evaluation, evaluation, selections=("helpful", "random"), random_at_lr_of="helpful", **common
    )
    assert list(table) == ["helpful", "random", "random_at_helpful_lr"]
    helpful, matched = table["helpful"]["runs"], table["random_at_helpful_lr"]["runs"]
    assert [r["lr"] for r in matched] == [r["lr"] for r in helpful]
    # the same random points as the plain random run (same seeds), stepped at the helpful run's rate
    assert [r["used_indices"] for r in matched] == [r["used_indices"] for r in table["random"]["runs"]]
    with pytest.raises(ArgumentError, match="random_at_lr_of"):
        compare_selections(model, evaluation, evaluation, selections=("random",), random_at_lr_of="helpful", **common)


def test_default_feature_snapshot_and_error_correction_pair(tmp_path):
    """FeatureSnapshot() with its default directory and ErrorCorrection(num_candidates=...) find each other."""
    pl.seed_everything(9)
    train, anchors, challenge = cue_problem(n=120)
    correction = ErrorCorrection(anchors=anchors, num_candidates=50, ihvp=fast_lissa())
    trainer = fit(CueNet(), train, tmp_path, epochs=1, callbacks=[FeatureSnapshot(), correction])
    assert trainer.state.finished
    (entry,) = correction.history
    assert entry["moment"] == "fit_end"
    assert [len(s["chosen_indices"]) for s in entry["steps"]] == [10] * 10  # the defaults: 10 steps of 10 points
    assert (tmp_path / "fastif_snapshot" / "manifest.json").exists()
    saved = json.loads((tmp_path / "fastif_correction" / "correction.json").read_text())
    assert saved["done"] == ["fit_end"]


class _CountBatches(pl.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


@pytest.mark.parametrize(
    ("kwargs", "snapshot", "match"),
    [
        ({"params": "encoder.*", "num_candidates": None}, False, "params: the pattern 'encoder.\\*' matches no"),
        ({"num_candidates": 50}, False, "snapshot_dir: expected a FeatureSnapshot directory"),
    ],
)
def test_setup_refuses_before_the_first_training_step(tmp_path, kwargs, snapshot, match):
    train, anchors, _ = cue_problem(n=60)
    count = _CountBatches()
    with pytest.raises(ArgumentError, match=match):
        fit(CueNet(), train, tmp_path, epochs=1, callbacks=[ErrorCorrection(anchors=anchors, **kwargs), count])
    assert count.batches == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.timeout(900)
def test_callback_under_ddp_two_processes(tmp_path, monkeypatch):
    """Each rank scores the candidates itself; the points each rank chose (written per rank) must agree, and the
    ranks end with identical weights (the steps go through the DDP strategy, lr="auto" and the guard decide alike)."""
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    pl.seed_everything(3)
    train, anchors, challenge = cue_problem(n=96)
    correction = ErrorCorrection(
        anchors=anchors,
        eval_dataset=challenge,
        epochs=[0],
        on_fit_end=False,
        steps=CorrectionArguments(num_steps=2),
        num_candidates=40,
        ihvp=fast_lissa(),
        dirpath=str(tmp_path / "corr"),
    )
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[
            FeatureSnapshot(dirpath=tmp_path / "snap", every_n_epochs=1),
            correction,
            ChoicesPerRank(str(tmp_path)),
            WeightsPerRank(str(tmp_path)),
        ],
    )
    trainer.fit(CueNet(), DataLoader(train, batch_size=16))
    saved = json.loads((tmp_path / "corr" / "correction.json").read_text())
    assert saved["done"] == ["epoch=0"]
    steps = saved["corrections"][0]["steps"]
    assert len(steps) == 2
    rank0 = json.loads((tmp_path / "choices-rank0.json").read_text())
    rank1 = json.loads((tmp_path / "choices-rank1.json").read_text())
    assert [len(c) for c in rank0] == [10, 10]
    assert rank0 == rank1  # the ranks chose the same points on their own
    assert rank0 == [s["chosen_indices"] for s in steps]  # and stepped on them
    assert saved["corrections"][0]["lr"] in AUTO_RATES
    assert isinstance(saved["corrections"][0]["kept"], bool)
    w0, w1 = (torch.load(tmp_path / f"weights-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(w0, w1)


# -- lr="auto", the guard, the held-out split, the steps through the Trainer ----------------------------------------
class _Scalar(torch.nn.Module):
    """``f(x) = w * x`` with ``w`` one parameter and the squared error: the line search's answer is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def per_example_loss(self, batch):
        x, y = batch
        return (self.w * x - y) ** 2


def test_search_lr_takes_the_grid_point_below_the_best_single_step():
    """From w = 0 on (x=1, y=1) the step is w = 2·lr; the anchors' loss (2·lr - 1)² is lowest at lr 0.3 of the grid
    (0.16; 0.1 gives 0.64, 1.0 gives 1.0), so the answer is the grid point below it, 0.1; the weights come back."""
    from lightning_fastif.lightning.correction_steps import search_lr

    model = _Scalar()
    batch = (torch.ones(1), torch.ones(1))

    def loss(m, b):
        return m.per_example_loss(b)

    lr, trials = search_lr(model, loss, batch, batch)
    assert lr == 0.1
    by_lr = {t["lr"]: t for t in trials}
    assert by_lr[0.0]["anchor_loss"] == 1.0
    assert by_lr[0.3]["anchor_loss"] == pytest.approx(0.16)
    assert by_lr[1.0]["anchor_loss"] == pytest.approx(1.0)
    assert [t["lr"] for t in trials] == [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    assert model.w.item() == 0.0  # restored exactly after every trial
    # Anchors the step cannot help (y = -1 while the chosen point pulls w up): the smallest rate of the grid.
    assert search_lr(model, loss, (torch.ones(1), -torch.ones(1)), batch)[0] == 1e-4


def test_auto_lr_is_searched_on_the_anchors_the_first_points_serve():
    """Anchors that pull ``w`` apart: (x=1, y=1) wants w = 1, (x=1, y=-1) wants w = -1, so from w = 0 every step
    raises the mean loss of the two (a step to w = ±2·lr gives 1 + 4·lr²). One anchor per step: whichever is drawn,
    the most helpful training point is its twin and the step is w = ±2·lr, which takes that anchor's loss to
    (2·lr - 1)². The search minimises that plus the mean of both, 8·lr² - 4·lr + 2 (2 at w = 0): lowest at 0.3 of the
    grid (1.52; 0.1 gives 1.68, 1.0 gives 6), so ``lr="auto"`` takes 0.1 and the step lowers the anchor's loss from
    1 to (0.2 - 1)² = 0.64. Judged on both anchors alone no rate lowers their loss: the old rule fell back to 1e-4,
    a step that does nothing."""
    from lightning_fastif import ExactInverse

    model = _Scalar()
    train = TensorDataset(torch.ones(2), torch.tensor([1.0, -1.0]))
    anchors = TensorDataset(torch.ones(2), torch.tensor([1.0, -1.0]))
    influence = InfluenceModule(model, train_dataset=train, num_candidates=None, ihvp=ExactInverse(damping=0.0))
    report = correct_errors(model, influence, anchors, keep="always", num_anchors=1, top_m=1, num_steps=1)
    step = report.steps[0]
    assert report.lr == 0.1
    assert step.chosen_indices == step.anchor_indices  # the anchor's twin
    assert step.anchor_loss_before == 1.0
    assert step.anchor_loss_after == pytest.approx(0.64)
    assert model.w.item() == pytest.approx(0.2 if step.anchor_indices == [0] else -0.2)
    by_lr = {t["lr"]: t for t in report.lr_trials}
    assert by_lr[0.0]["objective"] == 2.0
    assert by_lr[0.3]["objective"] == pytest.approx(1.52)
    assert by_lr[0.3]["served_loss"] == pytest.approx(0.16)
    assert by_lr[0.3]["anchor_loss"] == pytest.approx(1.36)
    assert by_lr[1.0]["objective"] == pytest.approx(6.0)


def test_search_lr_refuses_a_rate_that_helps_the_served_anchors_less_than_it_costs_the_others():
    """From w = 0 a step on (x=1, y=1) is w = 2·lr: the served anchor (1, 1) gets (2·lr - 1)², the other anchor
    (3, -3) gets 9·(2·lr + 1)², so the sum only rises and the answer is the grid's smallest rate; judged on the
    served anchor alone the answer would be 0.1 (the single-step best 0.3, a grid point below)."""
    from lightning_fastif.lightning.correction_steps import search_lr

    model = _Scalar()
    batch = (torch.ones(1), torch.ones(1))

    def loss(m, b):
        return m.per_example_loss(b)

    assert search_lr(model, loss, batch, batch)[0] == 0.1
    lr, trials = search_lr(model, loss, (3 * torch.ones(1), -3 * torch.ones(1)), batch, served=batch)
    assert lr == 1e-4
    assert trials[0]["objective"] == 10.0
    assert all(t["objective"] > 10.0 for t in trials[1:])
    assert model.w.item() == 0.0


def test_auto_lr_lowers_the_anchors_loss_where_fastifs_1e_4_barely_moves_it(tmp_path):
    pl.seed_everything(4)
    train, evaluation = regression_problem()
    model = LinearRegressor()
    fit(model, train, tmp_path, epochs=1)
    reports = {}
    for lr in ("auto", 1e-4):
        m = copy.deepcopy(model)
        influence = InfluenceModule(m, train_dataset=train, num_candidates=None, ihvp=fast_lissa(), progress=False)
        reports[lr] = correct_errors(m, influence, evaluation, lr=lr, keep="always", top_m=8, num_steps=3)
    auto, fixed = reports["auto"], reports[1e-4]
    # Measured (seed 4): the single-step best on the first step's anchors is 0.1 (their loss 3.26 -> 0.10), so the
    # rate used is 0.03.
    assert auto.lr == 0.03
    assert [t["lr"] for t in auto.lr_trials if not t["allowed"]] == [0.3, 1.0]  # they overshoot the chosen points
    first = auto.steps[0]
    assert first.anchor_loss_after < 0.5 * first.anchor_loss_before  # measured 3.26 -> 1.42
    assert fixed.lr == 1e-4
    assert fixed.lr_trials == []
    for step in fixed.steps:  # measured: under 0.3% per step
        assert abs(step.anchor_loss_after - step.anchor_loss_before) < 0.01 * step.anchor_loss_before


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_keep_improved_rolls_back_a_correction_that_lowers_the_holdout_metric(trained, with_optimizer):
    """The most harmful points at a large rate lower challenge accuracy: keep='improved' restores the exact weights
    (and the optimizer's state), keep='always' keeps the damage; both report the held-out accuracy they saw."""
    model, train, anchors, challenge, snap = trained
    results = {}
    for keep in ("improved", "always"):
        m = copy.deepcopy(model)
        influence = InfluenceModule(
            m, train_dataset=train, snapshot=snap, num_candidates=60, ihvp=fast_lissa(), progress=False
        )
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) if with_optimizer else None
        report = correct_errors(
            m,
            influence,
            anchors,
            steps=CorrectionArguments(num_steps=4, lr=0.5, selection="harmful"),
            optimizer=optimizer,
            keep=keep,
            holdout_dataset=challenge,
            eval_dataset=challenge,
            retain_tolerance=None,  # the held-out guard alone: the same steps under both modes
        )
        results[keep] = (m, report, optimizer)
    m, report, optimizer = results["improved"]
    assert report.holdout_after < report.holdout_before - 0.05  # the correction hurt the held-out accuracy
    assert report.kept is False
    assert torch.equal(_flat(m), _flat(model))  # the weights from before, exactly
    assert report.metric_after == report.metric_before
    assert report.metric_corrected == report.holdout_after < report.metric_before
    assert report.gain == 0.0
    if optimizer is not None:
        assert optimizer.state_dict()["state"] == {}  # the momentum of the undone steps is gone too
    m, report, _ = results["always"]
    assert report.kept is True
    assert report.holdout_after == results["improved"][1].holdout_after  # the same steps, kept this time
    assert report.metric_after == report.metric_corrected < report.metric_before
    assert not torch.equal(_flat(m), _flat(model))


def test_keep_improved_keeps_a_correction_that_helps(trained):
    model, train, anchors, challenge, snap = trained
    m = copy.deepcopy(model)
    influence = InfluenceModule(
        m, train_dataset=train, snapshot=snap, num_candidates=120, ihvp=fast_lissa(), progress=False
    )
    report = correct_errors(m, influence, anchors, num_steps=6, eval_dataset=challenge, seed=0)
    assert report.keep == "improved"
    assert report.kept is True
    assert report.holdout_size == len(anchors) // 2  # the held-out half of the anchors
    assert report.holdout_after >= report.holdout_before
    assert report.gain > 0.0
    assert report.lr in AUTO_RATES


def test_split_holdout_is_deterministic_and_never_overlaps():
    from lightning_fastif.lightning.evaluation import split_holdout

    ids = TensorDataset(torch.arange(41).float().unsqueeze(1), torch.zeros(41).long())

    def rows(part):
        return sorted(int(part.dataset[i][0]) for i in range(len(part)))

    anchors, held = split_holdout(ids, seed=3)
    assert len(held) == 20
    assert len(anchors) == 21
    assert set(rows(anchors)).isdisjoint(rows(held))
    assert sorted(rows(anchors) + rows(held)) == list(range(41))
    again = split_holdout(ids, seed=3)
    assert rows(again[1]) == rows(held)
    assert rows(split_holdout(ids, seed=4)[1]) != rows(held)
    with pytest.raises(ArgumentError, match=r"holdout_dataset: expected held-out examples .*anchors has 1 example"):
        split_holdout(TensorDataset(torch.zeros(1, 1)), seed=0)


def test_callback_holdout_is_never_an_anchor(tmp_path):
    """With misclassified anchors and only eval_dataset, the split is fixed for the whole fit: the anchors come from
    one half, the metric and the guard from the other, and the history and the loggers say what the guard saw."""
    pl.seed_everything(11)
    train, _, challenge = cue_problem()
    correction = ErrorCorrection(
        anchors_from="misclassified",
        eval_dataset=challenge,
        epochs=[0],
        steps=CorrectionArguments(num_steps=2),
        num_candidates=60,
        ihvp=fast_lissa(),
        dirpath=str(tmp_path / "corr"),
    )
    source, held = correction._anchor_source.dataset.indices, correction._holdout.dataset.indices
    assert set(source).isdisjoint(held)
    assert sorted(source + held) == list(range(len(challenge)))
    assert correction._evaluated is correction._holdout
    logger = CSVLogger(tmp_path, name="logs")
    fit(
        CueNet(),
        train,
        tmp_path,
        epochs=2,
        callbacks=[FeatureSnapshot(dirpath=tmp_path / "snap", every_n_epochs=1), correction],
        logger=logger,
    )
    assert [h["moment"] for h in correction.history] == ["epoch=0", "fit_end"]
    for entry in correction.history:
        assert entry["holdout_size"] == len(held)
        assert entry["metric_before"] == entry["holdout_before"]  # the reported metric is the held-out half's
        assert isinstance(entry["lr"], float)
        assert entry["kept"] == (entry["kept_steps"] > 0)
        if entry["kept"]:  # the state kept is never worse on the held-out half than the weights before
            assert entry["holdout_kept"] >= entry["holdout_before"]
    logged = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    for key in ("fastif/correction/kept", "fastif/correction/lr", "fastif/correction/holdout_acc_before"):
        assert key in logged


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda a: ErrorCorrection(anchors=a, keep="sometimes"), r"keep: expected one of \['improved', 'always'\]"),
        (lambda a: ErrorCorrection(anchors=a, keep=True), r"keep: expected one of .*, got True"),
        (lambda a: ErrorCorrection(anchors=a, steps={"lr": "fast"}), r"lr: expected 'auto' or a finite .*'fast'"),
        (lambda a: CorrectionArguments(lr=0), r"lr: expected 'auto' or a finite number > 0, got 0"),
        (lambda a: CorrectionArguments(lr=float("nan")), r"lr: expected 'auto' or a finite number > 0, got nan"),
        (lambda a: CorrectionArguments(lr="AUTO"), r"lr: expected 'auto' or a finite number > 0, got 'AUTO'"),
        (lambda a: ErrorCorrection(anchors=TensorDataset(a.tensors[0][:1], a.tensors[1][:1])), "holdout_dataset"),
    ],
)
def test_bad_keep_and_lr(make, match):
    with pytest.raises(ArgumentError, match=match):
        make(cue_problem(n=10)[1])


def test_correct_errors_bad_keep_fails_before_any_step(trained):
    model, train, anchors, challenge, snap = trained
    m = copy.deepcopy(model)
    influence = InfluenceModule(m, train_dataset=train, num_candidates=None, ihvp=fast_lissa(), progress=False)
    with pytest.raises(ArgumentError, match=r"keep: expected one of \['improved', 'always'\], got 'better'"):
        correct_errors(m, influence, anchors, keep="better")
    with pytest.raises(ArgumentError, match=r"lr: expected 'auto' or a finite number > 0, got -1"):
        correct_errors(m, influence, anchors, lr=-1)
    assert torch.equal(_flat(m), _flat(model))


class _StepHooks(pl.Callback):
    """Counts the Trainer's backward/optimizer hooks that run for an optimizer that is not the Trainer's."""

    def __init__(self) -> None:
        self.backward, self.optimizer_steps = 0, 0

    def on_after_backward(self, trainer, pl_module):
        self.backward += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if optimizer not in trainer.optimizers:
            self.optimizer_steps += 1


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed-scaler"])
def test_callback_steps_go_through_the_trainers_strategy(tmp_path, precision):
    """The correction's steps run the Trainer's backward and optimizer-step hooks, under its precision plugin; with
    fp16 (a GradScaler; on CPU fp16 autocast with a CPU scaler) the scaler counts the correction's steps too."""
    from lightning.pytorch.plugins import MixedPrecision

    pl.seed_everything(12)
    train, anchors, challenge = cue_problem(n=96)
    correction = ErrorCorrection(
        anchors=anchors,
        eval_dataset=challenge,
        steps=CorrectionArguments(num_steps=3, lr=0.05),
        keep="always",
        num_candidates=None,
        ihvp=fast_lissa(),
        dirpath=str(tmp_path / "corr"),
    )
    hooks = _StepHooks()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    kwargs = (
        {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
        if precision == "16-mixed-scaler"
        else {"precision": precision}
    )
    fit(CueNet(), train, tmp_path, epochs=1, callbacks=[correction, hooks], **kwargs)
    (entry,) = correction.history
    assert hooks.optimizer_steps == 3  # the precision plugin ran the correction's optimizer steps
    assert hooks.backward == 3 + 3  # 3 training batches of 32, then the 3 correction steps
    assert entry["lr"] == 0.05
    assert all(s["anchor_loss_after"] < s["anchor_loss_before"] for s in entry["steps"])
    if precision == "16-mixed-scaler":
        assert int(scaler.state_dict()["_growth_tracker"]) == 6  # 3 training and 3 correction steps were scaled


def test_lissa_divergence_after_the_first_step_stops_and_the_guard_judges(trained, monkeypatch):
    from lightning_fastif.errors import LiSSADivergenceError

    model, train, anchors, challenge, snap = trained
    m = copy.deepcopy(model)
    influence = InfluenceModule(m, train_dataset=train, num_candidates=None, ihvp=fast_lissa(), progress=False)
    original, calls = influence.score_batch, []

    def diverge_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise LiSSADivergenceError("LiSSA diverged at step 7")
        return original(*args, **kwargs)

    monkeypatch.setattr(influence, "score_batch", diverge_at_step_2)
    with pytest.warns(RuntimeWarning, match="stopped before step 2: LiSSA diverged at step 7"):
        report = correct_errors(m, influence, anchors, steps=CorrectionArguments(num_steps=5, lr=0.01))
    assert len(report.steps) == 2
    assert report.stopped == "step 2: LiSSA diverged at step 7"
    assert report.holdout_after is not None
    calls.clear()
    monkeypatch.setattr(influence, "score_batch", lambda *a, **k: (_ for _ in ()).throw(LiSSADivergenceError("x")))
    with pytest.raises(LiSSADivergenceError):  # at the first step the settings are wrong: raised
        correct_errors(m, influence, anchors, steps=CorrectionArguments(num_steps=5, lr=0.01))


@pytest.mark.slow
def test_bench_correction_smoke_keeps_the_contract_and_the_guard():
    """``benchmarks/bench_correction.py --smoke`` (both tasks, one seed, 2 steps): the section's contract, and the
    guard never kept a correction that lowered the held-out accuracy."""
    from benchmarks import bench_correction

    out = bench_correction.run(smoke=True, threads=1)
    assert set(out) >= {"name", "title", "headline", "markdown", "details"}
    assert out["markdown"].startswith("| task | selection |")
    assert "| --- |" in out["markdown"]
    summary = out["details"]["summary"]
    for task in ("digits", "tabular"):
        assert summary[task]["guard_never_lowered_holdout"] is True
        for selection in bench_correction.SELECTIONS:
            assert summary[task][selection]["runs"] == 1
            assert summary[task][selection]["kept_lowering_holdout"] == 0


def test_compare_with_random_is_undone_and_reported_beside_the_correction(tmp_path):
    """The comparison runs from the same weights as the correction and leaves no trace on them: the weights after a
    fit with ``compare_with="random"`` equal those of the same fit without it, and both gains are in the history."""

    def run(compare_with, root):
        pl.seed_everything(1)
        train, anchors, challenge = cue_problem()
        model = CueNet()
        correction = ErrorCorrection(
            anchors=anchors,
            eval_dataset=challenge,
            keep="always",
            steps=CorrectionArguments(num_steps=2, lr=0.05),
            num_candidates=None,
            ihvp=fast_lissa(),
            compare_with=compare_with,
            dirpath=str(root / "corr"),
        )
        fit(model, train, root, epochs=1, callbacks=[correction], logger=CSVLogger(root, name="logs"))
        return model, correction.history

    plain, plain_history = run(None, tmp_path / "plain")
    compared, history = run("random", tmp_path / "compared")
    for a, b in zip(plain.state_dict().values(), compared.state_dict().values()):
        torch.testing.assert_close(a, b)
    [entry] = history
    assert "comparison" not in plain_history[0]
    assert entry["gain"] == pytest.approx(plain_history[0]["gain"])
    other = entry["comparison"]
    assert other["selection"] == "random"
    assert other["metric_before"] == pytest.approx(entry["metric_before"])  # the same starting weights
    assert other["gain"] == pytest.approx(other["metric_after"] - other["metric_before"])
    helpful_points = {i for s in entry["steps"] for i in s["chosen_indices"]}
    random_points = {i for s in other["steps"] for i in s["chosen_indices"]}
    assert helpful_points != random_points
    logged = (tmp_path / "compared" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "fastif/correction/random_gain" in logged
    assert "fastif/correction/gain" in logged


def test_compare_with_names_the_argument():
    train, anchors, challenge = cue_problem()
    with pytest.raises(ArgumentError, match="compare_with: expected one of"):
        ErrorCorrection(anchors=anchors, eval_dataset=challenge, compare_with="best")
