"""Text: MiniLM end to end. Scoring throughput, the cached frozen prefix, s_test by LiSSA setting, FastIF's experiments.

Four parts, on all-MiniLM-L6-v2 with its top two layers and a linear head trainable (3.55M parameters):

* **Throughput at max length 128** (batches of 16 snippets padded to 128 tokens): a plain training step (forward,
  backward, Adam), JVP candidate scoring (one ``s_test`` direction, the engine's default for kNN candidates) and
  vmap per-example gradients, over the trainable parameters; each as examples per second, interleaved repeats,
  median. The same three on the **cached frozen prefix** (:class:`~examples.text_experiments.CachedTopClassifier`:
  the four frozen layers run once per text, their output stored; only the top layers run), with the one-time cost of
  the prefix. Peak RSS growth of each.
* **s_test by LiSSA setting** (minibatch size, recursion depth) over the same parameters at length 128: seconds for
  one test point, per HVP, and peak RSS growth.
* **FastIF's experiments** (the settings of ``examples/text_*.py``): the spurious-cue drop and the correction table
  (helpful / harmful / random, mean ± std over 5 seeds), simulatability rates (text and digits), recall against k.
  Reports (Markdown, JSON, PNG) go to ``benchmarks/text_reports/``.

Run: ``python -m benchmarks.bench_text [--smoke] [--threads 1]``; also writes ``benchmarks/results_text.json``. One
thread by default: on this shared two-core machine, two threads made a 1024x384x1536 matmul 1.7x slower and small ops
200x slower while other processes held the cores (measured while writing this benchmark).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from benchmarks.common import (
    PeakMemory,
    interleaved,
    jsonable,
    machine_info,
    markdown_table,
    module_main,
    set_threads,
    write_atomic,
)
from examples.text_experiments import (
    CUE_FULL,
    CUE_SMALL,
    DIGITS_FULL,
    DIGITS_SMALL,
    EXPLAIN_FULL,
    EXPLAIN_SMALL,
    TRAIN_FULL,
    TRAIN_SMALL,
    CachedTopClassifier,
    build_text_classifier,
    correction_rows,
    default_ks,
    fixed_lissa,
    influence_on_predictions,
    knn_neighbours,
    knn_recall_curve,
    prefix_hidden_states,
    recall_rows,
    simulatability_experiment,
    simulatability_rates,
    simulatability_rows,
    spurious_cue_experiment,
    train_digits_model,
    train_text_model,
    write_knn_recall_report,
    write_simulatability_report,
    write_spurious_cue_report,
)
from lightning_fastif.core.batches import IndexedData
from lightning_fastif.core.grads import FunctionalLoss, evaluating
from lightning_fastif.core.hessian import HessianOperator
from lightning_fastif.core.ihvp import LiSSA

RESULTS_PATH = Path(__file__).with_name("results_text.json")
REPORTS_DIR = Path(__file__).with_name("text_reports")
LISSA_SETTINGS_FULL = ((1, 20), (4, 10), (8, 10), (16, 5))
LISSA_SETTINGS_SMOKE = ((1, 2), (4, 2))


def _padded_texts(max_length: int, n: int) -> Any:
    """``n`` Rotten Tomatoes training snippets tokenised and padded to ``max_length`` (no per-batch trimming)."""
    from lightning_fastif.app.data import RottenTomatoesDataModule

    dm = RottenTomatoesDataModule(max_train=n, max_eval=8, max_length=max_length)
    dm.setup("fit")
    return dm.train_dataset


def throughput(*, encoder: str, max_length: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Examples/s of training, JVP scoring and per-example gradients: full model vs cached frozen prefix."""
    model = build_text_classifier(encoder, train_layers=2, max_length=max_length, lr=1e-4)
    texts = _padded_texts(max_length, batch_size)
    batch = default_collate([texts[i] for i in range(batch_size)])  # padded to max_length: the stated length
    first = model.num_layers - 2
    start = time.perf_counter()
    cached = prefix_hidden_states(model, DataLoader(texts, collate_fn=default_collate), first, batch_size=batch_size)
    prefix_seconds = time.perf_counter() - start
    head = CachedTopClassifier.from_model(model, first)
    cached_batch = default_collate([cached[i] for i in range(batch_size)])
    assert cached_batch["hidden_states"].shape[1] == max_length

    full_f = FunctionalLoss(model, None, model.trainable_patterns)
    head_f = FunctionalLoss(head, None, head.patterns)
    assert full_f.num_params == head_f.num_params
    direction = torch.randn(full_f.num_params, generator=torch.Generator().manual_seed(0)) * 1e-3
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-6)

    def train_step(m: Any, b: Any) -> None:
        opt.zero_grad()
        m.per_example_loss(b).mean().backward()
        opt.step()

    with evaluating(model):
        # Same scores both ways (the cache is exact): checked once, so the speed comparison compares equals.
        same = torch.allclose(
            full_f.directional_derivatives(batch, direction),
            head_f.directional_derivatives(cached_batch, direction),
            rtol=1e-4,
            atol=1e-6,
        )
        fns = {
            "train": lambda: train_step(model, batch),
            "jvp": lambda: full_f.directional_derivatives(batch, direction),
            "grads": lambda: full_f.per_example_gradients(batch),
            "cached_train": lambda: train_step(head, cached_batch),
            "cached_jvp": lambda: head_f.directional_derivatives(cached_batch, direction),
            "cached_grads": lambda: head_f.per_example_gradients(cached_batch),
        }
        # Memory first, smallest expected footprint first: freed memory stays in the process and would hide the
        # growth of a later, smaller stage. Both the growth and the absolute peak RSS are kept.
        memory, peak = {}, {}
        for name in ("cached_jvp", "jvp", "cached_train", "train", "cached_grads", "grads"):
            with PeakMemory() as mem:
                fns[name]()
            memory[name], peak[name] = mem.delta_mb, mem.peak_mb
        timings = interleaved(fns, repeats=repeats, warmup=1)
    rate = {name: batch_size / t.median for name, t in timings.items()}
    return {
        "encoder": encoder,
        "max_length": max_length,
        "batch_size": batch_size,
        "num_params": full_f.num_params,
        "examples_per_second": rate,
        "seconds_median": {name: t.median for name, t in timings.items()},
        "spread": {name: t.spread for name, t in timings.items()},
        "peak_rss_delta_mb": memory,
        "peak_rss_mb": peak,
        "prefix_seconds_per_example": prefix_seconds / batch_size,
        "cached_equals_full": bool(same),
        "jvp_vs_train": rate["jvp"] / rate["train"],
        "grads_vs_train": rate["grads"] / rate["train"],
        "cached_jvp_speedup": rate["cached_jvp"] / rate["jvp"],
        "cached_grads_speedup": rate["cached_grads"] / rate["grads"],
        "cached_train_speedup": rate["cached_train"] / rate["train"],
    }


def stest_by_setting(*, encoder: str, max_length: int, settings: Any, n_train: int) -> dict[str, Any]:
    """Seconds of one ``s_test`` (one test point) per LiSSA (minibatch, depth), over the top 2 layers + head."""
    model = build_text_classifier(encoder, train_layers=2, max_length=max_length).eval()
    texts = _padded_texts(max_length, n_train)
    train = IndexedData(texts)  # default collate: every minibatch padded to max_length
    f = FunctionalLoss(model, None, model.trainable_patterns)
    start = time.perf_counter()
    base = fixed_lissa(model, train, params=model.trainable_patterns, batch_size=1, recursion_depth=1)
    scale_seconds = time.perf_counter() - start
    g_test = f.per_example_gradients(train.gather([0]))
    operator = HessianOperator(model, None, train, model.trainable_patterns, function=f)
    rows = []
    with evaluating(model):
        for batch_size, depth in settings:
            lissa = LiSSA(
                damping=base.damping,
                scale=base.scale,
                recursion_depth=depth,
                batch_size=batch_size,
                residual_examples=0,
            )
            with PeakMemory() as mem:
                begin = time.perf_counter()
                lissa.solve(operator, g_test)
                seconds = time.perf_counter() - begin
            rows.append(
                {
                    "batch_size": batch_size,
                    "depth": depth,
                    "seconds": seconds,
                    "seconds_per_hvp": seconds / depth,
                    "seconds_per_hvp_example": seconds / (depth * batch_size),
                    "peak_rss_delta_mb": mem.delta_mb,
                }
            )
    return {"rows": rows, "scale": base.scale, "scale_seconds": scale_seconds, "max_length": max_length}


def experiments(*, smoke: bool, report_dir: Path) -> dict[str, Any]:
    """The three text experiments (and digits simulatability) at the examples' settings; reports written."""
    with tempfile.TemporaryDirectory() as workdir:  # the feature snapshot: needed while running, not kept
        return _experiments(smoke=smoke, report_dir=report_dir, workdir=Path(workdir))


def _experiments(*, smoke: bool, report_dir: Path, workdir: Path) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    train_settings = dict(TRAIN_SMALL if smoke else TRAIN_FULL)
    if smoke:
        train_settings["encoder"] = "tiny"
    with PeakMemory() as mem:
        begin = time.perf_counter()
        run = train_text_model(workdir, **train_settings)
    stages["train"] = {
        "seconds": time.perf_counter() - begin,
        "peak_rss_delta_mb": mem.delta_mb,
        "peak_rss_mb": mem.peak_mb,
    }

    with PeakMemory() as mem:
        begin = time.perf_counter()
        cue = spurious_cue_experiment(run, **(CUE_SMALL if smoke else CUE_FULL))
    stages["correction"] = {
        "seconds": time.perf_counter() - begin,
        "peak_rss_delta_mb": mem.delta_mb,
        "peak_rss_mb": mem.peak_mb,
    }
    write_spurious_cue_report(report_dir, run, cue)

    explain = EXPLAIN_SMALL if smoke else EXPLAIN_FULL
    train = run.loader("train")
    with PeakMemory() as mem:
        begin = time.perf_counter()
        ihvp = fixed_lissa(
            run.head, train, recursion_depth=explain["recursion_depth"], batch_size=explain["lissa_batch_size"]
        )
        found = influence_on_predictions(run.head, train, run.loader("test"), ihvp=ihvp, num_test=explain["num_test"])
    stages["full_influence"] = {
        "seconds": time.perf_counter() - begin,
        "peak_rss_delta_mb": mem.delta_mb,
        "peak_rss_mb": mem.peak_mb,
    }

    with PeakMemory() as mem:
        begin = time.perf_counter()
        text_sim = simulatability_rates(
            run.head, train, run.loader("test"), found, k=explain["k"], steps=explain["steps"], lr=explain["lr"]
        )
    text_sim["seconds"] = {"influence": stages["full_influence"]["seconds"], "fine_tuning": time.perf_counter() - begin}
    text_sim["test_accuracy_of_explained"] = float((found["predictions"] == found["labels"]).float().mean())
    stages["simulatability_text"] = {
        "seconds": time.perf_counter() - begin,
        "peak_rss_delta_mb": mem.delta_mb,
        "peak_rss_mb": mem.peak_mb,
    }

    begin = time.perf_counter()
    neighbours = knn_neighbours(run, "test", found["test_indices"])
    ks = default_ks(neighbours.shape[1])
    recall = {
        "ks": ks,
        "recall": knn_recall_curve(found["scores"], neighbours, ks, top=10 if not smoke else 4),
        "num_train": int(neighbours.shape[1]),
        "num_test": int(found["scores"].shape[0]),
        "top": 10 if not smoke else 4,
        "seconds": {"influence": stages["full_influence"]["seconds"], "knn": time.perf_counter() - begin},
    }
    write_knn_recall_report(report_dir, run, recall)

    digits = DIGITS_SMALL if smoke else DIGITS_FULL
    with PeakMemory() as mem:
        begin = time.perf_counter()
        model, dm = train_digits_model(epochs=digits["epochs"])
        digits_sim = simulatability_experiment(
            model,
            dm.train_dataset,
            dm.test_dataset,
            ihvp=LiSSA(damping=0.01, recursion_depth=digits["recursion_depth"], batch_size=8, residual_examples=0),
            num_test=digits["num_test"],
            k=digits["k"],
            steps=digits["steps"],
            lr=digits["lr"],
        )
    stages["simulatability_digits"] = {
        "seconds": time.perf_counter() - begin,
        "peak_rss_delta_mb": mem.delta_mb,
        "peak_rss_mb": mem.peak_mb,
    }
    sims = {"text": text_sim, "digits": digits_sim}
    write_simulatability_report(
        report_dir,
        sims,
        {
            "text": f"{run.info['encoder']}, influence over {', '.join(run.info['influence_params'])}",
            "digits": "DigitsClassifier, all parameters",
        },
    )
    return {"run": run.info, "spurious_cue": cue, "simulatability": sims, "knn_recall": recall, "stages": stages}


def _markdown(tp: dict[str, Any], stest: dict[str, Any], exp: dict[str, Any], threads: int) -> str:
    rate, mem = tp["examples_per_second"], tp["peak_rss_delta_mb"]
    lines = [
        f"{tp['encoder']}, top 2 layers + head ({tp['num_params']:,} parameters), batches of {tp['batch_size']} padded to "
        f"{tp['max_length']} tokens, {threads} thread(s); median of interleaved repeats. Cached: the 4 frozen layers "
        f"run once per text ({tp['prefix_seconds_per_example'] * 1000:.0f} ms per example, one time), only the top 2 "
        f"layers run (scores identical: {'yes' if tp['cached_equals_full'] else 'NO'}).",
        "",
        markdown_table(
            ["stage", "full model ex/s", "cached prefix ex/s", "cached speedup", "RSS growth MB (full / cached)"],
            [
                [
                    "training step",
                    rate["train"],
                    rate["cached_train"],
                    tp["cached_train_speedup"],
                    f"{mem['train']:.0f} / {mem['cached_train']:.0f}",
                ],
                [
                    "JVP candidate scoring",
                    rate["jvp"],
                    rate["cached_jvp"],
                    tp["cached_jvp_speedup"],
                    f"{mem['jvp']:.0f} / {mem['cached_jvp']:.0f}",
                ],
                [
                    "per-example gradients (vmap)",
                    rate["grads"],
                    rate["cached_grads"],
                    tp["cached_grads_speedup"],
                    f"{mem['grads']:.0f} / {mem['cached_grads']:.0f}",
                ],
            ],
        ),
        "",
        f"JVP scoring throughput / training throughput: **{tp['jvp_vs_train']:.2f}** (goal >= 0.9; the prototype "
        f"measured about 0.9). Per-example gradients / training: {tp['grads_vs_train']:.2f}.",
        "",
        f"s_test for one test point by LiSSA setting (length {stest['max_length']}, scale {stest['scale']:.3g} "
        f"estimated once in {stest['scale_seconds']:.0f} s):",
        "",
        markdown_table(
            ["minibatch", "depth", "seconds", "s per HVP", "s per HVP example", "peak RSS +MB"],
            [
                [
                    r["batch_size"],
                    r["depth"],
                    r["seconds"],
                    r["seconds_per_hvp"],
                    r["seconds_per_hvp_example"],
                    r["peak_rss_delta_mb"],
                ]
                for r in stest["rows"]
            ],
        ),
        "",
        "FastIF's one-GPU figures for BERT-base (minibatch, steps): (128, 700) 449 s; (8, 900) 51 s; (1, 1200) 82 s.",
    ]
    cue, run = exp["spurious_cue"], exp["run"]
    lines += [
        "",
        f"**Spurious cue** ({run['encoder']}, {run['sizes']['train']} training snippets, cue "
        f"`{run['cue_word']}`): test {cue['accuracy']['test'] * 100:.1f}%, challenge "
        f"{cue['accuracy']['challenge'] * 100:.1f}% (drop {cue['drop'] * 100:.1f} points). Correction, "
        f"{cue['settings']['num_steps']} steps x {cue['settings']['top_m']} points, lr {cue['settings']['lr']}, "
        f"{len(cue['settings']['seeds'])} seeds from the same weights:",
        "",
        *correction_rows(cue),
        "",
        f"Reference: {cue['fastif_reference']}. Points contradicting the cue among those trained on: "
        + ", ".join(f"{s} {v['cue_disagreeing_fraction'] * 100:.0f}%" for s, v in cue["correction"].items())
        + f" (training set {cue['cue_disagreeing_fraction_train'] * 100:.0f}%).",
        "",
        "**Simulatability** (fine-tune a copy on k points; does p(own prediction) rise?):",
        "",
        *simulatability_rows(exp["simulatability"]),
        "",
        f"**kNN recall** of the full-influence top-{exp['knn_recall']['top']} points among the k nearest "
        f"({exp['knn_recall']['num_test']} test points, N = {exp['knn_recall']['num_train']}):",
        "",
        *recall_rows(exp["knn_recall"]),
        "",
        "Stages (seconds; peak RSS of the process during the stage, and its growth): "
        + "; ".join(
            f"{k} {v['seconds']:.0f} s, {v['peak_rss_mb']:.0f} MB (+{v['peak_rss_delta_mb']:.0f})"
            for k, v in exp["stages"].items()
        )
        + ".",
    ]
    return "\n".join(lines)


def run(*, smoke: bool = False, threads: int = 1) -> dict[str, Any]:
    """Run the four parts (``smoke``: a tiny random BERT, tiny sizes); return the contract's dict.

    With ``FASTIF_BENCH_TEXT_REUSE=1`` in the environment a full run returns the section saved by the last full run
    (``results_text.json``, about 17 minutes to remake on 2 cores), marked as such in its Markdown.
    """
    if not smoke and os.environ.get("FASTIF_BENCH_TEXT_REUSE") == "1" and RESULTS_PATH.exists():
        saved = json.loads(RESULTS_PATH.read_text())
        when = saved.get("details", {}).get("machine", {}).get("date", "an earlier run")
        saved["markdown"] = (
            f"*Reused from the last full run of `python -m benchmarks.bench_text` ({when}); "
            "`FASTIF_BENCH_TEXT_REUSE=1` was set.*\n\n" + saved["markdown"]
        )
        return saved
    threads = set_threads(threads)
    start = time.perf_counter()
    encoder = "tiny" if smoke else "minilm"
    tp = throughput(
        encoder=encoder, max_length=32 if smoke else 128, batch_size=4 if smoke else 16, repeats=1 if smoke else 3
    )
    stest = stest_by_setting(
        encoder=encoder,
        max_length=32 if smoke else 128,
        settings=LISSA_SETTINGS_SMOKE if smoke else LISSA_SETTINGS_FULL,
        n_train=16 if smoke else 64,
    )
    if smoke:
        with tempfile.TemporaryDirectory() as tmp:
            exp = experiments(smoke=True, report_dir=Path(tmp))
    else:
        exp = experiments(smoke=False, report_dir=REPORTS_DIR)
    details = {
        "throughput": tp,
        "stest": stest,
        "experiments": exp,
        "machine": machine_info(threads),
        "seconds": time.perf_counter() - start,
    }
    out = {
        "name": "text",
        "title": "Text: MiniLM end to end (throughput, cached prefix, s_test, FastIF's text experiments)",
        "headline": {},
        "markdown": _markdown(tp, stest, exp, threads),
        "details": jsonable(details),
    }
    if not smoke:
        write_atomic(RESULTS_PATH, json.dumps(jsonable(out), indent=2) + "\n")
    return out


if __name__ == "__main__":
    module_main(run, __doc__.splitlines()[0])
