"""Peers on the same models and data: Captum, Kronfluence and dattri against lightning_fastif.

Each peer is an :class:`~benchmarks.bench_quality.Attributor` evaluated on the three ground-truth tasks of
:mod:`benchmarks.bench_quality` (leave-one-out on a logistic regression, LDS and mislabel detection on a digits MLP):
the same trained model, the same training and test points, the same damping where the peer has one. Peers are
benchmark-only dependencies (the ``bench`` extra, ``make install-bench``) and are imported lazily; a peer that is
not installed or fails on a task gets a row that says why.

Rows:

* Captum ``TracInCP`` (one checkpoint, all layers: gradient dot products), ``TracInCPFast`` (last layer only),
  ``ArnoldiInfluenceFunction`` (low-rank inverse Hessian, Schioppa et al. 2022). Captum's Hessian is of the
  *summed* loss, so its ``hessian_reg`` is ``n·λ`` to match our ``λ`` on the mean.
* Kronfluence ``EK-FAC`` (eigenvalue-corrected Kronecker factors; ``damping_factor = λ``; float64).
* dattri ``IFAttributorExplicit`` (explicit Hessian and a solve; ``regularization = λ``).

``seconds_ratio`` is the peer's time over ours (LiSSA) to score every training point against the LDS task's test
points, precomputation (factors, Arnoldi) included, after an untimed warm-up on a tiny problem.

Run: ``python -m benchmarks.bench_peers [--smoke] [--threads 1]``.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_quality import QUALITY_KEYS, Task, evaluate, headline_result, quality_rows, task_notes
from benchmarks.common import set_threads

TIMING_TASK = "lds"


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"{', '.join(missing)} not installed (benchmark-only peers: `make install-bench`, or pip install "
            "captum dattri, then pip install --no-deps kronfluence)"
        )


def _loader(dataset: TensorDataset, batch_size: int | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size or len(dataset), shuffle=False)


class _PeerLosses:
    """Shared helpers: the task's reduction='none' / 'sum' losses as modules, as the peers take them."""

    @staticmethod
    def loss_module(task: Task, reduction: str) -> nn.Module:
        if task.kind == "binary":
            return nn.BCEWithLogitsLoss(reduction=reduction)
        return nn.CrossEntropyLoss(reduction=reduction)


# -- Captum ---------------------------------------------------------------------------------------------------------
class _Column(nn.Module):
    """A binary model's logits ``[B]`` as a column ``[B, 1]``: Captum's fast TracIn needs 2-D model outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).unsqueeze(-1)


class _CaptumBase(_PeerLosses):
    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench_captum_")

    @staticmethod
    def view(task: Task) -> tuple[nn.Module, TensorDataset, tuple[Tensor, Tensor]]:
        """The model, training set and test batch as Captum takes them (binary targets as float columns)."""
        model = copy.deepcopy(task.model).eval()
        (x, y), (xt, yt) = task.train.tensors, task.test.tensors
        if task.kind == "binary":
            return _Column(model), TensorDataset(x, y[:, None].to(x.dtype)), (xt, yt[:, None].to(xt.dtype))
        return model, task.train, (xt, yt)

    def _checkpoint(self, task: Task, model: nn.Module) -> str:
        path = Path(self._tmp.name) / f"{task.name}_{len(task.train)}.pt"
        torch.save(model.state_dict(), path)
        return str(path)

    def _build(self, task: Task) -> tuple[Any, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def scores(self, task: Task) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method, test = self._build(task)
            return method.influence(test, show_progress=False)

    def self_scores(self, task: Task) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method, _ = self._build(task)
            return method.self_influence(show_progress=False)


class CaptumTracInCP(_CaptumBase):
    """Captum ``TracInCP`` at the final checkpoint over all parameters: per-example gradient dot products."""

    name = "Captum TracInCP"

    def _build(self, task: Task) -> Any:
        _require("captum")
        from captum.influence import TracInCP

        model, train, test = self.view(task)
        method = TracInCP(
            model, train, [self._checkpoint(task, model)], loss_fn=self.loss_module(task, "none"), batch_size=256
        )
        return method, test


class CaptumTracInCPFast(_CaptumBase):
    """Captum ``TracInCPFast``: gradient dot products over the last linear layer only, in closed form."""

    name = "Captum TracInCPFast"

    def _build(self, task: Task) -> Any:
        _require("captum")
        from captum.influence import TracInCPFast

        model, train, test = self.view(task)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        method = TracInCPFast(
            model, last, train, [self._checkpoint(task, model)], loss_fn=self.loss_module(task, "sum"), batch_size=256
        )
        return method, test


class CaptumArnoldi(_CaptumBase):
    """Captum ``ArnoldiInfluenceFunction``: top eigenvectors of the Hessian by Arnoldi iteration, then dot products."""

    name = "Captum ArnoldiInfluenceFunction"

    def __init__(self, *, projection_dim: int = 50, arnoldi_dim: int = 200) -> None:
        super().__init__()
        self.projection_dim, self.arnoldi_dim = projection_dim, arnoldi_dim

    def _build(self, task: Task) -> Any:
        _require("captum")
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        params = sum(p.numel() for p in task.model.parameters())
        model, train, test = self.view(task)
        method = ArnoldiInfluenceFunction(
            model,
            train,
            self._checkpoint(task, model),
            loss_fn=self.loss_module(task, "none"),
            batch_size=len(task.train),
            projection_dim=min(self.projection_dim, params - 1),
            arnoldi_dim=min(self.arnoldi_dim, params),
            # Captum's Hessian is the sum over the n training points; ours is their mean.
            hessian_reg=task.damping * len(task.train),
            seed=0,
        )
        return method, test


# -- Kronfluence ----------------------------------------------------------------------------------------------------
def _kronfluence_task(task: Task) -> Any:
    from kronfluence.task import Task as KronTask

    binary = task.kind == "binary"

    class _Task(KronTask):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, y = batch
            out = model(x)
            if binary:
                target = torch.bernoulli(torch.sigmoid(out.detach())) if sample else y.to(out.dtype)
                return F.binary_cross_entropy_with_logits(out, target, reduction="sum")
            if sample:  # labels drawn from the model: the true Fisher, which is the GGN for these losses
                target = torch.multinomial(torch.softmax(out.detach(), -1), 1).flatten()
            else:
                target = y
            return F.cross_entropy(out, target, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return self.compute_train_loss(batch, model, sample=False)

    return _Task()


class KronfluenceEKFAC(_PeerLosses):
    """Kronfluence with EK-FAC factors (float64), ``damping_factor`` = our ``λ``."""

    name = "Kronfluence EK-FAC"

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench_kronfluence_")
        self._count = 0

    def _analyzer(self, task: Task) -> tuple[Any, Any]:
        _require("kronfluence")
        import logging

        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments

        logging.getLogger("kronfluence").setLevel(logging.ERROR)
        self._count += 1
        torch.manual_seed(0)  # the sampled-label Fisher is random
        model = prepare_model(copy.deepcopy(task.model), _kronfluence_task(task))
        analyzer = Analyzer(
            analysis_name=f"{task.name}_{self._count}",
            model=model,
            task=_kronfluence_task(task),
            cpu=True,
            output_dir=self._tmp.name,
            disable_tqdm=True,
            disable_model_save=True,
        )
        dtype = torch.float64
        factor_args = FactorArguments(
            strategy="ekfac",
            activation_covariance_dtype=dtype,
            gradient_covariance_dtype=dtype,
            eigendecomposition_dtype=dtype,
            lambda_dtype=dtype,
        )
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=task.train,
            per_device_batch_size=256,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        return analyzer, self._score_args(task)

    @staticmethod
    def _score_args(task: Task) -> Any:
        from kronfluence.arguments import ScoreArguments

        dtype = torch.float64
        return ScoreArguments(
            damping_factor=task.damping, score_dtype=dtype, per_sample_gradient_dtype=dtype, precondition_dtype=dtype
        )

    def scores(self, task: Task) -> Tensor:
        analyzer, score_args = self._analyzer(task)
        analyzer.compute_pairwise_scores(
            scores_name="pairwise",
            factors_name="ekfac",
            query_dataset=task.test,
            train_dataset=task.train,
            per_device_query_batch_size=len(task.test),
            per_device_train_batch_size=256,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("pairwise")["all_modules"]

    def self_scores(self, task: Task) -> Tensor:
        analyzer, score_args = self._analyzer(task)
        analyzer.compute_self_scores(
            scores_name="self",
            factors_name="ekfac",
            train_dataset=task.train,
            per_device_train_batch_size=256,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_self_scores("self")["all_modules"]


# -- dattri ---------------------------------------------------------------------------------------------------------
def _no_progress(iterable: Any, *args: Any, **kwargs: Any) -> Any:
    return iterable


class DattriExplicit(_PeerLosses):
    """dattri ``IFAttributorExplicit``: the explicit Hessian of the mean training loss, ``regularization = λ``."""

    name = "dattri IFAttributorExplicit"

    def _attributor(self, task: Task) -> Any:
        _require("dattri")
        import dattri.algorithm.base as dattri_base
        from dattri.algorithm import IFAttributorExplicit
        from dattri.task import AttributionTask

        dattri_base.tqdm = _no_progress  # its progress bars would fill the benchmark log

        model = copy.deepcopy(task.model).eval()
        loss = self.loss_module(task, "mean")

        def loss_func(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
            x, y = data
            out = torch.func.functional_call(model, params, (x,))
            return loss(out, y.to(out.dtype) if task.kind == "binary" else y)

        attribution = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
        attributor = IFAttributorExplicit(task=attribution, regularization=task.damping, device="cpu")
        attributor.cache(_loader(task.train))
        return attributor

    def scores(self, task: Task) -> Tensor:
        attributor = self._attributor(task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # One training batch: dattri rebuilds the explicit Hessian for every (train batch, test batch) pair.
            out = attributor.attribute(_loader(task.train), _loader(task.test))
        return out.T

    def self_scores(self, task: Task) -> Tensor:
        attributor = self._attributor(task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # One batch: dattri 0.3.0's self_attribute adds each batch's values to the whole output vector
            # (no batch offset), so it only works when the loader yields the whole set at once.
            return attributor.self_attribute(_loader(task.train))


PEERS = (CaptumTracInCP, CaptumTracInCPFast, CaptumArnoldi, KronfluenceEKFAC, DattriExplicit)


def make_peers(smoke: bool = False) -> list[Any]:
    """One instance of each peer; smaller Arnoldi dimensions at the smoke setting."""
    return [
        CaptumArnoldi(projection_dim=10, arnoldi_dim=20) if smoke and cls is CaptumArnoldi else cls() for cls in PEERS
    ]


def _ratio(peer: dict[str, Any], ours: dict[str, Any]) -> float | None:
    a, b = peer["seconds"].get(TIMING_TASK), ours["seconds"].get(TIMING_TASK)
    if a is None or b is None or TIMING_TASK in peer["errors"] or b <= 0:
        return None
    return a / b


def run(*, smoke: bool = False, threads: int = 1) -> dict[str, Any]:
    """Evaluate every peer and ours (LiSSA) on the shared tasks; see the module docstring."""
    set_threads(threads)
    ours = headline_result(smoke)  # the quality benchmark's row when it ran in this process
    results = [ours]
    for peer in make_peers(smoke):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation chatter of the peers (torch.cuda.amp, tensor copies)
            result = evaluate(peer, smoke=smoke)
        result["seconds_ratio"] = _ratio(result, ours)
        results.append(result)
    peers = {
        r["name"]: {**{k: r.get(k) for k in QUALITY_KEYS}, "seconds_ratio": r.get("seconds_ratio")} for r in results[1:]
    }
    markdown = "\n".join(
        [
            "The same trained models, data and damping as the quality table, one row per peer. *time / ours*: the "
            f"peer's seconds over ours (LiSSA) to score every training point against the {TIMING_TASK.upper()} "
            "task's test points, precomputation (factors, Arnoldi) included. A peer that cannot run here shows why "
            "in *notes*.",
            "",
            quality_rows(results),
            "",
            task_notes(smoke),
        ]
    )
    for r in results:
        r.pop("tracebacks", None)
    return {
        "name": "peers",
        "title": "Peers side by side: Captum, Kronfluence, dattri",
        "headline": {"peers": peers},
        "markdown": markdown + "\n",
        "details": {"methods": results, "timing_task": TIMING_TASK},
    }


if __name__ == "__main__":
    from benchmarks.common import module_main

    module_main(run, __doc__.splitlines()[0])
