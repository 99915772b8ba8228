"""What `rwood-export` buys: ONNX vs PyTorch CPU throughput, the int8 gain and its metric cost.

    .venv/bin/python bench/export_bench.py --run RUN_DIR [--threads 2] [--arch resnet18_cifar]

Exports RUN_DIR twice (float, and --quantize int8) into a temporary folder, then prints:
- export time and bundle size of each;
- model-only CPU throughput (images/s) at batch 1 and 64: the PyTorch DeployModel (eager,
  inference_mode), the float ONNX model and the int8 ONNX model under ONNX Runtime, all with the
  same thread count; and the whole Detector (model + FAISS KNN) for both bundles;
- detection metrics on the shared OOD sets (../shared/data: MNIST, DTD textures and the other
  CIFAR as near-OOD) with the run's CIFAR test split as ID: FPR@95 and AUROC for float and int8,
  and the change; plus the TPR the deployed threshold gives on that ID test split.
`--arch NAME` adds model-only throughput rows for an untrained network of that architecture at
the run's input size (speed does not depend on the weights; int8 is calibrated on real images).
Throughput is the median of `--rounds` timed rounds after a warm-up; the machine's load average
is printed with it, since other processes on a shared machine skew every figure.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnxruntime as ort
import torch

if TYPE_CHECKING:
    from trainer.run_dir import RunInfo

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RWOOD_SHARED_DATA", REPO.parent / "shared" / "data"))


def throughput(fn: Callable[[np.ndarray], object], images: np.ndarray, batch: int,
               rounds: int, min_images: int) -> float:
    """Median images/s of `fn` over `rounds` rounds of >= min_images images in batches."""
    n_batches = max(1, min_images // batch)
    batches = [images[(i * batch) % (len(images) - batch + 1):][:batch] for i in range(n_batches)]
    fn(batches[0])                                     # warm-up (allocations, kernel choice)
    rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for b in batches:
            fn(b)
        rates.append(n_batches * batch / (time.perf_counter() - t))
    return statistics.median(rates)


def session(path: Path, threads: int) -> ort.InferenceSession:
    from detector_server.runtime import session_options
    return ort.InferenceSession(str(path), session_options(threads),
                                providers=["CPUExecutionProvider"])


def model_rows(name: str, torch_model: torch.nn.Module, float_onnx: Path, int8_onnx: Path,
               images: np.ndarray, threads: int, rounds: int) -> list[tuple]:
    torch.set_num_threads(threads)
    sessions = {"onnx fp32": session(float_onnx, threads), "onnx int8": session(int8_onnx, threads)}

    @torch.inference_mode()
    def run_torch(x: np.ndarray) -> object:
        return torch_model(torch.from_numpy(x))

    rows = []
    for batch, min_images in ((1, 200), (64, 640)):
        rates = {"pytorch": throughput(run_torch, images, batch, rounds, min_images)}
        for key, s in sessions.items():
            rates[key] = throughput(lambda x, s=s: s.run(None, {"image": x}), images, batch,
                                    rounds, min_images)
        rows.append((name, batch, rates["pytorch"], rates["onnx fp32"], rates["onnx int8"]))
    return rows


def id_and_ood_sets(class_names: list[str], size: int) -> tuple[str, np.ndarray, dict]:
    """The ID test split matching the run's classes, and the OOD sets, at model input."""
    from detector_server.preprocess import PreprocessSpec, prepare_arrays
    spec = PreprocessSpec(size, (0.5,) * 3, (0.5,) * 3)
    load = lambda f: prepare_arrays(np.load(SHARED / f)["images"], spec)  # noqa: E731
    c10 = [str(c) for c in np.load(SHARED / "cifar10_test.npz")["classes"]]
    id_name, near = ("cifar10", "cifar100") if class_names == c10 else ("cifar100", "cifar10")
    ood = {"mnist": load("ood_mnist.npz"), "textures": load("ood_textures.npz"),
           near: load(f"{near}_test.npz")}
    return id_name, load(f"{id_name}_test.npz"), ood


def metric_rows(detectors: dict, id_images: np.ndarray, ood: dict) -> tuple[list[tuple], dict]:
    from detector_server.metrics import ood_metrics
    rows, tprs = [], {}
    per = {k: {} for k in detectors}
    for key, det in detectors.items():
        ids = det.score_arrays(id_images)
        tprs[key] = float(np.mean(~ids.is_ood))
        for name, x in ood.items():
            per[key][name] = ood_metrics(ids.scores, det.score_arrays(x).scores)
    for name in list(ood) + ["average"]:
        vals = []
        for key in detectors:
            m = (per[key][name] if name != "average" else
                 {s: float(np.mean([per[key][o][s] for o in ood])) for s in ("fpr@95", "auroc")})
            vals += [100 * m["fpr@95"], 100 * m["auroc"]]
        rows.append((name, *vals))
    return rows, tprs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="finished training run directory")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arch", action="append", default=[],
                    help="extra untrained architecture for throughput rows (repeatable)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from detector_server.detector import Detector
    from detector_server.runtime import resolve_threads
    from exporter.export import export_bundle
    from trainer.checkpoint import load_model

    threads = resolve_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="rwood-export-bench-"))
    bundles, export_s = {}, {}
    for key, quant in (("fp32", None), ("int8", "int8")):
        t = time.perf_counter()
        bundles[key] = export_bundle(args.run, tmp / key, quantize=quant, threads=threads)
        export_s[key] = time.perf_counter() - t
    detectors = {k: Detector(b, device="cpu", threads=threads) for k, b in bundles.items()}
    spec = detectors["fp32"].spec
    id_name, id_images, ood = id_and_ood_sets(list(detectors["fp32"].class_names), spec.size)

    print(f"\nrun {args.run} | threads {threads} | load average {os.getloadavg()[0]:.1f} "
          f"(cores {os.cpu_count()}) | torch {torch.__version__}, onnxruntime {ort.__version__}")
    print("\nbundle              export s   size MB   served file")
    for k, b in bundles.items():
        size = sum(f.stat().st_size for f in b.iterdir()) / 1e6
        print(f"{k:<18} {export_s[k]:9.1f} {size:9.2f}   {detectors[k].manifest.served_file}")

    model, info = load_model(args.run)
    rows = model_rows(info.model_args["arch"] + " (run)", model, bundles["int8"] / "model.onnx",
                      bundles["int8"] / "model.int8.onnx", id_images, threads, args.rounds)
    for arch in args.arch:
        rows += arch_rows(arch, info, id_images, tmp, threads, args.rounds)
    print("\nmodel-only CPU throughput, images/s (median of rounds)")
    print("model                       batch   pytorch  onnx fp32  onnx int8  onnx/pt  int8/fp32")
    for name, b, pt, f32, i8 in rows:
        print(f"{name:<27} {b:5d} {pt:9.0f} {f32:10.0f} {i8:10.0f} {f32 / pt:8.2f} "
              f"{i8 / f32:10.2f}")
    print("\nwhole Detector (ONNX Runtime + FAISS KNN), images/s")
    for b, n in ((1, 200), (64, 640)):
        r = {k: throughput(d.score_arrays, id_images, b, args.rounds, n)
             for k, d in detectors.items()}
        print(f"batch {b:3d}: fp32 {r['fp32']:8.0f}   int8 {r['int8']:8.0f}   "
              f"int8/fp32 {r['int8'] / r['fp32']:.2f}")

    mrows, tprs = metric_rows(detectors, id_images, ood)
    print(f"\nOOD detection, ID = {id_name} test split ({len(id_images)} images), percent")
    print("set          FPR@95 fp32  AUROC fp32  FPR@95 int8  AUROC int8   dFPR95   dAUROC")
    for name, f1, a1, f2, a2 in mrows:
        print(f"{name:<12} {f1:11.2f} {a1:11.2f} {f2:12.2f} {a2:11.2f} {f2 - f1:+8.2f} "
              f"{a2 - a1:+8.2f}")
    for k, d in detectors.items():
        t = d.manifest.threshold
        print(f"deployed threshold ({k}): TPR {100 * tprs[k]:.2f}% on the {id_name} test split "
              f"(calibrated {100 * t.achieved_tpr:.2f}% on {t.n_samples} images, {t.source})")


def arch_rows(arch: str, info: RunInfo, images: np.ndarray, tmp: Path, threads: int,
              rounds: int) -> list[tuple]:
    """Throughput rows for an untrained `arch` (float and int8 ONNX exported here)."""
    from exporter.onnx_export import export_onnx
    from exporter.quantize import quantize_int8
    from trainer.networks import DeployModel, create_model
    spec = info.preprocess
    torch.manual_seed(0)
    net = create_model(arch, num_classes=len(info.class_names)).eval()
    model = DeployModel(net, spec.mean, spec.std).eval()
    f32, i8 = tmp / f"{arch}.onnx", tmp / f"{arch}.int8.onnx"
    export_onnx(model, f32, spec.size)
    quantize_int8(f32, i8, images[:256])
    return model_rows(f"{arch} (untrained)", model, f32, i8, images, threads, rounds)


if __name__ == "__main__":
    main()
