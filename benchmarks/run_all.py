"""Run every ``benchmarks/bench_*.py`` module and write ``RESULTS.md`` and ``results.json``.

``python -m benchmarks.run_all`` (``make bench``) imports each benchmark module present, calls its
``run(smoke=..., threads=...)`` (only the keyword arguments it accepts; see :mod:`benchmarks.common` for the
contract), and merges what they return:

* ``results.json``: the headline figures of issue 7 at the top level (``fastif_speedup``, ``fastif_spearman``,
  ``fastif_recall10``, ``grad_throughput_ratio``, ``stest_64_vs_1``, ``ddp2_speedup``, ``loo_pearson``,
  ``mislabel_top10_fraction``, ``lds``; ``null`` where not measured), ``peers`` (per peer: the quality keys and
  ``seconds_ratio``), then ``machine``, ``command`` and each module's raw ``details``;
* ``RESULTS.md``: the command, the machine, a headline table with each goal and a plain verdict, then each
  module's section. A module that raises is reported with its error; the others still run.

Options: ``--smoke`` (tiny sizes, seconds per module), ``--threads N`` (default 1), ``--only engine,quality``,
``--skip peers``, ``--out-dir DIR`` (default: this directory for a full run; a smoke or partial run writes files
only where ``--out-dir`` says, so it never overwrites the full results).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    HEADLINE_KEYS,
    PEER_KEYS,
    fmt,
    goal,
    jsonable,
    machine_info,
    markdown_table,
    set_threads,
    write_atomic,
)

BENCH_DIR = Path(__file__).resolve().parent
ORDER = ("fastif", "engine", "knn", "quality", "peers", "trust", "correction", "text")

GOALS: dict[str, tuple[str, float | None, bool]] = {
    # key: (what the goal says, target, at_least)
    "fastif_speedup": (">= 100x", 100.0, True),
    "fastif_spearman": (">= 0.9", 0.9, True),
    "fastif_recall10": (">= 0.8", 0.8, True),
    "grad_throughput_ratio": (">= 0.5 (limit 1.0)", 0.5, True),
    "stest_64_vs_1": ("<= 4x", 4.0, False),
    "ddp2_speedup": (">= 1.7x", 1.7, True),
    "loo_pearson": (">= 0.95 (issue 2)", 0.95, True),
    "mislabel_top10_fraction": ("> 0.10 (random)", 0.10, True),
    "lds": ("none set (higher is better; see peers)", None, True),
}

DESCRIPTIONS = {
    "fastif_speedup": "FastIF mode vs original influence, end-to-end time per test point",
    "fastif_spearman": "Spearman, FastIF vs original scores over the candidates",
    "fastif_recall10": "recall of the original top-10 helpful points",
    "grad_throughput_ratio": "JVP candidate scoring / training throughput (MLP)",
    "stest_64_vs_1": "s_test for 64 test points / for 1 (LiSSA, fixed depth)",
    "ddp2_speedup": "2 DDP ranks vs 1",
    "loo_pearson": "leave-one-out Pearson, logistic regression",
    "mislabel_top10_fraction": "flipped labels in the top 10% by self-influence",
    "lds": "linear datamodeling score, digits MLP",
}


def discover(only: Sequence[str] | None = None, skip: Sequence[str] | None = None) -> list[str]:
    """Module names ``benchmarks.bench_<x>`` present here, filtered by short names (``engine``, ``peers``)."""
    names = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py"))
    short = {n: n.removeprefix("bench_") for n in names}
    # The story's order: the speed-up, then throughput and kNN, then quality and peers; others after, sorted.
    names.sort(key=lambda n: (ORDER.index(short[n]) if short[n] in ORDER else len(ORDER), n))
    if only:
        unknown = sorted(set(only) - set(short.values()))
        if unknown:
            raise ValueError(f"--only: unknown benchmark(s) {unknown}; available: {sorted(short.values())}")
        names = [n for n in names if short[n] in only]
    if skip:
        names = [n for n in names if short[n] not in skip]
    return [f"benchmarks.{n}" for n in names]


def run_module(module_name: str, *, smoke: bool, threads: int) -> dict[str, Any]:
    """Import and run one module; never raises (an error becomes the section's content)."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
        run = module.run
        accepted = inspect.signature(run).parameters
        kwargs = {k: v for k, v in {"smoke": smoke, "threads": threads}.items() if k in accepted}
        out = dict(run(**kwargs))
        error = None
    except Exception as exc:
        out, error = {}, f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=6)
    finally:
        set_threads(threads)  # a module may have changed it
    short = module_name.rsplit(".", 1)[-1].removeprefix("bench_")
    markdown = out.get("markdown")
    if markdown is None and out.get("rows"):
        markdown = "\n".join(str(r) for r in out["rows"])
    return {
        "module": module_name,
        "name": out.get("name", short),
        "title": out.get("title", short),
        "headline": dict(out.get("headline", out.get("results", {})) or {}),
        "markdown": markdown or "",
        "details": out.get("details", {}),
        "error": error,
        "traceback": out.get("traceback"),
        "seconds": time.perf_counter() - start,
    }


def merge_headline(sections: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The headline keys (first non-null value wins, conflicts noted) and the merged ``peers`` object."""
    headline: dict[str, Any] = dict.fromkeys(HEADLINE_KEYS)
    peers: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    source: dict[str, str] = {}
    for section in sections:
        for key, value in section["headline"].items():
            if key == "peers":
                for peer, figures in (value or {}).items():
                    peers.setdefault(peer, dict.fromkeys(PEER_KEYS)).update(
                        {k: v for k, v in (figures or {}).items() if v is not None}
                    )
                continue
            if key not in headline:
                notes.append(f"`{key}` from {section['name']} is not a headline key (kept in details)")
                continue
            if value is None:
                continue
            if headline[key] is not None:
                notes.append(f"`{key}` reported by {source[key]} and {section['name']}; the first is kept")
                continue
            headline[key], source[key] = value, section["name"]
    headline["peers"] = peers
    return headline, notes


def headline_markdown(headline: dict[str, Any]) -> str:
    """The headline table (value, goal, verdict per key) and, when there are peers, the peers table."""
    rows = []
    for key in HEADLINE_KEYS:
        text, target, at_least = GOALS[key]
        value = headline.get(key)
        verdict = (
            "not measured" if value is None else ("—" if target is None else goal(value, target, at_least=at_least))
        )
        rows.append([f"`{key}`", DESCRIPTIONS[key], value, text, verdict])
    table = markdown_table(["key", "what", "value", "goal", "verdict"], rows)
    peers = headline.get("peers") or {}
    if not peers:
        return table
    ours = [headline.get(k) if k != "seconds_ratio" else 1.0 for k in PEER_KEYS]
    peer_rows = [["ours (LiSSA)", *ours]]
    peer_rows += [[name, *(figures.get(k) for k in PEER_KEYS)] for name, figures in peers.items()]
    peer_table = markdown_table(["method", *PEER_KEYS], peer_rows)
    return table + "\n\nPeers on the same models and data (`seconds_ratio` = peer time / ours):\n\n" + peer_table


def results_markdown(
    sections: list[dict[str, Any]],
    headline: dict[str, Any],
    notes: list[str],
    machine: dict[str, Any],
    command: str,
    *,
    smoke: bool = False,
) -> str:
    """The whole ``RESULTS.md``: command, machine, headline table with verdicts, then each module's section."""
    marker = " (SMOKE RUN: tiny sizes, numbers not meaningful)" if smoke else ""
    lines = [
        f"# Benchmark results{marker}",
        "",
        "Written by `benchmarks/run_all.py`; do not edit by hand. Raw numbers: `results.json`.",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "Machine: "
        + ", ".join(
            f"{k.replace('_', ' ')} {fmt(v) if not isinstance(v, list) else ' '.join(map(str, v))}"
            for k, v in machine.items()
            if v is not None
        )
        + ".",
        "",
        "## Headline",
        "",
        headline_markdown(headline),
        "",
    ]
    if notes:
        lines += ["Notes: " + "; ".join(notes) + ".", ""]
    lines += [
        "Each benchmark took: " + ", ".join(f"{s['name']} {s['seconds']:.0f} s" for s in sections) + ".",
        "",
    ]
    for section in sections:
        lines += [f"## {section['title']}", "", f"Module `{section['module']}`.", ""]
        if section["error"]:
            lines += [f"**Failed**: `{section['error'].splitlines()[0][:300]}`", ""]
        if section["markdown"]:
            lines += [section["markdown"].rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the options, run the benchmarks, write ``RESULTS.md`` and ``results.json``; return the JSON dict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds per module)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--only", default="", help="comma-separated short names: engine,quality,peers,...")
    parser.add_argument("--skip", default="", help="comma-separated short names to leave out")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where RESULTS.md and results.json go (default: benchmarks/ for a full run; a smoke or partial run "
        "writes nothing unless given, so it never overwrites the full results)",
    )
    args = parser.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python -m benchmarks.run_all" + ("" if not argv_list else " " + shlex.join(argv_list))
    threads = set_threads(args.threads)
    modules = discover([s for s in args.only.split(",") if s], [s for s in args.skip.split(",") if s])
    sections = []
    for name in modules:
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        section = run_module(name, smoke=args.smoke, threads=threads)
        status = "failed: " + section["error"].splitlines()[0] if section["error"] else "ok"
        print(f"[run_all] {name} {status} ({section['seconds']:.0f} s)", file=sys.stderr, flush=True)
        sections.append(section)
    out_dir = args.out_dir
    if out_dir is None and not (args.smoke or args.only or args.skip):
        out_dir = BENCH_DIR
    if out_dir is None:
        print("[run_all] smoke or partial run: no files written (pass --out-dir to write them)", file=sys.stderr)
    result = write_results(sections, out_dir, command=command, threads=threads, smoke=args.smoke)
    print(headline_markdown(result))
    return result


def write_results(
    sections: list[dict[str, Any]], out_dir: Path | None, *, command: str, threads: int, smoke: bool
) -> dict[str, Any]:
    """Merge the sections, write ``results.json`` and ``RESULTS.md`` (atomically) into ``out_dir`` (nothing when
    ``None``); return the JSON dict."""
    headline, notes = merge_headline(sections)
    machine = machine_info(threads)
    result = {
        **{k: headline[k] for k in HEADLINE_KEYS},
        "peers": headline["peers"],
        "machine": machine,
        "command": command,
        "smoke": smoke,
        "notes": notes,
        "modules": {
            s["name"]: {
                "module": s["module"],
                "seconds": s["seconds"],
                "error": s["error"],
                "traceback": s["traceback"],
                "headline": s["headline"],
                "details": s["details"],
            }
            for s in sections
        },
    }
    result = jsonable(result)
    if out_dir is not None:
        write_atomic(Path(out_dir) / "results.json", json.dumps(result, indent=2) + "\n")
        markdown = results_markdown(sections, headline, notes, machine, command, smoke=smoke)
        write_atomic(Path(out_dir) / "RESULTS.md", markdown)
    return result


if __name__ == "__main__":
    main()
