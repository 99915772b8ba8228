"""The attacks of the server hardening report at full scale, against a local rwood-serve.

    .venv/bin/python bench/attacks.py [--bundle BUNDLE] [--only jpeg,png,streams] [--seconds 11]

Each attack gets a fresh `rwood-serve BUNDLE` child process on a free loopback port (CPU, one
thread, default limits); a health Check runs every 20 ms throughout and the server's RSS is
sampled every 50 ms. Rows:
- jpeg: one Score request holding a 32x32 JPEG padded with 12 million empty APP1 markers (46 MiB);
- png: one Score request holding a 32x32 PNG with 1.3 million empty chunks (15 MiB);
- streams (reading / not reading): 200 ScoreStream calls on one connection, each writing 130 KB
  requests (4 photos) for `--seconds`, reading the answers or not.
Prints, per row: how long the request took and its per-image error (decode attacks) or the
requests written / answered / failed (streams), the worst health latency and the peak RSS.
These are SECURITY.md's figures; they depend on the machine's load (printed with them).
Without --bundle a bundle is made first (1-epoch small_cnn; needs the train extra, ~1 minute).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "reliability")]
SHARED = Path(os.environ.get("RWOOD_SHARED_DATA", REPO.parent / "shared" / "data"))

import grpc  # noqa: E402
from attack_clients import HealthProbe, RssPeak, flood_streams, score_request  # noqa: E402
from hostile_corpus import jpeg_padded, png_padded, raw_jpeg_files  # noqa: E402
from server_proc import ServerProcess  # noqa: E402

from detector_server._proto import detector_pb2_grpc as pb_grpc  # noqa: E402


def decode_attack(target: str, data: bytes) -> str:
    """Send one Score request with `data`; its duration and per-image error."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 2**30)]) as ch:
        t0 = time.monotonic()
        result = pb_grpc.DetectorStub(ch).Score(score_request(data), timeout=600).results[0]
        return f"{time.monotonic() - t0:.2f} s, error: {result.error[:60] or '(none: scored)'}"


def run(bundle: Path, name: str, attack, log: Path) -> None:
    with ServerProcess(bundle, log_path=log) as srv:
        idle_mb = srv.stats()["rss_kb"] / 1024
        probe, rss = HealthProbe(srv.target), RssPeak(srv.pid)
        time.sleep(0.5)
        outcome = attack(srv.target)
        time.sleep(0.5)
        worst, peak_mb = probe.stop(), rss.stop() / 1024
    print(f"{name:28s} {outcome}\n{'':28s} worst health {worst * 1e3:.0f} ms, RSS {idle_mb:.0f} "
          f"MB idle -> {peak_mb:.0f} MB peak", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: make one)")
    p.add_argument("--only", default="jpeg,png,streams", help="attacks to run, comma-separated")
    p.add_argument("--seconds", type=float, default=11.0, help="duration of the stream flood")
    p.add_argument("--streams", type=int, default=200, help="ScoreStream calls in the flood")
    args = p.parse_args()
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            sys.path.insert(0, str(REPO / "bench"))
            from score_folder import make_bundle

            bundle = make_bundle(Path(tmp), SHARED)
        print(f"load average {os.getloadavg()[0]:.1f}, cores {len(os.sched_getaffinity(0))}")
        log = Path(tmp) / "serve.log"
        if "jpeg" in only:
            data = jpeg_padded(12_000_000)
            run(bundle, "jpeg, 12M empty APP1", lambda t: decode_attack(t, data), log)
        if "png" in only:
            data = png_padded(1_300_000)
            run(bundle, "png, 1.3M empty chunks", lambda t: decode_attack(t, data), log)
        if "streams" in only:
            request = score_request(*raw_jpeg_files(6)[2:])
            for read in (True, False):
                run(bundle, f"{args.streams} streams, {'' if read else 'not '}reading",
                    lambda t, r=read: str(flood_streams(t, request, args.streams, args.seconds, r)),
                    log)
        print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
