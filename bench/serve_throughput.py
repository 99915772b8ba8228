"""Throughput and latency of `rwood-serve` against the in-process ceiling and a research-style scorer.

    .venv/bin/python bench/serve_throughput.py [--run RUN_DIR] [--bundle BUNDLE] [--seconds 5]

Measures, in one run, on real CIFAR-10 test images encoded as PNG:
(a)  in-process ceiling: decoded uint8 batches of 64 straight through `Detector.score_arrays`
     (ONNX Runtime + FAISS, no decoding, no RPC); (a1) the same Detector on one PNG per call
     (`score_images`: decode + model + KNN), the single-image in-process time;
(b)  the server (`rwood-serve` in its own process) under 1, 8 and 64 concurrent clients, each
     sending one PNG per Score request and waiting for the answer (grpc.aio, one client process
     on the same cores), plus 64 clients sending 16 PNGs per request (--batched); once per
     `--workers` value (1: one process; N > 1: N worker processes on one port, each with 1/N of
     the threads, their CPU counted together), every client on its own channel so that the
     kernel spreads the connections over the workers; with --neighbors 0,5 each load also asks
     for the 5 nearest bank rows per image (the cost of the evidence), and with --baseline DIR
     the same loads (without neighbours, one process) run against the rwood-serve of another
     checkout (e.g. the one before a change), in the same rounds;
(c)  a research-style scorer: the run's PyTorch eager model (`trainer.checkpoint.load_model`) +
     a FAISS IndexFlatL2 over the bank, one PIL-decoded image at a time (c1) and in batches of 64.
Prints images/s, p50/p99 latency (per call) and the ratios the serving issues target:
(b@64) / (a) >= 0.85 (0.95 for ResNet-18); p50(b@1) - p50(a1) <= 2 ms; (b) / (c1) >= 1.5;
(b@64, --workers 2) / (b@64, --workers 1) >= 1.5 for the small network.
Without --run a bundle is made first from a 1-epoch run of --arch (small_cnn by default) on 1,000
CIFAR-10 images (needs the train extra; about a minute on 2 cores for small_cnn). The server never
imports torch; this script does.
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
    """CPU time (user + system) of process `pid` and its live descendants (a --workers server's
    workers), or of this process."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:         # exited meanwhile
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, ticks = {pid}, 0
    for _ in range(4):          # the server, its workers (and any helper processes they start)
        tree |= {p for p, (ppid, _) in stats.items() if ppid in tree}
    ticks = sum(stats[p][1] for p in tree if p in stats)
    return ticks / os.sysconf("SC_CLK_TCK")


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
    """`n_clients` concurrent callers, each on its own channel (its own TCP connection, as separate
    client processes would have: with --workers the kernel spreads connections, not calls)."""
    import grpc

    from detector_server._proto import detector_pb2 as pb
    from detector_server._proto import detector_pb2_grpc as pb_grpc

    requests = [pb.ScoreRequest(images=[pb.Image(id=str(i + j), data=pngs[(i + j) % len(pngs)])
                                        for j in range(per_request)], neighbors=neighbors)
                for i in range(len(pngs))]
    latencies: list[float] = []
    # use_local_subchannel_pool: else grpc shares one connection among the channels
    channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(n_clients)]
    try:
        stubs = [pb_grpc.DetectorStub(ch) for ch in channels]
        for k, stub in enumerate(stubs):                  # connect, and warm up every worker
            await stub.Score(requests[k % len(requests)], timeout=30)
        stop_at = time.perf_counter() + seconds

        async def client(k: int) -> None:
            i, stub = k, stubs[k]
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
    finally:
        for ch in channels:
            await ch.close()


def bench_server(bundle: Path, pngs: list[bytes], loads: list[tuple[int, int, int]],
                 seconds: float, extra: list[str], workers: int = 1, repo: Path = REPO,
                 tag: str = "") -> list[Row]:
    """One row per (clients, PNGs per request, neighbours) in `loads`, all against one server
    (`workers` processes) of the checkout `repo` (`tag` marks its rows)."""
    proc, target = start_server(bundle, extra + (["--workers", str(workers)] if workers > 1 else []),
                                repo)
    try:
        rows = []
        for n, per_request, neighbors in loads:
            srv0, cli0 = _cpu_seconds(proc.pid), _cpu_seconds()
            lat, el = asyncio.run(_clients(target, pngs, n, seconds, per_request, neighbors))
            row = _row(f"(b)  server{tag} w={workers}, {n} client{'s' if n > 1 else ''}, "
                       f"{per_request} PNG{'s' if per_request > 1 else ''} per request"
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
def _key(name: str) -> str:
    """Short row key: "(a)", "(c1)", or "(b) 2 64 clients, 1 PNG per request" (2 workers),
    "(b) [baseline] 1 ..." for the baseline checkout's rows."""
    if not name.startswith("(b)"):
        return name[:4].strip()
    tag = "[baseline] " if "[baseline]" in name.split(",", 1)[0] else ""
    return "(b) " + tag + name.split(" w=", 1)[1].replace(",", "", 1)


def _cpu_per_image(a: Row, b: Row) -> float:
    """Server CPU seconds per image of row a over row b."""
    return (a.server_cores / a.images_per_s) / (b.server_cores / b.images_per_s)


def _evidence_ratios(by: dict[str, Row]) -> dict[str, float]:
    """The cost of --neighbors (a row against the same load without) and this checkout against
    --baseline: throughput and server CPU per image (what a busy shared machine skews least)."""
    out = {}
    for name, r in by.items():
        if name.startswith("(b)") and name.endswith(" neighbors"):
            plain = by.get(name.rsplit(",", 1)[0])
            if plain:
                out[f"{name[4:]} / without"] = r.images_per_s / plain.images_per_s
                out[f"{name[4:]} / without, srv CPU per image"] = _cpu_per_image(r, plain)
        if name.startswith("(b) [baseline] "):
            ours = by.get(name.replace("[baseline] ", ""))
            if ours:
                out[f"{name[15:]}: this / baseline"] = ours.images_per_s / r.images_per_s
                out[f"{name[15:]}: this / baseline, srv CPU per image"] = _cpu_per_image(ours, r)
    return out


def print_table(rows: list[Row], workers: list[int]) -> dict[str, float]:
    by = {_key(r.name): r for r in rows}
    print(f"\n{'':60s} {'images/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'calls':>7s} "
          f"{'srv cores':>9s} {'cli cores':>9s} {'srv ms/img':>10s}")
    for r in rows:
        cores = ("" if r.server_cores is None
                 else f" {r.server_cores:9.2f} {r.client_cores:9.2f} "
                      f"{1e3 * r.server_cores / r.images_per_s:10.3f}")
        print(f"{r.name:60s} {r.images_per_s:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.calls:7d}{cores}")
    a, a1, c1 = by["(a)"], by["(a1)"], by["(c1)"]
    ratios = {}
    for w in workers:
        b1 = by.get(f"(b) {w} 1 client, 1 PNG per request")
        b64 = by.get(f"(b) {w} 64 clients, 1 PNG per request")
        tag = f"w={w}"
        if b64:
            ratios[f"(b@64 {tag}) / (a)  [target >= 0.85; ResNet-18 0.95]"] = (
                b64.images_per_s / a.images_per_s)
            ratios[f"(b@64 {tag}) / (c1) [target >= 1.5]"] = b64.images_per_s / c1.images_per_s
        for name, r in by.items():
            if name.startswith(f"(b) {w} ") and "1 PNG per" not in name:
                ratios[f"{name[4:]} / (a)"] = r.images_per_s / a.images_per_s
        if b1:
            ratios[f"p50(b@1 {tag}) - p50(a1) ms  [target <= 2]"] = b1.p50_ms - a1.p50_ms
            ratios[f"(b@1 {tag}) / (c1)  [target >= 1.5]"] = b1.images_per_s / c1.images_per_s
    one = by.get("(b) 1 64 clients, 1 PNG per request")
    for w in workers:
        many = by.get(f"(b) {w} 64 clients, 1 PNG per request")
        if one and many and w > 1:
            ratios[f"(b@64 w={w}) / (b@64 w=1)  [target >= 1.5, small network]"] = (
                many.images_per_s / one.images_per_s)
    ratios.update(_evidence_ratios(by))
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
    p.add_argument("--workers", default="1,2",
                   help="rwood-serve --workers values, one server each (1: a single process)")
    p.add_argument("--arch", default="small_cnn",
                   help="network of the run made when --run is not given (e.g. resnet18_cifar)")
    p.add_argument("--neighbors", default="0",
                   help="neighbours per image to ask for, comma-separated: every server load "
                        "runs once per value (e.g. '0,5')")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout of the repository: its rwood-serve (one process) runs "
                        "the same loads without neighbours in the same rounds, for an A/B test")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every row; each row reports its median round")
    p.add_argument("--json", type=Path, help="also write the rows and ratios here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, bundle = args.run, args.bundle
        if run is None:
            sys.path.insert(0, str(REPO / "bench"))
            from score_folder import make_bundle

            bundle = make_bundle(Path(tmp), arch=args.arch)
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
        workers = [int(w) for w in args.workers.split(",")]
        rounds = []
        for r in range(args.repeat):   # interleaved rounds: load drift hits every row alike
            rows = bench_in_process(bundle, images, pngs, args.seconds)
            for w in workers:
                rows += bench_server(bundle, pngs, loads, args.seconds, args.server_args.split(), w)
            if args.baseline is not None:
                rows += bench_server(bundle, pngs, [(c, p, 0) for c, p in base], args.seconds,
                                     args.server_args.split(), 1, args.baseline, " [baseline]")
            rows += bench_reference(run, pngs, k, args.seconds)
            rounds.append(rows)
            print(f"round {r + 1}/{args.repeat} done, load average {os.getloadavg()[0]:.1f}",
                  file=sys.stderr)
    rows = [sorted(same, key=lambda r: r.images_per_s)[len(same) // 2] for same in zip(*rounds)]
    print(f"cores: {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}, "
          f"bundle: {bundle.name}, k={k}, server flags: {args.server_args or '(defaults)'}, "
          f"median of {args.repeat} round(s)")
    ratios = print_table(rows, workers)
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "ratios": ratios},
                                        indent=2))


if __name__ == "__main__":
    main()
