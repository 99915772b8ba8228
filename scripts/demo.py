"""`make demo`: the whole product end to end on the offline default, in a few minutes on 2 CPU cores.

1. writes the demo's image sets (all real images that ship inside scikit-learn):
   in-distribution = handwritten digits 0-5; OOD = digits 6-9 (held-out classes, near-OOD) and
   32x32 patches of the two photographs scikit-learn bundles (far-OOD);
2. `rwood-train` on digits 0-5 (small_cnn, ReweightOOD loss);
3. `rwood-eval` (report.md, report.json and plots);
4. `rwood-export` (ONNX + FAISS bundle, threshold at 95% TPR);
5. `rwood-serve` in the background, scoring ID and OOD PNGs through the Python gRPC client;
6. `rwood-score` on a folder of PNGs (with a corrupt file among them);
7. stops the server and prints one summary table.
Every step is a real command a user would run; each is printed before it runs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent


def sh(*args: str, **kw) -> subprocess.CompletedProcess:
    print("\n$ " + " ".join(args), flush=True)
    return subprocess.run(args, check=True, **kw)


def write_sets(data: Path) -> dict[str, Path]:
    """Digits 0-5 test split (ID), digits 6-9 (near-OOD), photo patches (far-OOD) as npz files."""
    from trainer.data import load_dataset, select_classes
    from trainer.ood_sets import photo_patches

    data.mkdir(parents=True, exist_ok=True)
    test = load_dataset("digits", None, "test")
    id_test = select_classes(test, list(range(6)))
    held = select_classes(test, list(range(6, 10)))
    paths = {"id_test": data / "digits0-5_test.npz", "digits6-9": data / "digits6-9.npz",
             "photos": data / "photo_patches.npz"}
    np.savez(paths["id_test"], images=id_test.images, labels=id_test.labels,
             classes=np.asarray(id_test.class_names))
    np.savez(paths["digits6-9"], images=held.images, labels=np.full(len(held.labels), -1))
    patches = photo_patches(per_photo=150, seed=0)            # china.jpg, flower.jpg (427x640)
    np.savez(paths["photos"], images=patches, labels=np.full(len(patches), -1))
    return paths


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(folder: Path, sets: dict[str, Path], per_set: int = 100) -> None:
    """A folder of PNGs to score offline: ID and OOD images, plus one corrupt file."""
    for name, path in sets.items():
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(np.load(path)["images"][:per_set]):
            (sub / f"{i:04d}.png").write_bytes(png_bytes(a))
    (folder / "corrupt.png").write_bytes(b"this is not an image")


def score_figures(summary: str) -> str:
    """The throughput figures of rwood-score's own summary (its "input" and "time" lines), so the
    demo's table repeats the run's numbers instead of timing the process from outside."""
    files = re.search(r"^input +(\d+) files", summary, re.M)
    time_ = re.search(r"^time +([\d.]+) s = .* \+ ([\d.]+) s start-up \+ ([\d.]+) s scoring "
                      r"\(([\d.]+) files/s\)", summary, re.M)
    if not (files and time_):
        return "(no summary)"
    total, startup, _, rate = time_.groups()
    return f"{files[1]} files in {total} s ({startup} s start-up), {float(rate):.0f} files/s scoring"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client, server: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll GetInfo until the server answers (it loads the bundle first)."""
    import grpc

    end = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"rwood-serve exited with status {server.returncode}")
        try:
            info = client.info(timeout=2.0)
            print(f"server ready: model {info.model_version} on {info.device}", flush=True)
            return
        except grpc.RpcError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    t_start = time.perf_counter()
    sets = write_sets(out / "data")
    run, report, bundle = out / "run", out / "report", out / "bundle"

    # K: the default (100, CIDER's for a 50,000-image CIFAR bank) spans most of a class in this
    # 827-row bank; KNN+ scales K with the bank size (100 * 827 / 50,000 ~ 2). We use 5.
    sh(str(BIN / "rwood-train"), "--dataset", "digits", "--classes", "0-5", "--preset", "demo",
       "--epochs", str(args.epochs), "--k", "5", "--out", str(run), "--seed", "0")
    sh(str(BIN / "rwood-eval"), str(run), "--id-test", str(sets["id_test"]),
       "--ood", f"digits6-9={sets['digits6-9']}", "--ood", f"photos={sets['photos']}",
       "--out", str(report))
    sh(str(BIN / "rwood-export"), str(run), "--out", str(bundle))

    port = free_port()
    print(f"\n$ {BIN / 'rwood-serve'} {bundle} --address 127.0.0.1:{port} &", flush=True)
    server = subprocess.Popen([str(BIN / "rwood-serve"), str(bundle), "--address",
                               f"127.0.0.1:{port}"])
    try:
        from detector_server import DetectorClient

        with DetectorClient(f"127.0.0.1:{port}", timeout=30.0) as client:
            wait_ready(client, server)
            id_imgs = [png_bytes(a) for a in np.load(sets["id_test"])["images"][:200]]
            ood_imgs = [png_bytes(a) for a in np.load(sets["photos"])["images"][:200]]
            client.score(id_imgs[:8])                                   # warm-up
            lat = []
            for b in id_imgs[:50]:
                t1 = time.perf_counter()
                client.score([b])
                lat.append(time.perf_counter() - t1)
            id_res, ood_res = client.score(id_imgs), client.score(ood_imgs)
        served_tpr = float(np.mean([not r.is_ood for r in id_res]))
        served_ood = float(np.mean([r.is_ood for r in ood_res]))
        p50_ms = 1000 * float(np.median(lat))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    folder = out / "folder"
    write_folder(folder, sets)
    results = out / "scores.csv"
    scored = sh(str(BIN / "rwood-score"), str(bundle), str(folder), "--recursive", "--out",
                str(results), "--plot", str(out / "scores.png"), stdout=subprocess.PIPE, text=True)
    print(scored.stdout, end="", flush=True)
    folder_line = score_figures(scored.stdout)

    rep = json.loads((report / "report.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    avg = rep["average"]
    rows = [
        ("FPR@95 (avg over OOD sets, lower is better)", f"{100 * avg['fpr@95']:.1f}%"),
        ("AUROC (avg)", f"{100 * avg['auroc']:.1f}%"),
        ("threshold (KNN score at 95% TPR)", f"{manifest['threshold']['value']:.4f}"),
        ("served: ID kept / photo patches flagged", f"{100 * served_tpr:.1f}% / {100 * served_ood:.1f}%"),
        ("server latency, 1 image, p50", f"{p50_ms:.1f} ms"),
        ("rwood-score folder (its own summary)", folder_line),
        ("report and plots", str(report)),
        ("total demo time", f"{time.perf_counter() - t_start:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 30))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 30))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
