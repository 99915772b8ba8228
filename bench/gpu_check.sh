#!/usr/bin/env bash
# The trainer's GPU check: one short script (a few minutes on an H100; budget < 8 min) that
# installs nothing. It prints versions, then runs four things:
#   1. a bf16 + channels_last step, checked (output dtype, weight memory format)
#   2. rwood-train on CUDA: resnet18_cifar, 2 epochs of cifar10_train.npz, batch 512, then the run dir
#   3. bench/train_throughput.py: ours vs the reference loop, resnet18_cifar, batch 512
#   4. ONNX parity on CUDA (onnxruntime-gpu), exported with exporter.onnx_export; skipped with a
#      message when there is no CUDAExecutionProvider (then it checks ORT-CPU against torch-CUDA)
#   5. (last, optional) the same throughput with torch.compile and CUDA graphs, if time allows
# A failed section is reported and the rest still run; the exit status is 1 if any failed.
#
#   RWOOD_DATA=DIR bash bench/gpu_check.sh 2>&1 | tee gpu_check.log
#
# RWOOD_DATA: folder holding cifar10_train.npz (default ../shared/data). PYTHON: interpreter
# (default python3, the one with torch on the device machine). The repo root goes on PYTHONPATH,
# so no virtualenv has to travel. RWOOD_COMPILE=0 skips section 5.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DATA_DIR="${RWOOD_DATA:-../shared/data}"
DATA="$DATA_DIR/cifar10_train.npz"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/rwood_gpu_check.XXXXXX")"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
FAILED=()
START=$SECONDS

section() { printf '\n===== %s  [t=%ds] =====\n' "$1" "$((SECONDS - START))"; }
# run NAME LIMIT_S CMD...: run a section under a time limit; record a failure, keep going.
run() {
    local name="$1" limit="$2"; shift 2
    section "$name"
    local rc=0
    timeout "$limit" "$@" || rc=$?
    if ((rc != 0)); then
        echo "FAILED: $name (exit $rc$( ((rc == 124)) && echo ", over ${limit}s"))"
        FAILED+=("$name")
    fi
}

section "versions"
date -u +"%Y-%m-%dT%H:%M:%SZ"
uname -srm
echo "repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
echo "data $DATA"
nvidia-smi || echo "nvidia-smi failed"
"$PY" - <<'EOF'
import importlib, os, sys, warnings
import torch
warnings.simplefilter("ignore")                      # click warns about its own __version__
print("python", sys.version.split()[0], sys.executable, "| cpus", os.cpu_count())
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn",
      torch.backends.cudnn.version(), "| gpu available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported())
for m in ("torchvision", "numpy", "PIL", "click", "tqdm", "onnx", "onnxscript", "onnxruntime",
          "faiss", "sklearn"):
    try:
        print(f"  {m:12s} {getattr(importlib.import_module(m), '__version__', '?')}")
    except ImportError:
        print(f"  {m:12s} missing")
EOF
if [[ ! -f "$DATA" ]]; then
    echo "error: $DATA not found; set RWOOD_DATA to the folder that holds cifar10_train.npz" >&2
    exit 2
fi
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no GPU')"

# ------------------------------------------------------------------------------------------ 1
run "1. bf16 autocast + channels_last step (resnet18_cifar, batch 512 on the device)" 120 \
    "$PY" - "$DATA" <<'EOF'
import sys, time
import numpy as np, torch
from trainer.augment import Augment
from trainer.data import dataset_stats
from trainer.losses import create_loss
from trainer.networks import create_model

torch.backends.cudnn.benchmark = True
B = 512
with np.load(sys.argv[1]) as f:
    images, labels = f["images"][:B], f["labels"][:B].astype(np.int64)
mean, std = dataset_stats(images)
x_u8, y = torch.from_numpy(images).cuda(), torch.from_numpy(labels).cuda()
aug = Augment(32, mean, std).cuda()
net = create_model("resnet18_cifar", num_classes=10).cuda().to(memory_format=torch.channels_last)
loss_fn = create_loss("reweightood")
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
for i in range(3):
    torch.cuda.synchronize(); t = time.perf_counter()
    x = torch.cat([aug(x_u8), aug(x_u8)]).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(x)["projection"]
    loss = loss_fn(out.float().view(2, B, -1).transpose(0, 1), y)
    opt.zero_grad(); loss.backward(); opt.step()
    torch.cuda.synchronize()
    print(f"step {i}: loss {loss.item():.4f}  {1000 * (time.perf_counter() - t):.1f} ms")
conv = net.encoder.conv1 if hasattr(net.encoder, "conv1") else next(
    m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
print("projection dtype under autocast:", out.dtype)
print("conv weight channels_last:", conv.weight.is_contiguous(memory_format=torch.channels_last))
print("peak GPU memory: %.2f GiB" % (torch.cuda.max_memory_allocated() / 2**30))
assert out.dtype == torch.bfloat16 and torch.isfinite(loss)
assert conv.weight.is_contiguous(memory_format=torch.channels_last)
EOF

# ------------------------------------------------------------------------------------------ 2
echo '{"log_every": 1}' > "$WORK/log_every_step.json"
run "2. rwood-train --device cuda: resnet18_cifar, 2 epochs of cifar10_train.npz, batch 512" 300 \
    "$PY" -m trainer.cli --dataset npz --data "$DATA" --arch resnet18_cifar --epochs 2 \
    --batch-size 512 --lr 0.1 --device cuda --seed 0 --out "$WORK/run" \
    --config "$WORK/log_every_step.json"
run "2b. the run directory" 60 "$PY" - "$WORK/run" <<'EOF'
import json, sys
from pathlib import Path
import numpy as np
run = Path(sys.argv[1])
for name in ("config.json", "checkpoints/last.pt", "model.pt", "bank.npz", "calibration.npz",
             "metrics.jsonl"):
    assert (run / name).is_file(), f"missing {name}"
rec = json.loads((run / "config.json").read_text())
assert rec["finished"] and rec["config"]["amp"] and rec["config"]["channels_last"]
lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
for epoch in sorted({r["epoch"] for r in lines}):
    rs = [r for r in lines if r["epoch"] == epoch]
    print(f"epoch {epoch + 1}: {len(rs)} steps, loss {rs[0]['loss']:.3f} -> {rs[-1]['loss']:.3f}, "
          f"{rs[-1]['views_per_s']:,.0f} views/s over the epoch (loop only; epoch 1 includes warm-up)")
with np.load(run / "bank.npz") as b:
    norms = np.linalg.norm(b["penultimate"], axis=1)
    print(f"bank: {b['penultimate'].shape} penultimate, unit rows within "
          f"{np.abs(norms - 1).max():.1e}; calibration rows {rec['data']['n_calibration']}")
    assert np.isfinite(b["penultimate"]).all() and np.abs(norms - 1).max() < 1e-3
print("RESULT " + json.dumps({"rwood_train_epoch2_views_per_s": round(lines[-1]["views_per_s"], 1)}))
EOF

# ------------------------------------------------------------------------------------------ 3
WORKERS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
run "3. throughput: ours vs reference (resnet18_cifar, batch 512, $WORKERS workers)" 300 \
    "$PY" bench/train_throughput.py --device cuda --arch resnet18_cifar --batch-size 512 \
    --steps 50 --warmup 5 --workers "$WORKERS" --data "$DATA" --variants eager-bf16,eager-fp32

# ------------------------------------------------------------------------------------------ 4
run "4. ONNX parity on CUDA (exporter.onnx_export of the run's model)" 240 \
    "$PY" - "$WORK/run" "$WORK/model.onnx" <<'EOF'
import json, sys, types
from pathlib import Path
import numpy as np, torch
run, onnx_path = Path(sys.argv[1]), Path(sys.argv[2])
try:
    import faiss  # noqa: F401  (exporter.config -> detector_server.bundle imports it)
except ImportError:
    # faiss is not on this machine; export_onnx itself never touches it. An inert stand-in lets
    # the import chain load; nothing below builds or reads an index.
    class _Absent(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})                # e.g. the faiss.Index annotation
    sys.modules["faiss"] = _Absent("faiss")
    print("note: faiss missing here; stubbed for the import (export_onnx does not use it)")
import onnxruntime as ort
from exporter.onnx_export import export_onnx
from trainer.checkpoint import load_model

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
model, info = load_model(run, device="cuda")
with np.load(run / "calibration.npz") as f:
    images = f["images"]                                   # real CIFAR images, held out
with torch.no_grad():
    ref = [t.cpu().numpy() for t in model(torch.from_numpy(images).cuda())]
export_onnx(model, onnx_path, info["preprocess"].size)
providers = ort.get_available_providers()
print("onnxruntime", ort.__version__, "providers:", providers)

def compare(provider: str) -> dict:
    sess = ort.InferenceSession(str(onnx_path), providers=[provider])
    got = sess.run(None, {"image": images})
    out = {}
    for name, a, b in zip(("feature", "projection"), ref, got):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out[name] = {"max_abs": float(np.abs(a - b).max()), "min_cos": float(cos.min())}
        print(f"  {provider} {name}: max |torch-cuda - ort| = {out[name]['max_abs']:.2e}, "
              f"min cosine {out[name]['min_cos']:.6f} over {len(images)} images")
    return out

if "CUDAExecutionProvider" in providers:
    res = compare("CUDAExecutionProvider")
    ok = all(v["max_abs"] < 1e-3 for v in res.values())
    print("ONNX CUDA parity:", "PASS" if ok else "FAIL", "(tolerance 1e-3)")
    print("RESULT " + json.dumps({"onnx_cuda_parity": res}))
    sys.exit(0 if ok else 1)
print("SKIP: no CUDAExecutionProvider (onnxruntime-gpu is not installed here); "
      "checking ORT-CPU against torch-CUDA instead")
res = compare("CPUExecutionProvider")
print("RESULT " + json.dumps({"onnx_cpu_vs_torch_cuda": res}))
sys.exit(0 if all(v["max_abs"] < 1e-3 for v in res.values()) else 1)
EOF

# ------------------------------------------------------------------------------------------ 5
if [[ "${RWOOD_COMPILE:-1}" != "0" ]] && ((SECONDS - START < 300)); then
    run "5. throughput with torch.compile, with and without CUDA graphs (ours only)" 180 \
        "$PY" bench/train_throughput.py --device cuda --arch resnet18_cifar --batch-size 512 \
        --steps 50 --warmup 5 --variants compile-bf16,cudagraphs-bf16 --skip-reference --data "$DATA"
else
    section "5. torch.compile throughput: skipped (RWOOD_COMPILE=0 or over 300 s used)"
fi

section "summary"
echo "elapsed $((SECONDS - START)) s; work dir $WORK"
if ((${#FAILED[@]})); then
    printf 'FAILED sections:\n'; printf '  %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all sections passed"
