"""What every benchmark shares: thread control, timing, memory, correlations, Markdown, machine description.

**The contract of a benchmark module** (``benchmarks/bench_<name>.py``), which :mod:`benchmarks.run_all` relies on::

    def run(*, smoke: bool = False, threads: int = 1) -> dict:
        return {
            "name": "engine",                # short id, used as a section anchor
            "title": "Engine throughput",    # section heading in RESULTS.md
            "headline": {...},               # any of HEADLINE_KEYS (numbers or None), and/or "peers"
            "markdown": "| a | b |\\n...",   # the section's tables and notes, Markdown
            "details": {...},                # raw numbers, JSON-serialisable, kept in results.json
        }

``smoke=True`` must finish in seconds (tiny sizes, one repeat) and return the same keys. ``run_all`` passes only
the keyword arguments a module's ``run`` accepts, and also accepts ``"results"`` for ``"headline"`` and
``"rows"`` (a list of Markdown lines) for ``"markdown"``.

Timing habits (two shared, noisy cores): set the thread count deliberately (:func:`set_threads`), warm up, take the
median of repeats, and measure the two sides of a ratio interleaved (:func:`interleaved`), so that a burst of load
from another process hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# The benchmarks import the correlations from here; their one implementation is the package's.
from lightning_fastif.metrics import pearson, spearman  # noqa: F401

HEADLINE_KEYS = (
    "fastif_speedup",
    "fastif_spearman",
    "fastif_recall10",
    "grad_throughput_ratio",
    "stest_64_vs_1",
    "ddp2_speedup",
    "loo_pearson",
    "mislabel_top10_fraction",
    "lds",
)
"""The headline figures of ``results.json`` (issue 7); ``None`` where not measured."""

PEER_KEYS = ("loo_pearson", "lds", "mislabel_top10_fraction", "seconds_ratio")
"""Per peer in ``results.json["peers"]``: the quality keys and ``seconds_ratio`` (peer time / ours)."""


# -- threads --------------------------------------------------------------------------------------------------------
def set_threads(threads: int) -> int:
    """Fix torch's intra-op thread count (and, when still possible, the inter-op count); return it.

    Two-thread timings on a machine shared with another process varied 3-20x; one thread is the steady default.

    Example::

        >>> set_threads(1)
        1
    """
    if not (isinstance(threads, int) and threads >= 1):
        raise ValueError(f"threads: must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    # The inter-op count is settable only before the first parallel region; the intra-op count is what matters.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    return torch.get_num_threads()


# -- timing ---------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall-clock seconds of repeated calls: ``median`` is what benchmarks report."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """(max − min) / median: how noisy the repeats were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed.

    Example::

        >>> t = time_call(lambda: sum(range(1000)), repeats=3)
        >>> len(t.times), t.median > 0
        (3, True)
    """
    for _ in range(warmup):
        fn()
    timing = Timing()
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        timing.times.append(time.perf_counter() - start)
    return timing


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin (a, b, c, a, b, c, ...), so load bursts hit all of them alike.

    Use it for the two sides of every reported ratio.

    Example::

        >>> out = interleaved({"a": lambda: None, "b": lambda: None}, repeats=2)
        >>> sorted(out), len(out["a"].times)
        (['a', 'b'], 2)
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {name: Timing() for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            out[name].times.append(time.perf_counter() - start)
    return out


# -- memory ---------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float:
    """The resident set size of this process now, in MiB (Linux ``/proc``; 0 elsewhere)."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else 0.0


def peak_rss_mb() -> float:
    """The peak resident set size of this process so far, in MiB.

    Example::

        >>> peak_rss_mb() > 0
        True
    """
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    return kb / 1024


class PeakMemory:
    """Peak RSS growth inside a ``with`` block, sampled by a background thread (the process peak never resets).

    Example::

        >>> with PeakMemory() as mem:
        ...     buf = torch.ones(1_000_000)
        >>> mem.delta_mb >= 0
        True
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_mb = 0.0
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def delta_mb(self) -> float:
        """Peak RSS during the block minus RSS at its start, in MiB."""
        return max(0.0, self.peak_mb - self.start_mb)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start_mb = self.peak_mb = current_rss_mb()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


# -- averages -------------------------------------------------------------------------------------------------------
def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when none)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# -- Markdown and JSON ----------------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant figures, ``None``/NaN as an em dash.

    Example::

        >>> fmt(0.123456), fmt(None), fmt(12345.6), fmt("x")
        ('0.123', '—', '1.23e+04', 'x')
    """
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value != 0 and (abs(value) >= 10 ** (digits + 1) or abs(value) < 10**-(digits)):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub Markdown table; cells go through :func:`fmt`.

    Example::

        >>> print(markdown_table(["a", "b"], [[1, 0.5]]))
        | a | b |
        | --- | --- |
        | 1 | 0.5 |
    """
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"rows: a row has {len(row)} cells, the table has {len(columns)} columns")
        lines.append("| " + " | ".join(fmt(c, digits) for c in row) + " |")
    return "\n".join(lines)


def goal(value: float | None, target: float, *, at_least: bool = True) -> str:
    """``"met"``, ``"NOT met"`` or ``"not measured"``: the plain verdict a row shows next to its goal."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    ok = value >= target if at_least else value <= target
    return "met" if ok else "NOT met"


def jsonable(obj: Any) -> Any:
    """Turn tensors, NaN and numpy scalars into plain JSON values (NaN and inf become ``None``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return jsonable(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# -- machine --------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, load, torch/Python versions, date (UTC)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    return info


# -- one module on its own ------------------------------------------------------------------------------------------
def module_main(run: Callable[..., dict[str, Any]], description: str) -> None:
    """The ``python -m benchmarks.bench_<x>`` entry point: ``--smoke``, ``--threads``, ``--json PATH``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the returned dict here")
    args = parser.parse_args()
    out = run(smoke=args.smoke, threads=args.threads)
    print(f"## {out.get('title', out.get('name', ''))}\n\n{out.get('markdown', '')}\n")
    print(json.dumps(jsonable(out.get("headline", {})), indent=2))
    if args.json is not None:
        write_atomic(args.json, json.dumps(jsonable(out), indent=2) + "\n")


def selection_summary(per_seed: Sequence[Mapping[str, Any]], selection: str) -> dict[str, Any]:
    """One selection's runs over seeds, from per-seed :func:`~lightning_fastif.lightning.correction.compare_selections`
    tables measured with ``also={"test": ...}``: mean and std of the gain (kept weights) and of the corrected weights'
    gain, the mean metric before, the mean test change, the learning rates, and how many runs were kept."""
    runs = [run for s in per_seed for run in s[selection]["runs"]]
    gain_mean, gain_std = mean_std([run["gain"] for run in runs])
    corrected_mean, corrected_std = mean_std([run["corrected"] - run["before"] for run in runs])
    return {
        "gain_mean": gain_mean,
        "gain_std": gain_std,
        "corrected_gain_mean": corrected_mean,
        "corrected_gain_std": corrected_std,
        "before_mean": statistics.fmean(run["before"] for run in runs),
        "test_change_mean": statistics.fmean(
            run["test_after"] - s[selection]["test_before"] for s in per_seed for run in s[selection]["runs"]
        ),
        "lrs": [run["lr"] for run in runs],
        "kept": sum(bool(run["kept"]) for run in runs),
        "runs": len(runs),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
