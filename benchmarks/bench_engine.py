"""Engine throughput: scoring candidates by JVP against plain training, and s_test for 64 test points against 1.

Measured (issue 2, issue 7 item 2), every ratio timed interleaved on the same batches:

* **candidate scoring** against one ``s_test``: examples/s of ``FunctionalLoss.directional_derivatives`` (the JVP path
  used for kNN candidates), also with the candidates gathered from a dataset by index (``score_candidates``, what
  the kNN path really runs), as a fraction of plain training throughput (forward + backward + optimizer step, train
  mode, same batch size). Goal >= 0.5 (1.0 is the limit). Per-example gradients (``vmap``) for contrast.
* **s_test for 64 test points at once vs 1**: per-example test gradients plus a LiSSA solve with a fixed depth,
  minibatch and scale. Goal <= 4x the cost of one.

Models: (a) a 3-layer MLP, 784-100-50-10 (84,060 parameters); (b) a small conv net on 28x28 inputs; (c) a tiny BERT
(``transformers`` ``BertConfig``, eager attention, 2 layers, hidden 128). Inputs are random: throughput does not
depend on the data. Where a goal is missed, the top operators of a ``torch.profiler`` trace are listed.

Run: ``python -m benchmarks.bench_engine [--smoke] [--threads 1]``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from benchmarks.common import (
    PeakMemory,
    goal,
    interleaved,
    markdown_table,
    module_main,
    set_threads,
)
from lightning_fastif import FunctionalLoss, HessianOperator, IndexedData, LiSSA, evaluating, score_candidates

THROUGHPUT_GOAL = 0.5
STEST_GOAL = 4.0


@dataclass
class Workload:
    """A model, its per-example loss, one batch of ``batch_size`` examples and a dataset to gather candidates from."""

    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batch: Any
    dataset: Dataset
    batch_size: int
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    detail: str

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def cross_entropy(model: nn.Module, batch: Any) -> Tensor:
    """Per-example cross-entropy of ``(x, y)``."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


class _TupleData(Dataset):
    """``(x, y)`` items (a plain map-style dataset, gathered item by item as a user's dataset would be)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class _TokenData(Dataset):
    """Dict items ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, ids: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def mlp_workload(batch_size: int = 256, pool: int = 4) -> Workload:
    """The 784-100-50-10 ReLU MLP (84,060 parameters) of issue 2's prototype."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10)
    )
    x, y = torch.randn(pool * batch_size, 1, 28, 28), torch.randint(0, 10, (pool * batch_size,))
    return Workload(
        "MLP 784-100-50-10",
        model,
        cross_entropy,
        (x[:batch_size], y[:batch_size]),
        _TupleData(x, y),
        batch_size,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        "28x28 inputs, SGD+momentum",
    )


def conv_workload(batch_size: int = 128, pool: int = 4) -> Workload:
    """Two 3x3 conv layers (16, 32 channels) with max-pooling and a linear head on 28x28 inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )
    x, y = torch.randn(pool * batch_size, 1, 28, 28), torch.randint(0, 10, (pool * batch_size,))
    return Workload(
        "ConvNet 2x conv3x3",
        model,
        cross_entropy,
        (x[:batch_size], y[:batch_size]),
        _TupleData(x, y),
        batch_size,
        lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9),
        "28x28 inputs, SGD+momentum",
    )


def bert_workload(
    batch_size: int = 32, seq_len: int = 64, hidden: int = 128, layers: int = 2, pool: int = 4
) -> Workload:
    """A tiny BERT classifier (random weights, eager attention: the CPU SDPA kernel has no forward-mode AD)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=max(128, seq_len),
        num_labels=2,
    )
    model = BertForSequenceClassification._from_config(config, attn_implementation="eager")
    n = pool * batch_size
    ids = torch.randint(0, 1000, (n, seq_len))
    mask = torch.ones(n, seq_len, dtype=torch.long)
    mask[:, (3 * seq_len) // 4 :] = 0  # a quarter of padding, as in real batches

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        # A 4-D additive mask: HF's 2-D mask path has data-dependent control flow that vmap cannot run.
        additive = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        logits = m(input_ids=batch["input_ids"], attention_mask=additive).logits
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    labels = torch.randint(0, 2, (n,))
    data = _TokenData(ids, mask, labels)
    batch = {"input_ids": ids[:batch_size], "attention_mask": mask[:batch_size], "labels": labels[:batch_size]}
    return Workload(
        f"tiny BERT {layers}x{hidden}",
        model,
        loss_fn,
        batch,
        data,
        batch_size,
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4),
        f"length {seq_len}, eager attention, dropout 0.1 in training, AdamW",
    )


# -- throughput -----------------------------------------------------------------------------------------------------
def throughput(work: Workload, *, repeats: int, warmup: int) -> dict[str, Any]:
    """Examples/s of training, JVP scoring (with and without gathering), vmap per-example gradients."""
    model, batch, size = work.model, work.batch, work.batch_size
    optimizer = work.optimizer(model)
    function = FunctionalLoss(model, work.loss_fn)
    s_test = torch.randn(1, function.num_params) / function.num_params**0.5
    data = IndexedData(work.dataset)
    candidates = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))[:size].unsqueeze(0)

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        work.loss_fn(model, batch).mean().backward()
        optimizer.step()

    def jvp_scores() -> None:
        with evaluating(model):
            function.directional_derivatives(batch, s_test)

    def gathered_scores() -> None:
        with evaluating(model):
            score_candidates(function, data, s_test, candidates, batch_size=size, method="jvp")

    def vmap_grads() -> None:
        with evaluating(model):
            function.per_example_gradients(batch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = interleaved(
            {"train": train_step, "jvp": jvp_scores, "gathered": gathered_scores, "vmap": vmap_grads},
            repeats=repeats,
            warmup=warmup,
        )
        memory = {}
        for key, fn in (("train", train_step), ("jvp", jvp_scores), ("vmap", vmap_grads)):
            with PeakMemory() as mem:
                fn()
            memory[key] = mem.delta_mb
    rate = {k: size / t.median for k, t in timings.items()}
    return {
        "model": work.name,
        "params": work.num_params,
        "batch_size": size,
        "detail": work.detail,
        "train_per_s": rate["train"],
        "jvp_per_s": rate["jvp"],
        "gathered_per_s": rate["gathered"],
        "vmap_per_s": rate["vmap"],
        "jvp_ratio": rate["jvp"] / rate["train"],
        "gathered_ratio": rate["gathered"] / rate["train"],
        "vmap_ratio": rate["vmap"] / rate["train"],
        "spread": max(t.spread for t in timings.values()),
        "peak_mb": memory,
        "_fns": {"train": train_step, "jvp": jvp_scores},
    }


# -- s_test scaling -------------------------------------------------------------------------------------------------
def stest_scaling(
    work: Workload, *, counts: tuple[int, ...], depth: int, lissa_batch: int, repeats: int, warmup: int
) -> dict[str, Any]:
    """Seconds for s_test of ``V`` test points in one solve (test gradients + LiSSA at a fixed scale and depth)."""
    model = work.model
    function = FunctionalLoss(model, work.loss_fn)
    operator = HessianOperator(model, None, work.dataset, function=function)
    data = IndexedData(work.dataset)
    with evaluating(model):
        scale = LiSSA(damping=0.01, scale="auto", batch_size=lissa_batch, seed=3).resolve_scale(operator)
    lissa = LiSSA(damping=0.01, scale=scale, recursion_depth=depth, batch_size=lissa_batch, residual_examples=0)
    tests = {v: data.gather(torch.arange(v)) for v in counts}

    def solve(v: int) -> Callable[[], None]:
        def call() -> None:
            with evaluating(model):
                lissa.solve(operator, function.per_example_gradients(tests[v]))

        return call

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = interleaved({str(v): solve(v) for v in counts}, repeats=repeats, warmup=warmup)
    base = timings[str(counts[0])].median
    return {
        "model": work.name,
        "params": work.num_params,
        "depth": depth,
        "lissa_batch": lissa_batch,
        "scale": scale,
        "seconds": {v: timings[str(v)].median for v in counts},
        "ratio": {v: timings[str(v)].median / base for v in counts},
        "_solve": solve(counts[-1]),
    }


def top_operators(fn: Callable[[], None], limit: int = 6) -> list[list[Any]]:
    """``[[operator, self CPU %, calls]]`` of one call of ``fn`` under ``torch.profiler`` (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key, 100.0 * e.self_cpu_time_total / total, e.count] for e in events[:limit]]


# -- the module -----------------------------------------------------------------------------------------------------
def run(*, smoke: bool = False, threads: int = 1) -> dict[str, Any]:
    """Measure the engine's throughput ratios; see the module docstring. Returns the benchmark dict."""
    set_threads(threads)
    if smoke:
        works = [mlp_workload(32, pool=2), conv_workload(16, pool=2), bert_workload(4, 16, 32, 1, pool=2)]
        repeats, warmup, counts, depth = 1, 1, (1, 4), 2
    else:
        works = [mlp_workload(), conv_workload(), bert_workload()]
        repeats, warmup, counts, depth = 7, 2, (1, 8, 64), 50
    tp = [throughput(w, repeats=repeats, warmup=warmup) for w in works]
    # The transformer's s_test ratio is the same story at a higher cost. Every LiSSA step costs the same, so the
    # ratio does not depend on the depth: the conv net, whose 64-vector steps are slow, runs a shorter recursion.
    stest_works = list(zip(works[:2], (depth, max(1, depth // 5))))
    st = [
        stest_scaling(w, counts=counts, depth=d, lissa_batch=8, repeats=max(1, repeats // 2), warmup=min(1, warmup))
        for w, d in stest_works
    ]
    headline_tp = tp[0]["jvp_ratio"]
    headline_st = st[0]["ratio"][counts[-1]]

    rows = [
        [
            r["model"],
            r["params"],
            r["batch_size"],
            r["train_per_s"],
            r["jvp_per_s"],
            r["jvp_ratio"],
            r["gathered_ratio"],
            r["vmap_ratio"],
            f"{r['peak_mb']['jvp']:.0f} / {r['peak_mb']['vmap']:.0f}",
            goal(r["jvp_ratio"], THROUGHPUT_GOAL),
        ]
        for r in tp
    ]
    parts = [
        f"Candidate scoring against one s_test, examples/s, {threads} thread(s), median of {repeats} interleaved "
        "repeats. *train*: forward + backward + optimizer step in train mode; *JVP*: "
        "`FunctionalLoss.directional_derivatives`; *gathered*: `score_candidates` with the batch gathered by index "
        "from a dataset (the kNN path); *vmap*: materialised per-example gradients. Goal: JVP/train >= 0.5.",
        "",
        markdown_table(
            [
                "model",
                "params",
                "batch",
                "train ex/s",
                "JVP ex/s",
                "JVP / train",
                "gathered / train",
                "vmap / train",
                "peak MB JVP / vmap",
                "goal >= 0.5",
            ],
            rows,
        ),
        "",
    ]
    st_rows = []
    for r in st:
        for v in counts:
            st_rows.append(
                [
                    r["model"],
                    v,
                    r["seconds"][v],
                    r["ratio"][v],
                    v / r["ratio"][v],
                    f"{r['depth']} x batch {r['lissa_batch']}",
                    goal(r["ratio"][v], STEST_GOAL, at_least=False) if v == counts[-1] else "",
                ]
            )
    parts += [
        f"s_test (test gradients + LiSSA, fixed scale, damping 0.01) for V test points in one solve, against V = "
        f"{counts[0]}. Goal: V = {counts[-1]} costs <= 4x one.",
        "",
        markdown_table(
            [
                "model",
                "V",
                "seconds",
                f"x cost of {counts[0]}",
                "test points/s vs V=1",
                "LiSSA depth x batch",
                "goal <= 4x",
            ],
            st_rows,
        ),
        "",
    ]
    profiles: dict[str, Any] = {}
    for r, w in zip([] if smoke else tp, works):
        if r["jvp_ratio"] < THROUGHPUT_GOAL:
            profiles[f"jvp {w.name}"] = top_operators(r["_fns"]["jvp"])
    for r in [] if smoke else st:
        if r["ratio"][counts[-1]] > STEST_GOAL:
            profiles[f"s_test V={counts[-1]} {r['model']}"] = top_operators(r["_solve"])
    for title, ops in profiles.items():
        parts += [
            f"Where the time goes ({title}, goal missed; torch.profiler, self CPU time):",
            "",
            markdown_table(["operator", "self CPU %", "calls"], ops),
            "",
        ]
    if profiles and not smoke:
        parts.append(
            "Reading: with V vectors every LiSSA step computes V Hessian-vector products and updates a [V, P] "
            "iterate, so on a CPU its work and memory traffic grow about linearly with V once the fixed per-step "
            "cost (Python, the forward pass, small kernels) is amortised: batching 64 test points still raises the "
            "test points per second several-fold (column *test points/s*), but cannot reach 4x the cost of one. "
            "Engine overheads on top: fresh [V, P] temporaries in the LiSSA update (`h = v + (1-damp)h - Hh/scale`: "
            "the add/sub/div/mul rows) and `torch.cat` of the HVP parts (page faults on every step here); and the "
            "batched second backward (`autograd.grad(..., is_grads_batched=True)`) has no batching rule for "
            "`convolution_backward`, so for conv nets it loops over the V vectors (see the call counts)."
        )
    details = {
        "throughput": [{k: v for k, v in r.items() if not k.startswith("_")} for r in tp],
        "stest": [{k: v for k, v in r.items() if not k.startswith("_")} for r in st],
        "profiles": profiles,
        "threads": threads,
        "repeats": repeats,
    }
    return {
        "name": "engine",
        "title": "Engine: candidate-scoring throughput and s_test batching",
        "headline": {"grad_throughput_ratio": headline_tp, "stest_64_vs_1": None if smoke else headline_st},
        "markdown": "\n".join(parts).rstrip() + "\n",
        "details": details,
    }


if __name__ == "__main__":
    module_main(run, __doc__.splitlines()[0])
