#!/usr/bin/env bash
# The paper's comparison on one GPU, as one command that ends within a time limit (default 540 s):
# bench/paper_table.py --budget gpu (ResNet-18 with the CIFAR stem on the pack's 10,000 CIFAR-10
# training images; reweightood, unweighted, supcon and ce with the official recipe in bf16, epochs
# sized to the time left; KNN and Mahalanobis on CIFAR-100 test, textures and MNIST).
#
#   RWOOD_DATA=DIR bash bench/gpu_paper.sh OUT_DIR [paper_table.py options]
#
# RWOOD_DATA: folder with cifar10_train.npz, cifar10_test.npz, cifar100_test.npz,
# ood_textures.npz and ood_mnist.npz (default ../shared/data), and, where faiss is not installed,
# the wheels faiss_cpu-*.whl and packaging-*.whl: every wheel there is unpacked into the work
# folder, which goes on PYTHONPATH (a wheel is a zip of site-packages; nothing is downloaded).
# PYTHON: the interpreter (default python3).
# RWOOD_TIME_LIMIT: seconds for the whole command (default 540). RWOOD_WORK: run directories
# (default a new folder under $TMPDIR; tens of MB per objective, never under OUT_DIR).
# OUT_DIR receives report.md, report.json, four PNGs and run.log (this output): about 1-2 MB.
# A run cut by the limit (SIGINT 15 s before it, SIGKILL 10 s later) keeps the reports of the
# objectives it finished. Extra options go to paper_table.py, e.g. --compile, --epochs N, --dry-run.
set -uo pipefail

START=$SECONDS
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${1:?usage: bash bench/gpu_paper.sh OUT_DIR [paper_table.py options]}"
shift
LIMIT="${RWOOD_TIME_LIMIT:-540}"
PY="${PYTHON:-python3}"
export RWOOD_DATA="${RWOOD_DATA:-../shared/data}"
WORK="${RWOOD_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/rwood_paper.XXXXXX")}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
mkdir -p "$OUT" "$WORK"

main() {   # the whole run; its output also goes to OUT/run.log (below)
echo "gpu_paper.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ), limit ${LIMIT} s, repo $(git -C "$REPO" \
    rev-parse --short HEAD 2>/dev/null || echo '?'), data $RWOOD_DATA, work $WORK"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true

if ! "$PY" -c "import faiss" 2>/dev/null; then
    shopt -s nullglob
    for WHEEL in "$RWOOD_DATA"/*.whl; do           # faiss_cpu and its dependency packaging
        echo "unpacking $WHEEL"
        "$PY" -m zipfile -e "$WHEEL" "$WORK/site"
    done
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
    if ! "$PY" -c "import faiss"; then
        echo "error: faiss cannot be imported; put faiss_cpu-*.whl and packaging-*.whl in $RWOOD_DATA" >&2
        return 2
    fi
fi
"$PY" - <<'EOF'
import importlib, sys, warnings
warnings.simplefilter("ignore")
found = {}
for m in ("torch", "torchvision", "numpy", "faiss", "matplotlib", "sklearn", "PIL", "click", "tqdm"):
    try:
        found[m] = getattr(importlib.import_module(m), "__version__", "?")
    except ImportError:
        found[m] = "MISSING"
print("python", sys.version.split()[0], "|", ", ".join(f"{k} {v}" for k, v in found.items()))
if "MISSING" in (found["matplotlib"], found["sklearn"]):
    print("note: without matplotlib and scikit-learn the report has no plots, only the tables")
EOF

# paper_table.py plans to finish within LEFT; SIGINT only if it overruns (it then stops at the next
# step and writes what it finished), SIGKILL 10 s later, 5 s before the limit
LEFT=$((LIMIT - (SECONDS - START) - 15))
rc=0
timeout -s INT -k 10 "$LEFT" "$PY" bench/paper_table.py --budget gpu --out "$OUT" \
    --work "$WORK/runs" --time-budget "$LEFT" "$@" || rc=$?
echo "gpu_paper.sh: exit $rc after $((SECONDS - START)) s (limit $LIMIT s); in $OUT:"
ls -l "$OUT"
return "$rc"
}

main "$@" 2>&1 | tee -a "$OUT/run.log"      # the pipe ends when tee has written the last line
exit "${PIPESTATUS[0]}"
