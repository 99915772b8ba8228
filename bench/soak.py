"""Soak test: N concurrent clients against a local rwood-serve for T seconds, good and bad images.

    .venv/bin/python bench/soak.py --bundle BUNDLE [--clients 64] [--duration 60] [--json out.json]

Starts `rwood-serve BUNDLE` as a child process on a free loopback port (CPU, the server's default
threads), then runs `--clients` concurrent clients (grpc.aio tasks in this process, one channel
each) for `--warmup` + `--duration` seconds. Each client sends Score requests of 1-8 images: real
CIFAR-10 PNGs (the data pack, `--data`) and photo JPEGs (good), and with probability
`--bad-fraction` per image an entry of the hostile corpus that must be refused (truncated, random,
mislabelled, bombs). Checks: every request OK, every good image scored, every bad image refused
with a per-item error.
Reports requests and images per second, latency p50/p90/p99/max per request, errors by kind, and
the server's RSS (start, after warm-up, every second, end), threads and file descriptors.
Growth of RSS after warm-up must stay under `--max-growth` (5%). Exit status 1 on any failure.
Figures depend on the machine's load: the load average at start and end is printed with them.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "reliability")]
SHARED = Path(os.environ.get("RWOOD_SHARED_DATA", REPO.parent / "shared" / "data"))

from hostile_corpus import build_hostile_corpus, encode, raw_jpeg_files  # noqa: E402
from server_proc import ServerProcess  # noqa: E402

MAX_DURATION_S, MAX_CLIENTS = 1800, 1024


def image_pools(data: Path) -> tuple[list[bytes], list[bytes]]:
    """(good, bad): 256 CIFAR-10 test PNGs + 16 photo JPEGs; the corpus's must-refuse cases."""
    from PIL import Image

    cifar = np.load(data / "cifar10_test.npz")["images"][:256]
    good = [encode(Image.fromarray(a), "PNG") for a in cifar] + raw_jpeg_files(16)
    bad = [c.data for c in build_hostile_corpus() if c.expect == "error"]
    return good, bad


class Stats:
    """Per-request latencies and outcome counters, shared by the client tasks."""

    def __init__(self) -> None:
        self.latency: list[float] = []
        self.codes: collections.Counter = collections.Counter()
        self.images = 0
        self.good_refused: list[str] = []      # good images that got an error (must stay empty)
        self.bad_scored = 0                    # bad images that got a score (must stay 0)


async def client(target: str, good: list[bytes], bad: list[bytes], bad_fraction: float,
                 seed: int, t_end: float, stats: Stats, measuring: asyncio.Event) -> None:
    import grpc

    from detector_server._proto import detector_pb2 as pb
    from detector_server._proto import detector_pb2_grpc as pb_grpc

    rng = np.random.default_rng(seed)
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.DetectorStub(ch)
        while time.monotonic() < t_end:
            n = int(rng.integers(1, 9))
            is_bad = rng.random(n) < bad_fraction
            items = [bad[rng.integers(len(bad))] if b else good[rng.integers(len(good))]
                     for b in is_bad]
            req = pb.ScoreRequest(images=[pb.Image(id=str(i), data=d) for i, d in enumerate(items)])
            t0 = time.perf_counter()
            try:
                resp = await stub.Score(req, timeout=60)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code, resp = e.code().name, None
            dt = time.perf_counter() - t0
            if not measuring.is_set():
                continue
            stats.codes[code] += 1
            stats.latency.append(dt)
            if resp is None:
                continue
            stats.images += n
            for r, b in zip(resp.results, is_bad):
                if b and not r.error:
                    stats.bad_scored += 1
                elif not b and r.error:
                    stats.good_refused.append(r.error)


async def sample_rss(srv: ServerProcess, t_end: float, trace: list[int]) -> None:
    while time.monotonic() < t_end and srv.proc.poll() is None:
        trace.append(srv.stats()["rss_kb"])
        await asyncio.sleep(1.0)


async def soak(srv: ServerProcess, good, bad, clients: int, warmup: float, duration: float,
               bad_fraction: float) -> dict:
    stats, measuring = Stats(), asyncio.Event()
    start = srv.stats()
    t_warm = time.monotonic() + warmup
    t_end = t_warm + duration
    tasks = [asyncio.create_task(client(srv.target, good, bad, bad_fraction, k, t_end, stats,
                                        measuring)) for k in range(clients)]
    await asyncio.sleep(max(0.0, t_warm - time.monotonic()))
    warm = srv.stats()
    measuring.set()
    t0 = time.perf_counter()
    trace: list[int] = []
    await asyncio.gather(sample_rss(srv, t_end, trace), *tasks)
    elapsed = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    end = srv.stats()
    return {"stats": stats, "elapsed": elapsed, "start": start, "warm": warm, "end": end,
            "rss_trace_kb": trace}


def summarise(r: dict, args: argparse.Namespace, load_start, load_end) -> dict:
    s: Stats = r["stats"]
    lat = sorted(s.latency)
    q = (lambda p: round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 2)) if lat else None
    warm_kb, end_kb = r["warm"]["rss_kb"], r["end"]["rss_kb"]
    return {
        "clients": args.clients, "duration_s": round(r["elapsed"], 1), "warmup_s": args.warmup,
        "bad_fraction": args.bad_fraction, "loadavg_start": load_start, "loadavg_end": load_end,
        "requests": sum(s.codes.values()), "codes": dict(s.codes), "images": s.images,
        "requests_per_s": round(sum(s.codes.values()) / r["elapsed"], 1),
        "images_per_s": round(s.images / r["elapsed"], 1),
        "latency_ms": {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99),
                       "max": round(1000 * lat[-1], 2) if lat else None,
                       "mean": round(1000 * statistics.fmean(lat), 2) if lat else None},
        "good_images_refused": len(s.good_refused), "good_refused_examples": s.good_refused[:5],
        "bad_images_scored": s.bad_scored,
        "server": {"start": r["start"], "after_warmup": r["warm"], "end": r["end"],
                   "rss_max_kb": max(r["rss_trace_kb"], default=end_kb),
                   "rss_growth_after_warmup": round((end_kb - warm_kb) / warm_kb, 4)},
    }


def problems(rep: dict, max_growth: float) -> list[str]:
    out = []
    if set(rep["codes"]) - {"OK"}:
        out.append(f"requests failed: {rep['codes']}")
    if rep["good_images_refused"]:
        out.append(f"{rep['good_images_refused']} good images refused: "
                   f"{rep['good_refused_examples']}")
    if rep["bad_images_scored"]:
        out.append(f"{rep['bad_images_scored']} bad images were scored")
    srv = rep["server"]
    if srv["rss_growth_after_warmup"] >= max_growth:
        out.append(f"server RSS grew {100 * srv['rss_growth_after_warmup']:.1f}% after warm-up")
    for key in ("threads", "fds"):
        if srv["end"][key] > srv["after_warmup"][key]:
            out.append(f"server {key} grew {srv['after_warmup'][key]} -> {srv['end'][key]}")
    if not rep["requests"]:
        out.append("no request completed")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    ap.add_argument("--bad-fraction", type=float, default=0.1, help="share of bad images")
    ap.add_argument("--max-growth", type=float, default=0.05,
                    help="allowed RSS growth after warm-up")
    ap.add_argument("--threads", type=int, default=None, help="server --threads (default: its own)")
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        ap.error(f"--clients must be in 1..{MAX_CLIENTS}")
    if not 0 < args.duration + args.warmup <= MAX_DURATION_S:
        ap.error(f"--warmup + --duration must be in (0, {MAX_DURATION_S}] seconds")
    good, bad = image_pools(args.data)
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp, \
            ServerProcess(args.bundle, log_path=Path(tmp) / "soak_serve.log",
                          threads=args.threads) as srv:
        r = asyncio.run(soak(srv, good, bad, args.clients, args.warmup, args.duration,
                             args.bad_fraction))
    rep = summarise(r, args, load_start, [round(x, 2) for x in os.getloadavg()])
    rep["problems"] = problems(rep, args.max_growth)
    _print(rep)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))
    return 1 if rep["problems"] else 0


def _print(r: dict) -> None:
    s, lat = r["server"], r["latency_ms"]
    print(f"soak: {r['clients']} clients, {r['duration_s']} s measured after {r['warmup_s']} s "
          f"warm-up, {100 * r['bad_fraction']:.0f}% bad images; load average "
          f"{r['loadavg_start']} -> {r['loadavg_end']}")
    print(f"requests {r['requests']} ({r['requests_per_s']}/s), images {r['images']} "
          f"({r['images_per_s']}/s), status codes {r['codes']}")
    print(f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    print(f"good images refused: {r['good_images_refused']}; bad images scored: "
          f"{r['bad_images_scored']}")
    mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
    print(f"server RSS MB: start {mb(s['start']['rss_kb'])}, after warm-up "
          f"{mb(s['after_warmup']['rss_kb'])}, end {mb(s['end']['rss_kb'])}, max "
          f"{mb(s['rss_max_kb'])}; growth after warm-up {100 * s['rss_growth_after_warmup']:.2f}%")
    print(f"server threads {s['after_warmup']['threads']} -> {s['end']['threads']}, fds "
          f"{s['after_warmup']['fds']} -> {s['end']['fds']}")
    print("problems: " + ("none" if not r["problems"] else "; ".join(r["problems"])))


if __name__ == "__main__":
    sys.exit(main())
