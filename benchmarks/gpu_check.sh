#!/usr/bin/env bash
# The checks that need a GPU, in one script (under 8 minutes on one GPU). It installs nothing: run `make install`
# first; the project's .venv is used when present, else `python3`.
#
#   bash benchmarks/gpu_check.sh             # run every step; results under $OUT (else benchmarks/gpu_results/)
#   bash benchmarks/gpu_check.sh --dry-run   # print the plan (the steps, their time limits, where results go)
#
# Steps (each under its own time limit; a failed step is recorded and the next one runs):
#   1. nvidia-smi
#   2. the GPU-marked tests (pytest -m gpu: FAISS GPU index against the CPU one)
#   3. the engine on CUDA: influence scores of a small MLP on CUDA against the same computation on the CPU
#      (exact inverse and conjugate gradients, all training points and kNN-style candidates)
#   4. a FAISS GPU index (IVF, 100k x 64) against an exact CPU search, or a line saying FAISS has no GPU support
#   5. bench_scale on CUDA: --smoke (fit + fastif; the MiniLM part on its tiny BERT), then fit + fastif at N = 10,000
# Writes <step>.log, engine_cuda.json, faiss_gpu.json, bench_scale_*.json/.md and gpu_check.md (the summary table).
# Exit status: 0 when every step passed, 1 otherwise, 2 for a bad argument.
set -u -o pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument: $arg (expected --dry-run or --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3 || echo python3)"; fi
RESULTS="${OUT:-$ROOT/benchmarks/gpu_results}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# name | time limit (s) | command
STEPS=(
    "nvidia_smi|20|nvidia-smi"
    "gpu_tests|45|$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_knn.py"
    "engine_cuda|60|$PY -c ENGINE_CHECK (influence_scores on CUDA against the CPU)"
    "faiss_gpu|45|$PY -c FAISS_CHECK (IVF on the GPU against an exact search)"
    "bench_scale_smoke|90|$PY -m benchmarks.bench_scale --smoke --device cuda --parts fit,fastif --json \$RESULTS/bench_scale_smoke.json"
    "bench_scale_minilm_smoke|90|$PY -m benchmarks.bench_scale --smoke --device cuda --parts minilm --json \$RESULTS/bench_scale_minilm_smoke.json"
    "bench_scale_10k|120|$PY -m benchmarks.bench_scale --device cuda --parts fit,fastif --sizes 10000 --json \$RESULTS/bench_scale_10k.json"
)

plan() {
    echo "gpu_check plan: python $PY; results in $RESULTS"
    local total=0 i=1
    for step in "${STEPS[@]}"; do
        IFS='|' read -r name limit command <<<"$step"
        printf '  %d. %-24s (at most %3d s)  %s\n' "$i" "$name" "$limit" "$command"
        total=$((total + limit)); i=$((i + 1))
    done
    echo "  at most $total s in all"
}

if [[ "$DRY_RUN" == 1 ]]; then
    plan
    echo "dry run: nothing was run"
    exit 0
fi

ENGINE_CHECK=$(cat <<'PYEOF'
import json, os, sys, time
import torch
from torch import nn
from torch.utils.data import TensorDataset
from lightning_fastif.core.ihvp import ConjugateGradient, ExactInverse
from lightning_fastif.core.influence import influence_scores

device = os.environ.get("GPU_CHECK_DEVICE", "cuda")  # "cpu" only to test this check without a GPU
assert device == "cpu" or torch.cuda.is_available(), "CUDA is not available to torch"
torch.manual_seed(0)
x, y = torch.randn(256, 16, dtype=torch.float64), torch.randint(0, 3, (256,))
model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
test = (torch.randn(8, 16, dtype=torch.float64), torch.randint(0, 3, (8,)))
candidates = torch.randint(0, 256, (8, 50))
name_of = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
report = {"device": name_of, "checks": []}
ok = True
for name, make in (("exact", lambda: ExactInverse(damping=0.5)), ("cg", lambda: ConjugateGradient(damping=0.5))):
    for cands in (None, candidates):
        scores, seconds = {}, {}
        for where in ("cpu", device):
            data = TensorDataset(x.to(where), y.to(where))
            batch = (test[0].to(where), test[1].to(where))
            start = time.perf_counter()
            c = None if cands is None else cands.to(where)
            scores[where] = influence_scores(model.to(where), loss, batch, data, ihvp=make(), candidates=c).cpu()
            seconds[where] = time.perf_counter() - start
        err = float((scores["cpu"] - scores[device]).abs().max() / scores["cpu"].abs().max())
        passed = err < 1e-6
        ok &= passed
        report["checks"].append({"estimator": name, "candidates": cands is not None, "max_rel_diff": err,
                                 "passed": passed, "cpu_s": seconds["cpu"], f"{device}_s": seconds[device]})
        print(f"{name:5s} candidates={cands is not None!s:5s} max rel diff {err:.2e} cpu {seconds['cpu']:.3f} s "
              f"{device} {seconds[device]:.3f} s {'ok' if passed else 'FAILED'}")
with open(os.path.join(os.environ["RESULTS"], "engine_cuda.json"), "w") as f:
    json.dump(report, f, indent=2)
sys.exit(0 if ok else 1)
PYEOF
)

FAISS_CHECK=$(cat <<'PYEOF'
import json, os, sys, time
import torch
from lightning_fastif.search.ivf import faiss_gpu_available
from lightning_fastif.search.knn import KNNIndex
from lightning_fastif.metrics import knn_recall

path = os.path.join(os.environ["RESULTS"], "faiss_gpu.json")
if not faiss_gpu_available():
    try:
        import faiss
        why = f"faiss {faiss.__version__} has no GPU support here (a CPU build, or no GPU it can see)"
    except ImportError:
        why = "faiss is not installed"
    print(why)
    json.dump({"gpu": False, "why": why}, open(path, "w"), indent=2)
    sys.exit(0)
g = torch.Generator().manual_seed(0)
features, queries = torch.randn(100_000, 64, generator=g), torch.randn(200, 64, generator=g)
start = time.perf_counter()
gpu = KNNIndex(features, kind="ivf", use_gpu=True)
build = time.perf_counter() - start
start = time.perf_counter()
_, ids = gpu.search(queries, k=100)
search = time.perf_counter() - start
exact = KNNIndex(features, kind="flat", backend="torch", use_gpu=False)
_, exact_ids = exact.search(queries, k=100)
recall = knn_recall(ids, exact_ids)
report = {"gpu": bool(gpu.on_gpu), "nlist": gpu.nlist, "nprobe": gpu.nprobe, "build_s": build, "search_s": search,
          "recall_at_100": recall}
print(json.dumps(report))
json.dump(report, open(path, "w"), indent=2)
sys.exit(0 if gpu.on_gpu and recall >= 0.9 else 1)
PYEOF
)

mkdir -p "$RESULTS"
export RESULTS
plan | tee "$RESULTS/plan.txt"
SUMMARY="$RESULTS/gpu_check.md"
{
    echo "# gpu_check ($(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname))"
    echo
    echo "| step | status | seconds | log |"
    echo "| --- | --- | --- | --- |"
} >"$SUMMARY"
FAILED=0
for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    command="${command//\$RESULTS/$RESULTS}"
    log="$RESULTS/$name.log"
    echo "== $name (at most $limit s): $command"
    start=$(date +%s)
    case "$name" in
        engine_cuda) timeout "$limit" "$PY" -c "$ENGINE_CHECK" >"$log" 2>&1 ;;
        faiss_gpu) timeout "$limit" "$PY" -c "$FAISS_CHECK" >"$log" 2>&1 ;;
        bench_scale_*) timeout "$limit" $command >"$log" 2>&1 && sed -n '/^## /,$p' "$log" >"$RESULTS/$name.md" ;;
        *) timeout "$limit" $command >"$log" 2>&1 ;;
    esac
    rc=$?
    seconds=$(($(date +%s) - start))
    if [[ $rc == 0 ]]; then status=passed; elif [[ $rc == 124 ]]; then status="timed out"; else status="failed ($rc)"; fi
    [[ $rc == 0 ]] || FAILED=1
    tail -n 15 "$log"
    echo "-- $name: $status in $seconds s"
    echo "| $name | $status | $seconds | $name.log |" >>"$SUMMARY"
done
echo
cat "$SUMMARY"
exit "$FAILED"
