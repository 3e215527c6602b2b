"""Memory budgets: parse ``max_memory``, measure peak memory per stage, and derive chunk sizes from a budget.

Influence spends its memory in four kinds of work, each linear in the number of examples it processes at once.
:func:`measure_example_cost` measures what one example costs (the bytes autograd saves for the backward pass of one
example, ``a``, by counting them with ``torch.autograd.graph.saved_tensors_hooks``); :func:`plan_chunks` turns
that and a ``max_memory`` budget into chunk sizes, with ``P`` selected parameters of ``s`` bytes and ``V`` test
vectors solved together:

=========================  ==============================  ====================  ===================================
work                       bytes per example               fixed bytes           chunk it sets
=========================  ==============================  ====================  ===================================
per-example gradients      ``3a + 3Ps`` (+ ``Vs`` scores)  ``6VPs``              ``gradient_chunk``
JVP scoring, ``D`` dirs    ``(4 + 4D)·a``                  ``6VPs + DPs``        ``score_chunk``
Hessian-vector products    ``(4 + 5V)·a``                  ``6VPs + 3VPs + Ps``  ``hessian_chunk``
kNN distance block         ``12`` per database row         ``0`` (+ overhead)    ``knn_block_elements``
=========================  ==============================  ====================  ===================================

``6VPs`` is what stays resident while influence runs (test gradients, ``s_test`` and LiSSA's state); every fixed
part also holds :data:`RUNTIME_OVERHEAD` (4 MB: autograd's graph, temporaries, allocator slack), and whatever the
estimator keeps for the whole run (``reserved``: an exact factorisation). The budget is the memory the computation
may add on top of the model and the data already loaded. The multipliers were fitted to peaks measured on CPU and
rounded up: vmap'd gradients take about three gradient-sized copies (a 1.3M-parameter MLP, chunks of 16 to 2048);
forward-mode AD over ``D`` directions up to ``(4 + 4D)·a`` and batched Hessian-vector products over ``V`` vectors
up to ``(4 + 4V)·a`` in one call (tanh and ReLU MLPs, chunks of 128 to 512, ``D`` and ``V`` of 1, 8 and 32: the
tangents of every intermediate activation, not only the saved ones, are batched), and over a loop of chunks glibc
keeps some freed blocks resident (its mmap threshold adapts upwards), hence ``5V`` for the products that full-data
passes repeat. ``tests/test_memory.py`` measures whole runs against the budget;
``benchmarks/bench_trust.py`` reports measured peaks per stage next to it.
A budget that cannot hold one example of some work raises :class:`MemoryBudgetError`, which names ``max_memory``,
the value given and the smallest value that works.

The budget bounds what the computation holds at once. On Linux with glibc, resident memory can sit above that:
glibc raises its mmap threshold as large blocks are freed, and from then on keeps freed blocks of that size in the
heap, resident, for reuse (a LiSSA loop over ``[V, P]`` products measured up to 2.5x its live memory). Run with
``MALLOC_MMAP_THRESHOLD_=65536`` in the environment to make resident memory follow live memory (what
``tests/test_memory.py`` measures against the budget on every path).

:func:`measure_stage` records seconds and peak memory of a block of code without resetting any process-wide
counter: CPU resident memory sampled by a background thread (exact when the block raised the process's high-water
mark, a lower bound otherwise) and CUDA allocated memory where a CUDA device is in use. First calls carry one-off
costs (autograd and ``torch.func`` set up their machinery on first use: about 10 MB on CPU), which a budget does
not include. This module imports no Lightning.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import re
import resource
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_fastif.core.batches import IndexedData, batch_size_of
from lightning_fastif.core.grads import FunctionalLoss, evaluating
from lightning_fastif.errors import ArgumentError, MemoryBudgetError, check_int

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
MAX_CHUNK = 4096
"""Largest chunk a budget yields: bigger chunks buy no speed and only raise the peak."""
RUNTIME_OVERHEAD = 4 * 10**6
"""Bytes every work needs besides its tensors: autograd's graph, temporaries of the update steps, allocator slack
(measured 1-2 MB above the tensor count on the digits CNN; rounded up)."""
KNN_BYTES_PER_ELEMENT = 12
"""float32 similarity, distance and a top-k temporary per (query, database row) of the distance block."""


def parse_memory(value: str | int | float | None, *, name: str = "max_memory") -> int | None:
    """Return a memory size in bytes: ``"4GB"``, ``"512MiB"``, ``"1.5 gb"``, ``2**30``; ``None`` stays ``None``.

    Decimal units are powers of 1000 (``KB``, ``MB``, ``GB``, ``TB``; ``K``/``M``/``G``/``T`` alike), binary units
    powers of 1024 (``KiB``, ``MiB``, ``GiB``, ``TiB``); a bare number is bytes. Case-insensitive.

    Raises:
        ValueError: naming ``name``, the value and the accepted forms, for anything else or a size <= 0.

    Example::

        >>> parse_memory("4GB"), parse_memory("512MiB"), parse_memory(1024)
        (4000000000, 536870912, 1024)
    """
    if value is None:
        return None
    accepted = "a positive number of bytes or a string such as '4GB', '512MiB', '1.5 gb'"
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected {accepted}, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _MEMORY_RE.match(value)
        if match is None or match.group(2).lower() not in _UNITS:
            units = "B, KB, MB, GB, TB (x1000) or KiB, MiB, GiB, TiB (x1024)"
            raise ValueError(f"{name}: cannot read {value!r} as a memory size; expected {accepted} (units: {units})")
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise ValueError(f"{name}: expected {accepted}, got {type(value).__name__} {value!r}")
    size = number * _UNITS[unit]
    if not (math.isfinite(size) and size >= 1):
        raise ValueError(f"{name}: must be at least 1 byte, got {value!r}; expected {accepted}")
    return int(size)


def format_bytes(size: int | float) -> str:
    """A short human-readable size in decimal units that :func:`parse_memory` reads back (``"1.5MB"``).

    Example::

        >>> format_bytes(1_500_000), format_bytes(999)
        ('1.5MB', '999B')
    """
    for unit, factor in (("TB", 1000**4), ("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if size >= factor:
            return f"{size / factor:.3g}{unit}"
    return f"{int(size)}B"


def _round_up(size: int) -> str:
    """A budget string of two significant digits that is at least ``size`` bytes (``"4.2MB"``)."""
    for unit, factor in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000), ("B", 1)):
        if size >= factor or unit == "B":
            scaled = size / factor
            exponent = math.floor(math.log10(scaled)) - 1 if scaled > 0 else 0
            step = 10.0**exponent
            digits = max(-exponent, 0)
            value = math.ceil(round(scaled / step, 9)) * step
            text = f"{value:.{digits}f}{unit}"
            while parse_memory(text) < size:  # float rounding of the step
                value += step
                text = f"{value:.{digits}f}{unit}"
            return text
    return f"{size}B"


# -- peak memory per stage -------------------------------------------------------------------------------------------

SAMPLE_INTERVAL = 0.002
"""Seconds between two samples of the resident memory while a stage is measured."""


def _proc_status() -> dict[str, int]:
    """``VmRSS``/``VmHWM`` of this process in bytes (Linux), else an empty dict."""
    try:
        with open("/proc/self/status") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out


_PAGE_SIZE = resource.getpagesize()


def current_rss() -> int:
    """Resident memory of this process now, in bytes (``/proc/self/statm`` on Linux, else ``psutil``)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return _lifetime_peak()


def _lifetime_peak() -> int:
    """The process's peak resident memory so far (never reset here: other tools read it too)."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes that can be allocated now: free CUDA memory on a CUDA device, else the system's ``MemAvailable``.

    Example::

        >>> available_memory("cpu") > 0
        True
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 10**9  # unknown: assume a modest 1 GB rather than all of it


@dataclass(eq=False)  # identity: two open stages with equal peaks are still different stages
class _OpenStage:
    cpu_peak: int
    cuda_peak: int
    cuda: torch.device | None


class _PeakSampler:
    """One daemon thread that samples this process's resident memory (and CUDA allocated memory) for every open stage.

    No counter of the process is reset (``/proc/self/clear_refs`` and ``torch.cuda.reset_peak_memory_stats``
    would reset peaks that other tools read). What sampling can miss: an allocation that rises and falls between two
    samples (2 ms apart; torch releases the GIL in its kernels, so the thread runs during them), so a sampled peak is
    a lower bound; :func:`measure_stage` replaces it by the exact high-water mark whenever the stage raised the
    process's lifetime peak. Resident memory also counts other threads' allocations made meanwhile.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: list[_OpenStage] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def sample(self) -> None:
        rss = current_rss()
        with self._lock:
            for stage in self._stages:
                stage.cpu_peak = max(stage.cpu_peak, rss)
                if stage.cuda is not None:
                    stage.cuda_peak = max(stage.cuda_peak, int(torch.cuda.memory_allocated(stage.cuda)))

    def open(self, stage: _OpenStage) -> None:
        with self._lock:
            self._stages.append(stage)
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="lightning_fastif-memory", daemon=True)
                self._thread.start()

    def close(self, stage: _OpenStage) -> None:
        self.sample()
        with self._lock:
            self._stages.remove(stage)
            thread = self._thread if not self._stages else None
            if thread is not None:
                self._thread = None
                self._stop.set()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()


_SAMPLER = _PeakSampler()


def _release_free_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``), so RSS growth shows new allocations."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    if device is not None:
        device = torch.device(device)
        return device if device.type == "cuda" else None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


@contextlib.contextmanager
def measure_stage(
    name: str,
    records: dict[str, dict[str, Any]] | None = None,
    *,
    device: torch.device | str | None = None,
    release_heap: bool = False,
) -> Iterator[dict[str, Any]]:
    """Measure the seconds and peak memory of the enclosed block; record them under ``records[name]``.

    The record holds ``seconds``, ``cpu_peak_bytes`` (peak resident memory while the block ran),
    ``cpu_extra_bytes`` (that peak minus the resident memory at entry: what the block added),
    ``cpu_peak_method`` (``"high-water mark"``: the block raised the process's lifetime peak, which is then its
    exact peak; or ``"sampled"``: the largest of samples taken every 2 ms, a lower bound), ``calls``, and with CUDA
    in use ``cuda_peak_bytes``/``cuda_extra_bytes`` (the same two ways, from ``torch.cuda.max_memory_allocated`` and
    samples of ``memory_allocated``). No process-wide counter is reset. Entering the same name again accumulates:
    seconds add up, peaks take the maximum. Stages nest.

    Args:
        name: the stage (``"inverse_hvp"``, ``"scoring"``, ...).
        records: the dict to record into (a new one when ``None``; the record is also yielded).
        device: the device the stage computes on (CUDA peaks are measured for a CUDA device; ``None`` measures the
            current CUDA device if CUDA has been initialised).
        release_heap: first give the heap's free pages back to the OS (glibc ``malloc_trim``), so that memory an
            earlier stage freed does not hide what this one allocates. A process-wide action (later allocations
            fault their pages in again), so off unless asked.

    Example::

        >>> stages = {}
        >>> with measure_stage("alloc", stages):
        ...     _ = torch.zeros(1000, 1000)
        >>> sorted(stages["alloc"])[:3], stages["alloc"]["calls"]
        (['calls', 'cpu_extra_bytes', 'cpu_peak_bytes'], 1)
    """
    records = {} if records is None else records
    cuda = _cuda_device(device)
    if release_heap:
        _release_free_heap()
    start_rss = current_rss()
    start_hwm = _lifetime_peak()
    start_cuda = start_cuda_hwm = 0
    if cuda is not None:
        torch.cuda.synchronize(cuda)
        start_cuda = int(torch.cuda.memory_allocated(cuda))
        start_cuda_hwm = int(torch.cuda.max_memory_allocated(cuda))
    stage = _OpenStage(cpu_peak=start_rss, cuda_peak=start_cuda, cuda=cuda)
    _SAMPLER.open(stage)
    record = records.setdefault(name, {"seconds": 0.0, "calls": 0})
    start = time.perf_counter()
    try:
        yield record
    finally:
        if cuda is not None:
            torch.cuda.synchronize(cuda)
        seconds = time.perf_counter() - start
        _SAMPLER.close(stage)
        hwm = _lifetime_peak()
        exact = hwm > start_hwm
        cpu_peak = max(hwm, stage.cpu_peak) if exact else stage.cpu_peak
        record["seconds"] += seconds
        record["calls"] += 1
        record["cpu_peak_bytes"] = max(record.get("cpu_peak_bytes", 0), cpu_peak)
        record["cpu_extra_bytes"] = max(record.get("cpu_extra_bytes", 0), cpu_peak - start_rss)
        record["cpu_peak_method"] = "high-water mark" if exact else "sampled"
        if cuda is not None:
            cuda_hwm = int(torch.cuda.max_memory_allocated(cuda))
            cuda_peak = cuda_hwm if cuda_hwm > start_cuda_hwm else stage.cuda_peak
            record["cuda_peak_bytes"] = max(record.get("cuda_peak_bytes", 0), cuda_peak)
            record["cuda_extra_bytes"] = max(record.get("cuda_extra_bytes", 0), cuda_peak - start_cuda)


# -- the cost of one example and the chunk sizes it allows ------------------------------------------------------------


@dataclass(frozen=True)
class ExampleCost:
    """What one example costs, measured on a few training examples.

    Attributes:
        activation_bytes: bytes autograd saves for the backward pass, per example (``a``).
        num_params: ``P``, the number of selected parameters.
        itemsize: bytes per parameter (``s``).
        examples: how many examples the measurement used.
    """

    activation_bytes: int
    num_params: int
    itemsize: int
    examples: int

    @property
    def param_bytes(self) -> int:
        """``P·s``: the bytes of one parameter-sized vector."""
        return self.num_params * self.itemsize


def _saved_bytes(function: FunctionalLoss, batch: Any) -> int:
    """Bytes of the distinct storages autograd saves while computing ``batch``'s loss (deduplicated)."""
    seen: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
        return t

    params = {n: p.clone().requires_grad_(True) for n, p in function.primals.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function(params, function.prepare(batch)).sum()
    return sum(seen.values())


def measure_example_cost(function: FunctionalLoss, data: Any, *, sample_size: int = 8) -> ExampleCost:
    """Measure the activation memory of one example: ``(bytes(k examples) − bytes(1)) / (k − 1)``.

    The difference removes what does not grow with the batch (the parameters autograd saves). Measured on the
    first ``sample_size`` examples of ``data`` (a dataset, ``DataLoader`` or :class:`IndexedData`); with variable
    padding, put representative (long) examples first or pass those as ``data``.

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> f = FunctionalLoss(torch.nn.Linear(10, 1), lambda m, b: (m(b[0]).squeeze(-1) - b[1]) ** 2)
        >>> cost = measure_example_cost(f, TensorDataset(torch.randn(8, 10), torch.randn(8)))
        >>> cost.num_params, cost.activation_bytes > 0
        (11, True)
    """
    source = data if isinstance(data, IndexedData) else IndexedData(data)
    k = max(1, min(sample_size, len(source)))
    with evaluating(function.model):
        one = _saved_bytes(function, source.gather([0]))
        if k == 1:
            per_example = one
        else:
            many = source.gather(list(range(k)))
            per_example = max(math.ceil((_saved_bytes(function, many) - one) / (batch_size_of(many) - 1)), 1)
    return ExampleCost(
        activation_bytes=int(per_example),
        num_params=function.num_params,
        itemsize=torch.empty((), dtype=function.dtype).element_size(),
        examples=k,
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Chunk sizes derived from a ``max_memory`` budget (see the module docstring for the cost model).

    Attributes:
        max_memory: the budget in bytes.
        gradient_chunk: examples per per-example-gradient pass (test gradients, ``method="grads"``, self-influence).
        score_chunk: candidates per JVP scoring pass.
        hessian_chunk: examples per HVP pass (``HessianOperator(batch_size=...)``).
        knn_block_elements: elements of one distance block of an exact torch kNN search (``queries × rows``).
        num_vectors: ``V``, the test vectors solved together.
        score_directions: ``D``, directions per JVP pass.
        per_example: bytes per example of each work.
        fixed: bytes each work needs whatever the chunk.
        minimum: the smallest budget that holds one example of every work.
    """

    max_memory: int
    gradient_chunk: int
    score_chunk: int
    hessian_chunk: int
    knn_block_elements: int
    num_vectors: int
    score_directions: int
    per_example: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
    minimum: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for a manifest or a log)."""
        return asdict(self)


_WORK_NAMES = {
    "gradients": "per-example gradients",
    "scoring": "JVP scoring",
    "hvp": "Hessian-vector products",
    "knn": "the kNN distance block",
}


def plan_chunks(
    cost: ExampleCost,
    max_memory: str | int | float,
    *,
    num_vectors: int = 1,
    score_directions: int | None = None,
    knn_rows: int | None = None,
    max_chunk: int = MAX_CHUNK,
    reserved: int = 0,
) -> MemoryPlan:
    """Derive chunk sizes from ``max_memory`` and the measured cost of one example.

    Args:
        cost: from :func:`measure_example_cost`.
        max_memory: the budget (``"4GB"``, bytes, see :func:`parse_memory`).
        num_vectors: ``V``, test vectors solved and kept together (the test batch size; self-influence's chunk).
        score_directions: ``D``, directions per JVP pass (``V`` when every candidate is scored against every test
            point, ``1`` for per-test-point candidates; default ``V``).
        knn_rows: database rows per distance block of a kNN search (``min(N, 65536)``); ``None`` leaves the kNN
            out of the minimum.
        max_chunk: the largest chunk returned.
        reserved: bytes held for the whole run besides the works (an exact solver's factorisation: see
            :meth:`~lightning_fastif.core.ihvp.InverseHVP.reserved_bytes`); added to every work's fixed part.

    Raises:
        MemoryBudgetError: the budget cannot hold one example of some work; the message names ``max_memory``, the
            value, the work and the smallest value that works.

    Example::

        >>> cost = ExampleCost(activation_bytes=4000, num_params=1000, itemsize=4, examples=8)
        >>> plan = plan_chunks(cost, "5MB", num_vectors=2)
        >>> plan.gradient_chunk, plan.hessian_chunk
        (39, 16)
    """
    budget = parse_memory(max_memory)
    if budget is None:
        raise ArgumentError("max_memory: expected a budget for plan_chunks, got None (without one keep fixed chunks)")
    check_int("num_vectors", num_vectors)
    check_int("score_directions", score_directions, allow_none=True)
    directions = num_vectors if score_directions is None else score_directions
    a, pb, v, s = cost.activation_bytes, cost.param_bytes, num_vectors, cost.itemsize
    resident = 6 * v * pb
    per_example = {
        "gradients": 3 * a + 3 * pb + v * s,
        "scoring": (4 + 4 * directions) * a,
        "hvp": (4 + 5 * v) * a,
    }
    resident += RUNTIME_OVERHEAD + check_int("reserved", reserved, minimum=0)
    fixed = {"gradients": resident, "scoring": resident + directions * pb, "hvp": resident + 3 * v * pb + pb}
    if knn_rows is not None:
        per_example["knn"] = KNN_BYTES_PER_ELEMENT * knn_rows
        fixed["knn"] = RUNTIME_OVERHEAD
    needs = {work: fixed[work] + per_example[work] for work in per_example}
    minimum = max(needs.values())
    if budget < minimum:
        worst = max(needs, key=needs.__getitem__)
        raise MemoryBudgetError(
            f"max_memory: {max_memory!r} ({format_bytes(budget)}) cannot hold the work of one example: "
            f"{_WORK_NAMES[worst]} need {format_bytes(needs[worst])} for a single example "
            f"({format_bytes(fixed[worst])} fixed for {v} test vector(s) of {cost.num_params} parameters + "
            f"{format_bytes(per_example[worst])} per example); the smallest max_memory that works is "
            f"{_round_up(minimum)!r} (or select fewer parameters / solve fewer test points at once)"
        )

    def chunk(work: str) -> int:
        return int(max(1, min(max_chunk, (budget - fixed[work]) // per_example[work])))

    knn_elements = (budget // KNN_BYTES_PER_ELEMENT) if knn_rows is None else chunk("knn") * knn_rows
    return MemoryPlan(
        max_memory=budget,
        gradient_chunk=chunk("gradients"),
        score_chunk=chunk("scoring"),
        hessian_chunk=chunk("hvp"),
        knn_block_elements=int(knn_elements),
        num_vectors=v,
        score_directions=directions,
        per_example=per_example,
        fixed=fixed,
        minimum=minimum,
    )
