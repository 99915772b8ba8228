"""Throughput and latency of `rwood-serve` against the in-process ceiling and a research-style scorer.

    .venv/bin/python bench/serve_throughput.py [--run RUN_DIR] [--bundle BUNDLE] [--seconds 5]

Measures, in one run, on real CIFAR-10 test images encoded as PNG:
(a)  in-process ceiling: decoded uint8 batches of 64 straight through `Detector.score_arrays`
     (ONNX Runtime + FAISS, no decoding, no RPC); (a1) the same Detector on one PNG per call
     (`score_images`: decode + model + KNN), the single-image in-process time;
(b)  the server (`rwood-serve` in its own process) under 1, 8 and 64 concurrent clients, each
     sending one PNG per Score request and waiting for the answer (grpc.aio, one client process
     on the same 2 cores), plus 64 clients sending 16 PNGs per request (--batched); with
     --neighbors 0,5 each load also asks for the 5 nearest bank rows per image (the cost of the
     evidence), and with --baseline DIR the same loads (without neighbours) run against the
     rwood-serve of another checkout (e.g. the one before a change), in the same rounds;
(c)  a research-style scorer: the run's PyTorch eager model (`trainer.checkpoint.load_model`) +
     a FAISS IndexFlatL2 over the bank, one PIL-decoded image at a time (c1) and in batches of 64.
Prints images/s, p50/p99 latency (per call) and the ratios the serving issue targets:
(b@64) / (a) >= 0.85; p50(b@1) - p50(a1) <= 2 ms; (b) / (c1) >= 1.5.
Without --run a bundle is made first from a 1-epoch small_cnn run on 1,000 CIFAR-10 images
(needs the train extra; about a minute on 2 cores). The server never imports torch; this script does.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import detector_server.runtime  # noqa: F401  first: FAISS's OpenMP settings, as in the server

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


@dataclass
class Row:
    name: str
    images_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    server_cores: float | None = None   # CPU seconds per second used by the server process
    client_cores: float | None = None   # ... and by this (client) process


def _row(name: str, n_images: int, elapsed: float, latencies: list[float]) -> Row:
    lat = np.asarray(latencies) * 1e3
    return Row(name, n_images / elapsed, float(np.percentile(lat, 50)),
               float(np.percentile(lat, 99)), len(latencies))


def _cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system) of process `pid`, or of this process."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed_loop(fn, seconds: float, warmup: int = 5) -> tuple[list[float], float]:
    """Call fn() repeatedly for `seconds` (after `warmup` calls); returns latencies, elapsed."""
    for _ in range(warmup):
        fn()
    lat, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0


def load_pngs(n: int) -> tuple[np.ndarray, list[bytes]]:
    images = np.load(SHARED / "cifar10_test.npz")["images"][:n]
    pngs = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return images, pngs


# ---- (a) in-process ------------------------------------------------------------------------------
def bench_in_process(bundle: Path, images: np.ndarray, pngs: list[bytes], seconds: float) -> list[Row]:
    from detector_server.detector import Detector

    det = Detector(bundle)
    batch = np.stack([det.prepare(a) for a in images[:64]])
    lat, el = _timed_loop(lambda: det.score_arrays(batch), seconds)
    rows = [_row("(a)  in-process, batches of 64 (model + KNN)", 64 * len(lat), el, lat)]
    it = iter(range(10**9))
    lat, el = _timed_loop(lambda: det.score_images([pngs[next(it) % len(pngs)]]), seconds)
    rows.append(_row("(a1) in-process, 1 PNG per call (decode + model + KNN)", len(lat), el, lat))
    return rows


# ---- (b) the server ------------------------------------------------------------------------------
def start_server(bundle: Path, extra: list[str], repo: Path = REPO) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo),
                                                                    os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "detector_server.serve_cli", str(bundle),
                             "--address", "127.0.0.1:0", *extra],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=repo)
    for line in proc.stderr:
        m = re.search(r"serving on [^:\s]+:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, f"127.0.0.1:{m.group(1)}"
    raise RuntimeError(f"rwood-serve did not start (exit {proc.wait()})")


async def _clients(target: str, pngs: list[bytes], n_clients: int, seconds: float,
                   per_request: int = 1, neighbors: int = 0) -> tuple[list[float], float]:
    import grpc

    from detector_server._proto import detector_pb2 as pb
    from detector_server._proto import detector_pb2_grpc as pb_grpc

    requests = [pb.ScoreRequest(images=[pb.Image(id=str(i + j), data=pngs[(i + j) % len(pngs)])
                                        for j in range(per_request)], neighbors=neighbors)
                for i in range(len(pngs))]
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.DetectorStub(channel)
        for r in requests[:20]:
            await stub.Score(r, timeout=30)
        stop_at = time.perf_counter() + seconds

        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                response = await stub.Score(requests[i % len(requests)], timeout=30)
                latencies.append(time.perf_counter() - t)
                assert len(response.results) == per_request and response.results[0].error == ""
                assert len(response.results[0].neighbors) == neighbors
                i += n_clients

        t0 = time.perf_counter()
        await asyncio.gather(*[client(k) for k in range(n_clients)])
        return latencies, time.perf_counter() - t0


def bench_server(bundle: Path, pngs: list[bytes], loads: list[tuple[int, int, int]],
                 seconds: float, extra: list[str], repo: Path = REPO, tag: str = "") -> list[Row]:
    """One row per (clients, PNGs per request, neighbours) in `loads`, all against one server
    process (of the checkout `repo`; `tag` marks its rows)."""
    proc, target = start_server(bundle, extra, repo)
    try:
        rows = []
        for n, per_request, neighbors in loads:
            srv0, cli0 = _cpu_seconds(proc.pid), _cpu_seconds()
            lat, el = asyncio.run(_clients(target, pngs, n, seconds, per_request, neighbors))
            row = _row(f"(b)  server{tag}, {n} client{'s' if n > 1 else ''}, {per_request} PNG"
                       f"{'s' if per_request > 1 else ''} per request"
                       + (f", {neighbors} neighbors" if neighbors else ""),
                       per_request * len(lat), el, lat)
            row.server_cores = (_cpu_seconds(proc.pid) - srv0) / el
            row.client_cores = (_cpu_seconds() - cli0) / el
            rows.append(row)
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


# ---- (c) research-style scorer -------------------------------------------------------------------
def bench_reference(run_dir: Path, pngs: list[bytes], k: int, seconds: float) -> list[Row]:
    import faiss
    import torch

    from trainer.checkpoint import load_model

    model, _ = load_model(run_dir)
    bank = np.load(run_dir / "bank.npz")["penultimate"].astype(np.float32)
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)

    @torch.no_grad()
    def score(batch: list[bytes]) -> np.ndarray:
        x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch])
        feature, _ = model(torch.from_numpy(x))
        d, _ = index.search(feature.numpy(), k)
        return -np.sqrt(d[:, -1])

    it = iter(range(10**9))
    lat, el = _timed_loop(lambda: score([pngs[next(it) % len(pngs)]]), seconds)
    rows = [_row("(c1) PyTorch eager + FAISS, 1 image per call", len(lat), el, lat)]
    lat, el = _timed_loop(lambda: score(pngs[:64]), seconds)
    rows.append(_row("(c)  PyTorch eager + FAISS, batches of 64", 64 * len(lat), el, lat))
    return rows


# ---- driver --------------------------------------------------------------------------------------
def _cpu_per_image(a: Row, b: Row) -> float:
    """Server CPU seconds per image of row a over row b."""
    return (a.server_cores / a.images_per_s) / (b.server_cores / b.images_per_s)


def print_table(rows: list[Row]) -> dict[str, float]:
    def key(name: str) -> str:       # "(b) [baseline] 8 clients, 1 PNG per request", "(a1)", ...
        if not name.startswith("(b)"):
            return name[:4].strip()
        first, *rest = name.split(",")
        return "(b)" + (" [baseline]" if "[baseline]" in first else "") + ",".join(rest)

    by = {key(r.name): r for r in rows}
    print(f"\n{'':60s} {'images/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'calls':>7s} "
          f"{'srv cores':>9s} {'cli cores':>9s} {'srv ms/img':>10s}")
    for r in rows:     # server CPU per image: what a busy shared machine skews least
        cores = ("" if r.server_cores is None
                 else f" {r.server_cores:9.2f} {r.client_cores:9.2f} "
                      f"{1e3 * r.server_cores / r.images_per_s:10.3f}")
        print(f"{r.name:60s} {r.images_per_s:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.calls:7d}{cores}")
    a, a1, c1 = by["(a)"], by["(a1)"], by["(c1)"]
    b1, b64 = by.get("(b) 1 client, 1 PNG per request"), by.get("(b) 64 clients, 1 PNG per request")
    ratios = {}
    if b64:
        ratios["(b@64) / (a)  [target >= 0.85]"] = b64.images_per_s / a.images_per_s
        ratios["(b@64) / (c1) [target >= 1.5]"] = b64.images_per_s / c1.images_per_s
    for name, r in by.items():
        if name.startswith("(b)") and "1 PNG per" not in name:
            ratios[f"{name.split(' ', 1)[1]} / (a)"] = r.images_per_s / a.images_per_s
        if name.startswith("(b)") and "neighbors" in name:     # the cost of the evidence
            plain = by.get(name.rsplit(",", 1)[0])
            if plain:
                ratios[f"{name} / without"] = r.images_per_s / plain.images_per_s
                ratios[f"{name} / without, srv CPU per image"] = _cpu_per_image(r, plain)
        if name.startswith("(b) [baseline]"):                    # this checkout against another
            ours = by.get(name.replace(" [baseline]", ""))
            if ours:
                mine = name.replace(" [baseline]", "")
                ratios[f"{mine}: this / baseline"] = ours.images_per_s / r.images_per_s
                ratios[f"{mine}: this / baseline, srv CPU per image"] = _cpu_per_image(ours, r)
    if b1:
        ratios["p50(b@1) - p50(a1) ms  [target <= 2]"] = b1.p50_ms - a1.p50_ms
        ratios["(b@1) / (c1)  [target >= 1.5]"] = b1.images_per_s / c1.images_per_s
    ratios["(a) / (c) batch 64"] = a.images_per_s / by["(c)"].images_per_s
    print()
    for name, v in ratios.items():
        print(f"{name:60s} {v:10.2f}")
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="run directory (model.pt, bank.npz) for (c)")
    p.add_argument("--bundle", type=Path, help="bundle exported from --run (default: export it)")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per row")
    p.add_argument("--clients", default="1,8,64", help="concurrent clients, one PNG per request")
    p.add_argument("--batched", default="64x16",
                   help="extra loads CLIENTSxPNGS_PER_REQUEST, comma-separated ('' for none)")
    p.add_argument("--server-args", default="", help="extra rwood-serve flags, e.g. '--max-wait-ms 1'")
    p.add_argument("--neighbors", default="0",
                   help="neighbours per image to ask for, comma-separated: every server load "
                        "runs once per value (e.g. '0,5')")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout of the repository: its rwood-serve runs the same loads "
                        "(without neighbours) in the same rounds, for an A/B comparison")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every row; each row reports its median round")
    p.add_argument("--json", type=Path, help="also write the rows and ratios here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, bundle = args.run, args.bundle
        if run is None:
            sys.path.insert(0, str(REPO / "bench"))
            from score_folder import make_bundle

            bundle = make_bundle(Path(tmp))
            run = Path(tmp) / "run"
        elif bundle is None:
            from exporter.export import export_bundle

            bundle = export_bundle(run, Path(tmp) / "bundle")
        from detector_server.bundle import load_bundle

        k = load_bundle(bundle).manifest.k
        images, pngs = load_pngs(512)
        base = [(int(c), 1) for c in args.clients.split(",")] + [
            tuple(int(x) for x in b.split("x")) for b in args.batched.split(",") if b]
        loads = [(c, p, int(n)) for c, p in base for n in args.neighbors.split(",")]
        rounds = []
        for r in range(args.repeat):   # interleaved rounds: load drift hits every row alike
            rows = bench_in_process(bundle, images, pngs, args.seconds)
            rows += bench_server(bundle, pngs, loads, args.seconds, args.server_args.split())
            if args.baseline is not None:
                rows += bench_server(bundle, pngs, [(c, p, 0) for c, p in base], args.seconds,
                                     args.server_args.split(), args.baseline, " [baseline]")
            rows += bench_reference(run, pngs, k, args.seconds)
            rounds.append(rows)
            print(f"round {r + 1}/{args.repeat} done, load average {os.getloadavg()[0]:.1f}",
                  file=sys.stderr)
    rows = [sorted(same, key=lambda r: r.images_per_s)[len(same) // 2] for same in zip(*rounds)]
    print(f"cores: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}, "
          f"bundle: {bundle.name}, k={k}, server flags: {args.server_args or '(defaults)'}, "
          f"median of {args.repeat} round(s)")
    ratios = print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios},
                                        indent=2))


if __name__ == "__main__":
    main()
